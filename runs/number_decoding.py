"""
How should a model's number answer be read off it? MRA scores a length by how near it is, and
greedy decoding writes the likeliest first digit, then the likeliest next: a mode digit by digit
("1" gathers every height from 100 to 199 cm), not the middle of what the model believes. This
scores val number questions (bench.py learn's balanced sample, or all of them with --per_category
large) three ways: greedy, one answer sampled at temperature 1, and the median of k sampled
answers (eval.median_numbers, what every evaluation now uses), by question kind (distance to the
camera, distance apart, size), beside the chance baseline (the train median of the template).

    python runs/number_decoding.py out/learn/rgb/ckpt.pt --data_dir=data/learn
    python runs/number_decoding.py out/learn/blind/ckpt.pt --data_dir=data/learn --blind

Ends with `final: {json}`.
"""
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402
import metrics  # noqa: E402
import probe  # noqa: E402 (runs/probe.py)

parser = probe.parser(__doc__)
parser.add_argument("--blind", action="store_true", help="ask without the image (a blind baseline's checkpoint)")
parser.add_argument("--samples", type=int, default=ev.NUMBER_SAMPLES, help="answers whose median is taken")
parser.add_argument("--per_category", type=int, default=400, help="val questions a category, as bench.py learn")
args = parser.parse_args()

model, tok, codes, questions, rgb = probe.load(args)
n_image = codes["val"].shape[-1]
cats = sorted({q["category"] for q in questions["val"]})
asked = [q for q in ev.balanced_sample(questions["val"], args.per_category * len(cats)) if q["answer_type"] == "number"]
chance = metrics.chance_scorer(questions["train"])
ways = {"greedy": dict(temperature=0.0, number_samples=1), "one sample": dict(temperature=1.0, number_samples=1),
        f"median of {args.samples}": dict(temperature=0.0, number_samples=args.samples)}
scores = {way: metrics.question_scores(tok, asked, ev.answer(model, tok, asked, codes["val"], n_image, blind=args.blind,
                                                             seed=0, rgb=rgb, **kw)) for way, kw in ways.items()}
kinds = collections.defaultdict(list)
for k, q in enumerate(asked):
    kinds["distance apart" if "apart" in q["question"] else q["category"]].append(k)
result = {"ckpt": args.ckpt, "blind": args.blind}
print(f"{'kind':<16}{'n':>5}{'chance':>8}" + "".join(f"{w:>14}" for w in ways))
for kind, ks in sorted(kinds.items()):
    row = {"n": len(ks), "chance": round(float(np.mean([chance(asked[k]) for k in ks])), 4)}
    row.update({w: round(float(np.mean([s[k]["score"] for k in ks])), 4) for w, s in scores.items()})
    print(f"{kind:<16}{row['n']:>5}{row['chance']:>8.3f}" + "".join(f"{row[w]:>14.4f}" for w in ways))
    result[kind] = row
for cat in ("distance", "size"):  # bench.py learn's categories
    result[f"{cat} ({args.samples})"] = round(float(np.mean([scores[f"median of {args.samples}"][k]["score"]
                                                             for k, q in enumerate(asked) if q["category"] == cat])), 4)
print("final: " + json.dumps(result))
