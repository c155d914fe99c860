"""
Where does counting go wrong? bench.py learn gives one counting figure; this splits it by the true
count and by what is counted (a colour: "How many red objects are there?", or a shape: "How many
cubes are there?"), and lists the confusions (true count -> greedy answer), over every val counting
question. A model that finds the counted objects but cannot tell how many there are answers 0s and
1s right and every larger count with the same number. Counts of 1, and of 2 or more, are also split
by how much of the image the smallest counted object covers, in multiples of the least a named
object may show (the scene's min_visible): is a miss a small object not seen, or not counted?
With --mode=chain_true (a maps-arm model) the questions are asked after the scene's true depth and
seg maps, as the perception chain asks them: does the seg map, which paints each object in its own
colour, make counting easier?

    python runs/counting.py out/learn/rgb/ckpt.pt --data_dir=data/learn

Ends with `final: {json}`.
"""
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as ev  # noqa: E402
import metrics  # noqa: E402
import probe  # noqa: E402 (runs/probe.py)

parser = probe.parser(__doc__)
parser.add_argument("--mode", default="direct", choices=("direct", "chain", "chain_true"), help="eval.answer's mode")
args = parser.parse_args()

model, tok, codes, questions, rgb = probe.load(args)
asked = [q for q in questions["val"] if q["category"] == "counting"]
scenes = data.load_scenes(args.data_dir, "val")
replies = ev.answer(model, tok, asked, codes["val"], codes["val"].shape[-1], mode=args.mode, temperature=0.0, rgb=rgb)
scores = metrics.question_scores(tok, asked, replies)
groups, confusions = collections.defaultdict(list), collections.Counter()
for q, s in zip(asked, scores):
    what = "shape" if any(f"many {shape}s" in q["question"] for shape in data.SHAPES) else "colour"
    count = q["answer"] if int(q["answer"]) < 3 else "3+"
    keys = ["all", f"count {count}", what, f"{what} count {count}"]
    if int(q["answer"]) >= 1:
        g = scenes[q["scene"]]
        smallest = min(o["visible_pixels"] for o in g["objects"] if o["id"] in q["objects"]) / g["min_visible"]
        keys.append(("1" if q["answer"] == "1" else "2+") + ", smallest "
                    + ("< 1.5x" if smallest < 1.5 else "1.5-2x" if smallest < 2 else ">= 2x"))
    for key in keys:
        groups[key].append(s["score"])
    confusions[(q["answer"], s["answer"].strip())] += 1
result = {"ckpt": args.ckpt, "mode": args.mode}
print(f"{'questions':<20}{'n':>5}{'accuracy':>10}")
for key, v in sorted(groups.items()):
    print(f"{key:<20}{len(v):>5}{np.mean(v):>10.3f}")
    result[key] = {"n": len(v), "acc": round(float(np.mean(v)), 4)}
print("true -> answered: " + ", ".join(f"{t} -> {a!r} ×{n}" for (t, a), n in sorted(confusions.items())))
print("final: " + json.dumps(result))
