"""
Does a model answer better when its question comes after others about the same scene? Scores val
questions (choices, yes/no and counts, teacher-forced as eval.direct_scores scores them) asked
alone after the image, and asked last after k questions drawn fresh from the scene
(data.practice_questions, drills among them), by category, with the share of questions whose object
an earlier question names ("What shape is the red object?" before "What color is the cube?"). A gap
means the model reads answers off the context: packing questions in turn teaches that, and
evaluation, one question a row, never offers it (batches.branched_row packs them without it).

    python runs/packed_context.py out/learn/rgb/ckpt.pt --data_dir=data/learn --per_category=400

Ends with `final: {json}`.
"""
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batches  # noqa: E402
import conversations  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
import probe  # noqa: E402 (runs/probe.py)

parser = probe.parser(__doc__)
parser.add_argument("--per_category", type=int, default=400)
parser.add_argument("--before", type=int, default=6, help="questions asked before the scored one")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

model, tok, codes, questions, rgb = probe.load(args)
scenes = data.load_scenes(args.data_dir, "val")
asked = [q for q in ev.balanced_sample(questions["val"], 10 ** 9) if q["answer_type"] != "number"]
asked = [q for c in sorted({q["category"] for q in asked}) for q in [x for x in asked if x["category"] == c][:args.per_category]]
rng = np.random.default_rng(args.seed)
alone, packed, named = [], [], []
for q in asked:
    g, images = scenes[q["scene"]], batches.scene_codes(codes["val"], q["scene"])
    before = data.practice_questions(g, rng, args.before, drills=True, skip=q)
    names = [data.name(next(o for o in g["objects"] if o["id"] == i)) for i in q["objects"]]
    named.append(any(n in b["question"] for n in names for b in before))
    alone.append(tok.render_conversation(conversations.packed_vqa([q]), images))
    ids, mask = tok.render_conversation(conversations.packed_vqa(before + [q]), images)
    earlier = tok.render_conversation(conversations.packed_vqa(before), images)[0]
    assert ids[:len(earlier)] == earlier  # the row begins as the earlier questions alone
    packed.append((ids, [0] * len(earlier) + mask[len(earlier):]))  # only the last answer is scored


a, p = (np.array(ev.greedy_right(model, tok, rows, 32, batches.scene_pictures(rgb, asked))) for rows in (alone, packed))
named = np.array(named)
by = collections.defaultdict(list)
for k, q in enumerate(asked):
    by[q["category"]].append(k)
print(f"{len(asked)} val questions, each alone after its image and after {args.before} others of its scene")
print(f"{'category':<18}{'n':>5}{'alone':>8}{'after':>8}{'named':>8}")
out = {}
for cat, ks in sorted(by.items()):
    out[cat] = {"n": len(ks), "alone": round(float(a[ks].mean()), 4), "after": round(float(p[ks].mean()), 4),
                "named_before": round(float(named[ks].mean()), 4)}
    print(f"{cat:<18}{len(ks):>5}{out[cat]['alone']:>8.3f}{out[cat]['after']:>8.3f}{out[cat]['named_before']:>8.3f}")
print("final: " + json.dumps({"ckpt": args.ckpt, "before": args.before, "alone": round(float(a.mean()), 4),
                              "after": round(float(p.mean()), 4), "by_category": out}))
