"""
Can the tiny model learn to compare two depths it has read? A text-only probe, no images: the
question of each depth-order trace plus the trace's true reading ("the red cube is at 6.1 m; the
blue sphere is at 2.9 m, nearer.") -> the answer ("the blue sphere"). The full pipeline's COOPER
once answered every depth-order question with one option, even with the true reading forced into its reply (docs/experiments.md, "Longer RL,
and what limits COOPER"); this says whether the skill is learnable at all and how much signal it
takes. --reading=plain drops the reading's last clause (", nearer"), as traces were before it:
then only the answer is trained; with the clause, its word is trained too.

    python runs/probe_comparison.py                       # from scratch, 600 steps of 32
    python runs/probe_comparison.py --reading=plain --steps=1000
    python runs/probe_comparison.py --init=out/stage2/ckpt.pt --steps=700

Needs a checkpoint (--shape, default out/stage2/ckpt.pt) for the model's shape and for the
tokenizer and VQ it was trained with. Ends with `final: {json}`.
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conversations  # noqa: E402
import data  # noqa: E402
import tokenizer  # noqa: E402
import trainer  # noqa: E402
import vqgan  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="out/stage2/ckpt.pt", help="checkpoint whose model_args give the model's shape")
parser.add_argument("--init", default="scratch", help="scratch, or a checkpoint to start from")
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--reading", default="clause", choices=["clause", "plain"],
                    help="clause: the trace's reading, which ends by saying whether (B) is nearer or farther than "
                         "(A) (', nearer.'); plain: without that clause")
args = parser.parse_args()
torch.manual_seed(args.seed)
shape = trainer.load_checkpoint(args.shape)
refs = shape["refs"]
tok = tokenizer.Tokenizer.load(refs["tokenizer"], vqgan.load_vqgan(refs["vq"]).cfg.codebook_size)


def without_clause(reading):
    """'… the blue sphere is at 4.6 m, nearer.' -> '… the blue sphere is at 4.6 m.'"""
    return re.sub(r", (nearer|farther)\.$", ".", reading)


def examples(split):
    """(ids, positions of the supervised tokens: [the clause's word,] the answer's words) for every
    depth-order trace of a split."""
    out = []
    for t in conversations.build_traces(data.load_split(refs["data_dir"], split)):
        if t["kind"] != "depth_order":
            continue
        (user, reply) = t["conversation"]
        question = [p for p in user["content"] if "text" in p]
        reading, answer = reply["content"][-2:]  # the second <think> (the reading) and the <answer>
        if args.reading == "plain":
            reading = {"think": without_clause(reading["think"])}
        ids, _ = tok.render_conversation([{"role": "user", "content": question},
                                          {"role": "assistant", "content": [reading, answer]}])
        word = [ids.index(tok.end_think) - 2] if args.reading == "clause" else []  # ' nearer' / ' farther'
        if word and tok.decode(ids[word[0]:word[0] + 1]).strip() not in ("nearer", "farther"):
            raise SystemExit(f"this tokenizer splits the clause differently: {tok.decode(ids[word[0] - 2:word[0] + 3])!r}")
        out.append((ids, word + list(range(ids.index(tok.answer) + 1, ids.index(tok.end_answer)))))
    return out


def batch(rows):
    """Right-padded ids (B, T) and the supervised positions (B, K), a row's last one repeated where
    its answer is shorter."""
    x = torch.full((len(rows), max(len(r) for r, _ in rows)), tok.pad)
    for i, (r, _) in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
    k = max(len(at) for _, at in rows)
    return x, torch.tensor([at + at[-1:] * (k - len(at)) for _, at in rows])


def logits_at(x, at):
    """The predictions of the tokens at positions `at` (B, K) -> (B, K, V)."""
    logits, _ = model(x)
    return logits[torch.arange(len(x))[:, None], at - 1]


@torch.no_grad()
def accuracy(rows):
    """The answer's accuracy, greedy (every word right); with a clause, after the clause word the
    model chose."""
    model.eval()
    truth, at = batch(rows)
    x, rows_ = truth.clone(), torch.arange(len(truth))
    for k in range(at.shape[1]):  # each supervised token in turn, after the model's own earlier choices
        x[rows_, at[:, k]] = logits_at(x, at[:, k:k + 1])[:, 0].argmax(-1)
    model.train()
    answer = at[:, 1:] if args.reading == "clause" else at
    return (x[rows_[:, None], answer] == truth[rows_[:, None], answer]).all(1).float().mean().item()


train, val = examples("train"), examples("val")
model = GPT(GPTConfig(**shape["model_args"]))
if args.init != "scratch":
    model.load_state_dict(trainer.load_checkpoint(args.init)["model"])
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
rng = np.random.default_rng(args.seed)
print(f"{len(train)} train and {len(val)} val depth-order examples; init {args.init}")
curve, t0 = [(0, accuracy(val))], time.time()
for step in range(1, args.steps + 1):
    x, at = batch([train[i] for i in rng.integers(len(train), size=args.batch_size)])
    loss = F.cross_entropy(logits_at(x, at).flatten(0, 1), x[torch.arange(len(x))[:, None], at].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if step % 100 == 0 or step == args.steps:
        curve.append((step, accuracy(val)))
        print(f"step {step} | loss {loss.item():.3f} | val accuracy {curve[-1][1]:.3f} | {time.time() - t0:.0f} s", flush=True)
first = next((s for s, a in curve if a >= 0.9), None)
print("final: " + json.dumps({"val_acc_start": round(curve[0][1], 4), "val_acc_end": round(curve[-1][1], 4),
                              "first_step_at_0.9": first, "steps": args.steps, "reading": args.reading, "batch_size": args.batch_size,
                              "minutes": round((time.time() - t0) / 60, 2)}))
