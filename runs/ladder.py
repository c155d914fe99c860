"""
The grounding ladder: how fast does a model trained from scratch learn the easiest things an image
question needs? Every spatial question first needs the object it names to be found; these rungs
ask for nothing else, several questions about one scene packed after its image, so each image
buys several answers:

    exist       "Is there a red object?"   yes/no, one question per colour (--colors: the first k colours)
    exist_text  the same, with the image replaced by the list of visible colours in text
                ("Objects: red cyan."): the lookup without vision, the defect check for the rest
    colour      "What color is the cube?" / "What shape is the red object?" (one hop)
    point       "Where is the red cube?"   left / middle / right (the object's centre column)

Options say what the model reads (--input=codes: the VQ code embeddings, as every stage;
--input=table: plus a projection of each code's mean pixel patch, the model's code_patches,
a fixed function of the code that a generated code has too; --input=conv: plus a two-layer conv stem
over the true pixels) and where the
question goes (--layout=question_first puts the first question before the image, so each image
token can read it; one question an image then makes sense). It prints val accuracy (teacher-
forced exact match of every answer token, which is greedy decoding's) against the majority
answer of each question on train, and the tokens it took to reach 90% (or the best reached).

    python runs/ladder.py --rung=exist --colors=1 --minutes=3      # one colour: learns in ~100 steps
    python runs/ladder.py --rung=exist --input=conv --minutes=7
    python runs/ladder.py --rung=exist_text --minutes=4 --optimizer=muon

Uses `python bench.py learn`'s data (data/learn, built here if missing). Ends with `final: {json}`.
"""
import argparse
import collections
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batches  # noqa: E402
import data  # noqa: E402
import prepare  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rung", default="exist", choices=("exist", "exist_text", "colour", "point"))
parser.add_argument("--colors", type=int, default=len(data.COLORS), help="exist: ask about the first k colours only")
parser.add_argument("--input", default="codes", choices=("codes", "table", "conv"))
parser.add_argument("--layout", default="image_first", choices=("image_first", "question_first"))
parser.add_argument("--per_image", type=int, default=8, help="questions packed after one image")
parser.add_argument("--minutes", type=float, default=5.0)
parser.add_argument("--eval_every", type=int, default=100)
parser.add_argument("--val_scenes", type=int, default=300)
parser.add_argument("--n_layer", type=int, default=4)
parser.add_argument("--n_head", type=int, default=4)
parser.add_argument("--n_embd", type=int, default=128)
parser.add_argument("--batch_size", type=int, default=16)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"))
parser.add_argument("--muon_lr", type=float, default=0.02)
parser.add_argument("--warmup", type=int, default=50)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--data_dir", default="data/learn")
parser.add_argument("--vq_ckpt", default="out/vqgan/ckpt.pt")
args = parser.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
torch.manual_seed(args.seed)

data.prepare(args.data_dir, n_val=600, n_test=200)
tok, vq, codes, _, _ = prepare.stage_data(args.data_dir, args.vq_ckpt)
splits = {s: data.load_split(args.data_dir, s) for s in ("train", "val")}
size = splits["train"]["rgb"].shape[1]
side = int(np.sqrt(codes["train"].shape[-1]))  # codes per image side
COLORS = list(data.COLORS)[:args.colors]
BLOCK_SIZE = 1024


def visible(o, g):
    return o["visible_pixels"] >= g["min_visible"]


def rung_questions(g, rng):
    """[(question, answer)] about scene graph g for this rung, at most per_image, shuffled."""
    objs, out = g["objects"], []
    if args.rung.startswith("exist"):
        for c in COLORS:
            group = [o for o in objs if o["color"] == c]
            if not any(0 < o["visible_pixels"] < g["min_visible"] for o in group):  # no half-visible ones
                out.append((f"Is there a {c} object?", "yes" if any(visible(o, g) for o in group) else "no"))
    elif args.rung == "colour":
        for attr, values in (("shape", data.SHAPES), ("color", data.COLORS)):
            for v in values:
                group = [o for o in objs if o[attr] == v]
                if len(group) == 1 and visible(group[0], g):
                    out.append((f"What color is the {v}?", group[0]["color"]) if attr == "shape"
                               else (f"What shape is the {v} object?", group[0]["shape"]))
    else:
        for o in objs:
            if visible(o, g):
                column = ("left", "middle", "right")[min(2, int(3 * o["centroid"][0] / size))]
                out.append((f"Where is the {data.name(o)}?", column))
    order = rng.permutation(len(out))
    return [out[i] for i in order[:args.per_image]]


def render(split, i, rng):
    """(ids, loss mask, number of answers) of scene i's packed questions, or None if it has none."""
    g = splits[split]["scenes"][i]
    qa = rung_questions(g, rng)
    if not qa:
        return None
    conv = []
    for k, (q, a) in enumerate(qa):
        parts = [{"text": q}]
        if k == 0 and args.rung == "exist_text":
            seen = [c for c in data.COLORS if any(visible(o, g) for o in g["objects"] if o["color"] == c)]
            parts = [{"text": "Objects: " + " ".join(seen[j] for j in rng.permutation(len(seen))) + "."}] + parts
        elif k == 0:
            parts = parts + [{"image": "rgb"}] if args.layout == "question_first" else [{"image": "rgb"}] + parts
        conv += [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"answer": a}]}]
    ids, mask = tok.render_conversation(conv, {"rgb": codes[split][i, 0]})
    return ids, mask, len(qa)


