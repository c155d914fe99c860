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
colour, make counting easier? A model with the anchor head (losses.py, "Place heads") is also
scored by what that head alone says: the number of places it marks with a class of the asked
colour or shape. Right where the answer is wrong, the count is in the photo's places and the
answer does not read it.

    python runs/counting.py out/learn/rgb/ckpt.pt --data_dir=data/learn

Ends with `final: {json}`.
"""
import collections
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batches  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
import metrics  # noqa: E402
import probe  # noqa: E402 (runs/probe.py)
from model import first_image  # noqa: E402

parser = probe.parser(__doc__)
parser.add_argument("--mode", default="direct", choices=("direct", "chain", "chain_true"), help="eval.answer's mode")
args = parser.parse_args()

model, tok, codes, questions, rgb = probe.load(args)
asked = [q for q in questions["val"] if q["category"] == "counting"]
scenes = data.load_scenes(args.data_dir, "val")
replies = ev.answer(model, tok, asked, codes["val"], codes["val"].shape[-1], mode=args.mode, temperature=0.0, rgb=rgb)
scores = metrics.question_scores(tok, asked, replies)


def counted_by(q):
    """What a counting question counts: ("shape", index in data.SHAPES) or ("colour", index in data.COLORS)."""
    shape = next((k for k, sh in enumerate(data.SHAPES) if f"many {sh}s" in q["question"]), None)
    if shape is not None:
        return "shape", shape
    return "colour", next((k for k, c in enumerate(data.COLORS) if f" {c} " in q["question"]), None)


def anchor_counts(questions):
    """The anchor head's count for each question: its marks at the question image's places whose
    class has the asked shape, or colour."""
    hidden = {}
    model.ln_f.register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
    counts = []
    with torch.no_grad():
        for at in range(0, len(questions), 64):
            chunk = questions[at:at + 64]
            x, _, _ = batches.make_batch(tok, batches.vqa_rows(tok, chunk, codes["val"]), model.config.block_size)
            model(x, rgb=batches.scene_pictures(rgb, chunk))
            first = first_image(x, model.config.image_offset, codes["val"].shape[-1])
            marks = model.anchor_head(hidden["h"][first]).argmax(-1).view(len(chunk), -1) - 1  # colour * 3 + shape, -1 none
            for q, m in zip(chunk, marks.tolist()):
                what, k = counted_by(q)
                counts.append(sum(c >= 0 and (c % len(data.SHAPES) if what == "shape" else c // len(data.SHAPES)) == k
                                  for c in m))
    return counts


anchored = anchor_counts(asked) if hasattr(model, "anchor_head") else None
groups, confusions = collections.defaultdict(list), collections.Counter()
for i, (q, s) in enumerate(zip(asked, scores)):
    what = counted_by(q)[0]
    count = q["answer"] if int(q["answer"]) < 3 else "3+"
    keys = ["all", f"count {count}", what, f"{what} count {count}"]
    if int(q["answer"]) >= 1:
        g = scenes[q["scene"]]
        smallest = min(o["visible_pixels"] for o in g["objects"] if o["id"] in q["objects"]) / g["min_visible"]
        keys.append(("1" if q["answer"] == "1" else "2+") + ", smallest "
                    + ("< 1.5x" if smallest < 1.5 else "1.5-2x" if smallest < 2 else ">= 2x"))
    for key in keys:
        groups[key].append(s["score"])
    if anchored is not None:
        right = anchored[i] == int(q["answer"])
        groups[f"anchor head, count {count}"].append(right)
        groups["anchor head, answer " + ("right" if s["score"] else "wrong")].append(right)
    confusions[(q["answer"], s["answer"].strip())] += 1
result = {"ckpt": args.ckpt, "mode": args.mode}
print(f"{'questions':<20}{'n':>5}{'accuracy':>10}")
for key, v in sorted(groups.items()):
    print(f"{key:<20}{len(v):>5}{np.mean(v):>10.3f}")
    result[key] = {"n": len(v), "acc": round(float(np.mean(v)), 4)}
print("true -> answered: " + ", ".join(f"{t} -> {a!r} ×{n}" for (t, a), n in sorted(confusions.items())))
print("final: " + json.dumps(result))
