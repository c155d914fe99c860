"""
The grounding ladder: how fast does a model trained from scratch learn the easiest things an image
question needs? Every spatial question first needs the object it names to be found; these rungs
ask for nothing else, several questions about one scene packed after its image, so each image
buys several answers:

    exist       "Is there a red object?"   yes/no, one question per colour (--colors: the first k colours)
    exist_text  the same, with the image replaced by the list of visible colours in text
                ("Objects: red cyan."): the lookup without vision, the defect check for the rest
    colour      "What color is the cube?" / "What shape is the red object?" (one hop)
    point       "Where is the red cube, left or right?"   left / middle / right (its centre's column)
    real        every question data.py writes for the scene (numbers by exact match), by category

Options say what the model reads: --input=codes, the VQ code embeddings, as every stage;
--input=table, plus a projection of each code's mean pixel patch (the model's code_patches, a
fixed function of the code that a generated code has too); --input=conv, plus a conv stem over the
true pixels (--stem=grid adds a 3×3 conv over the patch grid, --stem=deep also two more over the
pixels); --input=decoded and --input=mosaic, the same stem over what the codes alone say (the VQ
decoder's image, or each code's mean patch in its place), which a generated map has too; --blind,
no image at all. --object_head adds the model's per-place object loss (model.py), --dense_map
makes the model draw the same classes as a map after its answers instead. --layout=question_first
puts the first question before the image. It prints val accuracy (teacher-forced exact match of
every answer token, which is greedy decoding's; each question asked alone after its image, as
evaluation asks, so none can read its answer off the others), overall and by kind, against the majority answer
of each question on train, and the tokens it took to reach 90% (or the best reached).

    python runs/ladder.py --rung=exist --colors=1 --minutes=3      # one colour: learns in ~100 steps
    python runs/ladder.py --rung=exist --input=conv --optimizer=muon --minutes=9
    python runs/ladder.py --rung=colour --input=conv --stem=grid --object_head --optimizer=muon --muon_lr=0.05 --minutes=12
    python runs/ladder.py --rung=real --blind --optimizer=muon --muon_lr=0.05 --minutes=15

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
import grounding  # noqa: E402
import prepare  # noqa: E402
import vqgan  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rung", default="exist",
                    help="exist, exist_text, colour, point or real; several joined by commas ask each rung's questions of every scene")
parser.add_argument("--blind", action="store_true", help="leave the image out: the floor that answer priors reach")
parser.add_argument("--colors", type=int, default=len(data.COLORS), help="exist: ask about the first k colours only")
parser.add_argument("--input", default="codes", choices=("codes", "table", "conv", "decoded", "mosaic"))
parser.add_argument("--layout", default="image_first", choices=("image_first", "question_first"))
parser.add_argument("--per_image", type=int, default=8, help="questions packed after one image")
parser.add_argument("--stem", default="patch", choices=("patch", "grid", "deep"),
                    help="grid: the conv stem adds a 3x3 conv over the patch grid, so each place sees its neighbours "
                         "both ways; deep: also two 3x3 convs over the pixels before the patch conv")
parser.add_argument("--object_head", action="store_true",
                    help="the model's object head: a loss naming the object (colour and shape) at each image place")
parser.add_argument("--dense_map", action="store_true",
                    help="after the answers, the model draws the scene's object map (each place's colour-and-shape class "
                         "as an image code), the dense signal as generated tokens instead of a head")
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
parser.add_argument("--vq_ckpt", default="out/vqgan_learn/ckpt.pt")  # bench.py learn's
args = parser.parse_args()
RUNGS = args.rung.split(",")
if not set(RUNGS) <= {"exist", "exist_text", "colour", "point", "real"} or ("exist_text" in RUNGS and len(RUNGS) > 1):
    parser.error(f"--rung: {args.rung!r} is not a comma list of exist, colour, point, real (or exist_text alone)")
if args.blind and (args.object_head or args.dense_map):
    parser.error("--blind has no image for --object_head or --dense_map to name")
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
    """[(question, answer, kind)] about scene graph g: at most per_image of each rung's, shuffled
    together; the kind (a question's first three words, or a real question's category) groups the
    accuracies."""
    if len(RUNGS) == 1:
        return one_rung(RUNGS[0], g, rng)
    qa = [x for rung in RUNGS for x in one_rung(rung, g, rng)]
    return [qa[i] for i in rng.permutation(len(qa))]


def one_rung(rung, g, rng):
    objs, out = g["objects"], []
    if rung.startswith("exist"):  # stage 1's grounding drills (data.drill_questions), the first k colours
        out = [(q["question"], q["answer"], "Is there a") for q in data.drill_questions(g)["exist"]
               if q["question"].split()[3] in COLORS]
    elif rung == "colour":
        for attr, values in (("shape", data.SHAPES), ("color", data.COLORS)):
            for v in values:
                group = [o for o in objs if o[attr] == v]
                if len(group) == 1 and visible(group[0], g):
                    out.append((f"What color is the {v}?", group[0]["color"], "What color is") if attr == "shape"
                               else (f"What shape is the {v} object?", group[0]["shape"], "What shape is"))
    elif rung == "point":
        out = [(q["question"], q["answer"], "Where is the") for q in data.drill_questions(g)["where"] if "left or right" in q["question"]]
    else:  # every question data.py writes for the scene (numbers too, scored by exact match here)
        for category, qs in data.candidate_questions(g).items():
            for q in qs:
                q = data.offered(q, rng) if "options" in q else q
                out.append((q["question"], q["answer"], category))
    order = rng.permutation(len(out))
    return [out[i] for i in order[:args.per_image]]


def render(split, i, rng, qa=None):
    """(ids, loss mask, its questions' kinds) of scene i's packed questions (qa, or a fresh draw),
    or None if it has none."""
    g = splits[split]["scenes"][i]
    qa = rung_questions(g, rng) if qa is None else qa
    if not qa:
        return None
    conv = []
    for k, (q, a, _) in enumerate(qa):
        parts = [{"text": q}]
        if k == 0 and args.rung == "exist_text":
            seen = [c for c in data.COLORS if any(visible(o, g) for o in g["objects"] if o["color"] == c)]
            parts = [{"text": "Objects: " + " ".join(seen[j] for j in rng.permutation(len(seen))) + "."}] + parts
        elif k == 0 and not args.blind:
            parts = parts + [{"image": "rgb"}] if args.layout == "question_first" else [{"image": "rgb"}] + parts
        conv += [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"answer": a}]}]
    images = {"rgb": codes[split][i, 0]}
    if args.dense_map:  # drawn after every answer, so no answer can read it
        conv += [{"role": "user", "content": [{"tool": "seg"}]}, {"role": "assistant", "content": [{"image": "seg"}]}]
        images["seg"] = class_codes[labels[split][i].numpy()]
    ids, mask = tok.render_conversation(conv, images)
    return ids, mask, [kind for _, _, kind in qa]


def batch(split, scene_ids, rng, qas=None):
    """(idx, targets, mask, pixels of each row's scene, each row's question kinds, patch labels or
    None); qas, one list of (question, answer, kind) a row, fixes what each row asks."""
    rows, keep = [], []
    for k, i in enumerate(scene_ids):
        r = render(split, i, rng, None if qas is None else qas[k])
        if r is not None:
            rows.append(r)
            keep.append(i)
    x, y, m = batches.make_batch(tok, [(ids, mask) for ids, mask, _ in rows], BLOCK_SIZE)
    return x, y, m, batch_pixels(split, keep), [r[2] for r in rows], None if labels is None else labels[split][keep]


def batch_pixels(split, scene_ids):
    """What the conv stem reads for these scenes, (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(stem_pixels[split][list(scene_ids)]).permute(0, 3, 1, 2).float() / 127.5 - 1


class ConvStem(nn.Module):
    """Pixels -> one vector a code place, added to the codes of the first image in each row: the
    colour of a patch is there from step 0, where a code's embedding has to learn it."""

    def __init__(self, n_embd):
        super().__init__()
        patch = size // side
        layers = [nn.Conv2d(3, 64, 3, padding=1), nn.GELU()]
        if args.stem == "deep":
            layers = [nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1), nn.GELU()]
        layers += [nn.Conv2d(64, n_embd, patch, stride=patch)]
        if args.stem in ("grid", "deep"):
            layers += [nn.GELU(), nn.Conv2d(n_embd, n_embd, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, idx, tok_emb, pixels):
        feats = self.net(pixels).flatten(2).transpose(1, 2)  # (B, side², C)
        is_code = idx >= tok.image_offset
        place = is_code.long().cumsum(1) - 1
        first = is_code & (place < side * side)
        add = torch.zeros_like(tok_emb)
        b, t = first.nonzero(as_tuple=True)
        add[b, t] = feats[b, place[b, t]]
        return tok_emb + add


patches = prepare.code_patches(args.data_dir, vq, codes["train"]) if args.input in ("table", "mosaic") else None


def mosaic(code_ids):
    """(N, side², ) codes -> (N, H, W, 3) uint8: each code's mean patch in its place."""
    p = size // side
    tiles = patches[code_ids].reshape(len(code_ids), side, side, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return ((tiles.reshape(len(code_ids), size, size, 3) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


# what the conv stem sees: the true pixels, or only what the codes say (a generated image has those too)
stem_pixels = {s: (splits[s]["rgb"] if args.input in ("conv", "codes", "table") else
            vqgan.batched(vq.decode, torch.from_numpy(codes[s][:, 0])).numpy() if args.input == "decoded" else
            mosaic(codes[s][:, 0])) for s in splits}
config = GPTConfig(block_size=BLOCK_SIZE, vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                   n_embd=args.n_embd, image_offset=tok.image_offset, n_image_tokens=side * side, grid_prior=6.0,
                   code_patch_dim=patches.shape[1] if args.input == "table" else 0,
                   object_classes=grounding.N_OBJECT_CLASSES if args.object_head else 0)
model = GPT(config)
if args.input == "table":  # the model's own code_patches (model.py)
    model.code_patches.copy_(torch.from_numpy(patches))
stem = ConvStem(args.n_embd) if args.input in ("conv", "decoded", "mosaic") else None
state = {}
if stem is not None:  # the stem's output joins the token embeddings through a forward hook on wte
    model.wte.register_forward_hook(lambda mod, inp, out: stem(inp[0], out, state["pixels"]))
    model.add_module("stem", stem)
labels = ({s: torch.from_numpy(grounding.place_objects(splits[s]["seg"], splits[s]["scenes"], side)) for s in splits}
          if args.object_head or args.dense_map else None)
# the object map's classes drawn as the codes the RGB images use least (an RGB code means nothing else here)
class_codes = np.argsort(np.bincount(codes["train"][:, 0].ravel(), minlength=vq.cfg.codebook_size),
                         kind="stable")[:grounding.N_OBJECT_CLASSES]
code_class = torch.zeros(vq.cfg.codebook_size, dtype=torch.long)
code_class[torch.from_numpy(class_codes)] = torch.arange(grounding.N_OBJECT_CLASSES)
if args.object_head:  # to score the head, its input (the final hidden states) through a hook on ln_f
    model.ln_f.register_forward_hook(lambda mod, inp, out: state.__setitem__("hidden", out))
optimizer = model.configure_optimizers(0.1, args.lr, (0.9, 0.95), args.optimizer, args.muon_lr)


def first_image(idx):
    """(rows, positions) of the first image's codes in each row, in grid order."""
    is_code = idx >= tok.image_offset
    return (is_code & (is_code.long().cumsum(1) <= side * side)).nonzero(as_tuple=True)


def forward(x, y, m, pixels, patch_y=None):
    """(logits, loss, the object head's logits at the first image's places or None); patch_y, the
    object classes, adds the head's loss (model.py)."""
    if stem is not None:
        state["pixels"] = pixels
    logits, loss = model(x, y, m, places=patch_y[..., None] if args.object_head and patch_y is not None else None)
    if not args.object_head:
        return logits, loss, None
    b, t = first_image(x)
    return logits, loss, model.object_head(state["hidden"][b, t]).view(len(x), side * side, -1)


def answer_spans(mask_row):
    """[(start, end)] of each answer's supervised run in a row's loss mask."""
    edges = np.diff(np.concatenate([[0], mask_row.numpy(), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@torch.no_grad()
def evaluate():
    """Val accuracy by kind, each question asked alone after its image: packed after the others,
    it could read its answer off them ("What shape is the red object?" … "What color is the cube?")."""
    model.eval()
    rng, hits = np.random.default_rng(123), collections.defaultdict(list)
    alone = [(i, [x]) for i in range(args.val_scenes) for x in rung_questions(splits["val"]["scenes"][i], rng)]
    for start in range(0, len(alone), 64):
        scene_ids, qas = zip(*alone[start:start + 64])
        x, y, m, _, qs, _ = batch("val", scene_ids, rng, qas)
        logits = forward(x, None, None, batch_pixels("val", scene_ids))[0]
        ok = (logits.argmax(-1) == y) | (m == 0)
        for b in range(len(x)):
            (s, e), q = answer_spans(m[b])[0], qs[b][0]
            hits[q].append(bool(ok[b, s:e].all()))
    for start in range(0, args.val_scenes, 32):  # the place head, or the drawn map, on each scene once
        if not (args.object_head or args.dense_map):
            break
        x, y, m, pixels, qs, patch_y = batch("val", range(start, min(args.val_scenes, start + 32)), rng)
        logits, _, dense = forward(x, None, None, pixels)
        if args.dense_map:  # the drawn map's object places, read back through the class codes
            drawn = torch.zeros_like(patch_y)
            for b in range(len(x)):
                s, e = answer_spans(m[b])[-2]  # <|image|> and the codes; <|/image|> is forced, <|eos|> its own run
                drawn[b] = code_class[(logits[b, s + 1:e].argmax(-1) - tok.image_offset).clamp(0)]
            dense = nn.functional.one_hot(drawn, grounding.N_OBJECT_CLASSES)
        if dense is not None:  # the dense head on object places: colour and shape read apart
            on, guess = patch_y > 0, dense.argmax(-1)
            hits["patch colour"] += ((guess[on] - 1) // 3 == (patch_y[on] - 1) // 3).tolist()
            hits["patch shape"] += ((guess[on] - 1) % 3 == (patch_y[on] - 1) % 3).tolist()
    model.train()
    every = sum((v for k, v in hits.items() if not k.startswith("patch")), [])
    return float(np.mean(every)), len(every), {k: round(float(np.mean(v)), 3) for k, v in sorted(hits.items())}


def majority():
    """Accuracy on the val questions of the most common train answer to the same question: overall
    and by kind."""
    rng, counts = np.random.default_rng(5), collections.defaultdict(collections.Counter)
    for g in splits["train"]["scenes"]:
        for q, a, _ in rung_questions(g, rng):
            counts[q][a] += 1
    rng, hits = np.random.default_rng(123), collections.defaultdict(list)
    for g in splits["val"]["scenes"][:args.val_scenes]:
        for q, a, kind in rung_questions(g, rng):
            hits[kind].append(bool(counts[q]) and counts[q].most_common(1)[0][0] == a)
    return float(np.mean(sum(hits.values(), []))), {k: round(float(np.mean(v)), 3) for k, v in sorted(hits.items())}


base, base_kinds = majority()
print(f"ladder: rung {args.rung}, input {args.input}, {args.layout}, {args.per_image} a scene, {args.optimizer}; "
      f"majority {base:.3f}" + (f" ({' '.join(f'{k!r} {v:.3f}' for k, v in base_kinds.items())})" if len(base_kinds) > 1 else ""))
rng, n_train = np.random.default_rng(args.seed), len(codes["train"])
t0, it, tokens, answers, curve = time.time(), 0, 0, 0, []
while True:
    done = time.time() - t0 > args.minutes * 60
    if it % args.eval_every == 0 or done:
        acc, n_val, kinds = evaluate()
        curve.append({"iter": it, "tokens": tokens, "answers": answers, "acc": round(acc, 4), "kinds": kinds})
        by_kind = " ".join(f"'{k}' {v:.3f}" for k, v in kinds.items()) if len(kinds) > 1 else ""
        print(f"iter {it:5d} | {tokens / 1e6:5.2f}M tokens | {answers:6d} answers | val acc {acc:.3f} ({n_val}) {by_kind}", flush=True)
    if done:
        break
    for group in optimizer.param_groups:
        group["lr"] = args.lr * group.get("lr_scale", 1.0) * min(1.0, (it + 1) / args.warmup)
    x, y, m, pixels, per_row, patch_y = batch("train", rng.integers(n_train, size=args.batch_size), rng)
    _, loss, _ = forward(x, y, m, pixels, patch_y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    it, tokens, answers = it + 1, tokens + x.numel(), answers + sum(map(len, per_row))

reached = next((r for r in curve if r["acc"] >= 0.9), None)
best = max(curve, key=lambda r: r["acc"])
print(f"tokens to 90%: {reached['tokens'] if reached else 'not reached'} (best {best['acc']:.3f} at {best['tokens']} tokens)")
print("final: " + json.dumps({"rung": args.rung, "input": args.input, "layout": args.layout, "colors": args.colors,
                              "optimizer": args.optimizer,
                              "majority": round(base, 4), "majority_kinds": base_kinds, "acc": curve[-1]["acc"], "kinds": curve[-1]["kinds"], "best": best["acc"],
                              "tokens": tokens, "answers": answers, "iters": it, "val_answers": n_val,
                              "tokens_to_90": reached["tokens"] if reached else None,
                              "minutes": round((time.time() - t0) / 60, 2)}))