def batch(split, scene_ids, rng):
    """(idx, targets, mask, pixels of each row's scene, answers a row)."""
    rows, keep = [], []
    for i in scene_ids:
        r = render(split, i, rng)
        if r is not None:
            rows.append(r)
            keep.append(i)
    x, y, m = batches.make_batch(tok, [(ids, mask) for ids, mask, _ in rows], BLOCK_SIZE)
    pixels = torch.from_numpy(splits[split]["rgb"][keep]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, y, m, pixels, [r[2] for r in rows]


class ConvStem(nn.Module):
    """Pixels -> one vector a code place, added to the codes of the first image in each row: the
    colour of a patch is there from step 0, where a code's embedding has to learn it."""

    def __init__(self, n_embd):
        super().__init__()
        patch = size // side
        self.net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, n_embd, patch, stride=patch))

    def forward(self, idx, tok_emb, pixels):
        feats = self.net(pixels).flatten(2).transpose(1, 2)  # (B, side², C)
        is_code = idx >= tok.image_offset
        place = is_code.long().cumsum(1) - 1
        first = is_code & (place < side * side)
        add = torch.zeros_like(tok_emb)
        b, t = first.nonzero(as_tuple=True)
        add[b, t] = feats[b, place[b, t]]
        return tok_emb + add


patches = prepare.code_patches(args.data_dir, vq, codes["train"]) if args.input == "table" else None
config = GPTConfig(block_size=BLOCK_SIZE, vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                   n_embd=args.n_embd, image_offset=tok.image_offset, n_image_tokens=side * side, grid_prior=6.0,
                   code_patch_dim=0 if patches is None else patches.shape[1])
model = GPT(config)
if patches is not None:  # the model's own code_patches (model.py)
    model.code_patches.copy_(torch.from_numpy(patches))
stem = ConvStem(args.n_embd) if args.input == "conv" else None
if stem is not None:  # the stem's output joins the token embeddings through a forward hook on wte
    state = {}
    model.wte.register_forward_hook(lambda mod, inp, out: stem(inp[0], out, state["pixels"]))
    model.add_module("stem", stem)
optimizer = model.configure_optimizers(0.1, args.lr, (0.9, 0.95), "cpu", args.optimizer, args.muon_lr)


def forward(x, y, m, pixels):
    if stem is not None:
        state["pixels"] = pixels
    return model(x, y, m)


def answer_spans(mask_row):
    """[(start, end)] of each answer's supervised run in a row's loss mask."""
    edges = np.diff(np.concatenate([[0], mask_row.numpy(), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@torch.no_grad()
def evaluate():
    model.eval()
    rng, right, n = np.random.default_rng(123), 0, 0
    for start in range(0, args.val_scenes, 32):
        x, y, m, pixels, _ = batch("val", range(start, min(args.val_scenes, start + 32)), rng)
        ok = (forward(x, None, None, pixels)[0].argmax(-1) == y) | (m == 0)
        for b in range(len(x)):
            for s, e in answer_spans(m[b]):
                right += bool(ok[b, s:e].all())
                n += 1
    model.train()
    return right / n, n


def majority():
    """Accuracy on the val questions of the most common train answer to the same question."""
    rng, counts = np.random.default_rng(5), collections.defaultdict(collections.Counter)
    for g in splits["train"]["scenes"]:
        for q, a in rung_questions(g, rng):
            counts[q][a] += 1
    rng, hits = np.random.default_rng(123), []
    for g in splits["val"]["scenes"][:args.val_scenes]:
        hits += [bool(counts[q]) and counts[q].most_common(1)[0][0] == a for q, a in rung_questions(g, rng)]
    return float(np.mean(hits))


base = majority()
print(f"ladder: rung {args.rung}, input {args.input}, {args.layout}, {args.per_image} a scene, {args.optimizer}; "
      f"majority {base:.3f}")
rng, n_train = np.random.default_rng(args.seed), len(codes["train"])
t0, it, tokens, answers, curve = time.time(), 0, 0, 0, []
while True:
    done = time.time() - t0 > args.minutes * 60
    if it % args.eval_every == 0 or done:
        acc, n_val = evaluate()
        curve.append({"iter": it, "tokens": tokens, "answers": answers, "acc": round(acc, 4)})
        print(f"iter {it:5d} | {tokens / 1e6:5.2f}M tokens | {answers:6d} answers | val acc {acc:.3f} ({n_val})", flush=True)
    if done:
        break
    for group in optimizer.param_groups:
        group["lr"] = args.lr * group.get("lr_scale", 1.0) * min(1.0, (it + 1) / args.warmup)
    x, y, m, pixels, per_row = batch("train", rng.integers(n_train, size=args.batch_size), rng)
    _, loss = forward(x, y, m, pixels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    it, tokens, answers = it + 1, tokens + x.numel(), answers + sum(per_row)

reached = next((r for r in curve if r["acc"] >= 0.9), None)
best = max(curve, key=lambda r: r["acc"])
print(f"tokens to 90%: {reached['tokens'] if reached else 'not reached'} (best {best['acc']:.3f} at {best['tokens']} tokens)")
print("final: " + json.dumps({"rung": args.rung, "input": args.input, "layout": args.layout, "colors": args.colors,
                              "optimizer": args.optimizer,
                              "majority": round(base, 4), "acc": curve[-1]["acc"], "best": best["acc"],
                              "tokens": tokens, "answers": answers, "iters": it, "val_answers": n_val,
                              "tokens_to_90": reached["tokens"] if reached else None,
                              "minutes": round((time.time() - t0) / 60, 2)}))
