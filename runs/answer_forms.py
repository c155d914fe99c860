"""
Which form of a one-word answer does a model get right? A multiple-choice answer is the word that
picks its option out (data.answer_key): the colour where the options' colours differ, the shape
where they share a colour, the whole name where neither alone does. This decodes val comparisons
(depth order, relation, relative distance) as evaluation does (eval.answer, greedy) and counts,
by the form of the right answer, how many are right and what kind of word the model said.

    python runs/answer_forms.py out/learn/rgb/ckpt.pt --data_dir=data/learn
    python runs/answer_forms.py out/stage2/ckpt.pt --data_dir=data/tiny --mode=interleaved

Ends with `final: {json}`.
"""
import collections
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as ev  # noqa: E402
import metrics  # noqa: E402
import probe  # noqa: E402 (runs/probe.py)

parser = probe.parser(__doc__, "a model trained on data_dir's scenes")
parser.add_argument("--mode", default="direct", choices=("direct", "interleaved"), help="eval.answer's mode")
parser.add_argument("--categories", nargs="+", default=["depth_order", "relation", "relative_distance"])
args = parser.parse_args()

model, tok, codes, questions, rgb = probe.load(args)
asked = [q for q in questions["val"] if q["category"] in args.categories]
replies = ev.answer(model, tok, asked, codes["val"], codes["val"].shape[-1], mode=args.mode, rgb=rgb, **ev.DECODE)


def form(word):
    return "colour" if word in data.COLORS else "shape" if word in data.SHAPES else "name or other" if word else "none"


count = collections.defaultdict(collections.Counter)
for q, r in zip(asked, replies):
    said = metrics.normalise(tok.answer_of(tok.parse_reply(r)[0]))
    c = count[form(q["answer"])]
    c["n"] += 1
    c["right"] += said == metrics.normalise(q["answer"])
    c[f"said a {form(said)}" if form(said) in ("colour", "shape") else f"said {form(said)}"] += 1
result = {"ckpt": args.ckpt, "mode": args.mode}
for f, c in sorted(count.items()):
    print(f"answer is a {f:<14} {c['n']:>5} questions, right {c['right'] / c['n']:.3f}; "
          + ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k.startswith("said")))
    result[f] = dict(c, acc=round(c["right"] / c["n"], 4))
print("final: " + json.dumps(result))
