"""
Where does counting go wrong? bench.py learn gives one counting figure; this splits it by the true
count and by what is counted (a colour: "How many red objects are there?", or a shape: "How many
cubes are there?"), and lists the confusions (true count -> greedy answer), over every val counting
question. A model that finds the counted objects but cannot tell how many there are answers 0s and
1s right and every larger count with the same number.

    python runs/counting.py out/learn/rgb/ckpt.pt --data_dir=data/learn

Ends with `final: {json}`.
"""
import argparse
import collections
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as ev  # noqa: E402
import metrics  # noqa: E402
import prepare  # noqa: E402
import trainer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("ckpt", help="a model trained on data_dir's scenes (bench.py learn writes out_dir/rgb/ckpt.pt)")
parser.add_argument("--data_dir", default="data/learn")
parser.add_argument("--vq_ckpt", default="out/vqgan/ckpt.pt")
args = parser.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

model, _ = trainer.load_model(args.ckpt)
model.eval()
tok, _, codes, questions, _ = prepare.stage_data(args.data_dir, args.vq_ckpt)
asked = [q for q in questions["val"] if q["category"] == "counting"]
replies = ev.answer(model, tok, asked, codes["val"], codes["val"].shape[-1], temperature=0.0)
scores = metrics.question_scores(tok, asked, replies)
groups, confusions = collections.defaultdict(list), collections.Counter()
for q, s in zip(asked, scores):
    what = "shape" if any(f"many {shape}s" in q["question"] for shape in data.SHAPES) else "colour"
    count = q["answer"] if int(q["answer"]) < 3 else "3+"
    for key in ("all", f"count {count}", what, f"{what} count {count}"):
        groups[key].append(s["score"])
    confusions[(q["answer"], s["answer"].strip())] += 1
result = {"ckpt": args.ckpt}
print(f"{'questions':<20}{'n':>5}{'accuracy':>10}")
for key, v in sorted(groups.items()):
    print(f"{key:<20}{len(v):>5}{np.mean(v):>10.3f}")
    result[key] = {"n": len(v), "acc": round(float(np.mean(v)), 4)}
print("true -> answered: " + ", ".join(f"{t} -> {a!r} ×{n}" for (t, a), n in sorted(confusions.items())))
print("final: " + json.dumps(result))
