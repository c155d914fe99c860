"""
Where does a model look when it begins an answer? For val questions asked one a row after their
image, the attention that each head of each layer puts, at the position of <answer> (the one that
predicts the first answer word), on the places the question's first and second objects cover
(grounding.referents, grounding.referent_places: what the referring loss teaches, losses.py "Referring"),
and on the places of the scene's other objects, against the share of the visible keys those places
are (what uniform attention would put there). A head that has learned the lookup is far above
that share on the named object and not on the others; one that looks at objects in general is
above it on both. With an object head, also what it sees there: whether the head's most common
class over the first object's places has that object's colour and shape, by the object's size in
pixels (quartiles). A lookup can only answer what the places show. For counts of two or more,
the referring head's (head 0 of the referring layer) mass on the largest and the smallest counted
object apart, and how often the first answer word is right where it all but passes the smallest
by (under a quarter of the largest's mass) and where it does not: is a missed count a missed look?

    python runs/where_it_looks.py out/learn/rgb/ckpt.pt --data_dir=data/learn --n=800
    python runs/where_it_looks.py out/learn_maps/maps/ckpt.pt --category=counting

Ends with `final: {json}`.
"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batches  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
import grounding  # noqa: E402
import probe  # noqa: E402 (runs/probe.py)
from losses import attention_logp, place_attention  # noqa: E402
from model import first_image, repeat_kv  # noqa: E402

parser = probe.parser(__doc__)
parser.add_argument("--n", type=int, default=800, help="val questions, balanced over categories")
parser.add_argument("--category", default="", help="every val question of this category instead (e.g. counting)")
args = parser.parse_args()

model, tok, codes, questions, rgb = probe.load(args)
n_image = codes["val"].shape[-1]
split = data.load_split(args.data_dir, "val")
coverage = grounding.place_coverage(split["seg"], math.isqrt(n_image))
asked = [q for q in (ev.balanced_sample(questions["val"], args.n) if not args.category else
                     [q for q in questions["val"] if q["category"] == args.category]) if grounding.referents(q)]
inputs = []  # each block's positional inputs in the last forward: (x, rope_q, rope_k, cache, prior, mask)
for block in model.blocks:
    block.register_forward_pre_hook(lambda m, a: inputs.append(a))
final = {}  # the last hidden states, where the object head reads
model.ln_f.register_forward_hook(lambda m, i, o: final.__setitem__("h", o))
seen = []  # (pixels, colour right, shape right) of each question's first object, as the object head names it
looks = []  # (mass on the largest, on the smallest counted object, first answer word right) of each count of 2+
L, H = model.config.n_layer, model.config.n_head
GROUPS = ("first object", "second object", "other objects")
mass, share, counted = np.zeros((3, L, H)), np.zeros(3), np.zeros(3)
ids = np.arange(coverage.shape[-1])
with torch.no_grad():
    for i in range(0, len(asked), 32):
        chunk = asked[i:i + 32]
        rows = batches.vqa_rows(tok, chunk, codes["val"])
        x, _, m = batches.make_batch(tok, rows, model.config.block_size)
        t = batches.refer_targets(tok, x, m, [[q] for q in chunk], [coverage[q["scene"]] for q in chunk], 2)
        inputs.clear()
        logits, _ = model(x, rgb=batches.scene_pictures(rgb, chunk))
        b, pos = (t["refer_at"] >= 0).nonzero(as_tuple=True)
        first = first_image(x, model.config.image_offset, n_image)[b]  # (n, T)
        others = [grounding.referent_places(coverage[q["scene"]], ids[(ids >= 2) & ~np.isin(ids, q["objects"])]) for q in chunk]
        named = torch.cat([t["refer"][b, 0], torch.from_numpy(np.stack(others))[b, None]], 1)  # (n, 3, places)
        has = named.any(-1)  # (n, 3)
        for layer, (block, (h, rope_q, rope_k, _, prior, _)) in enumerate(zip(model.blocks, inputs)):
            q, k, _ = block.attn.project(block.ln_1(h), rope_q, rope_k, prior)
            k = repeat_kv(k, q.size(1))
            for g in range(3):
                log_mass = place_attention(attention_logp(q, k, None, b, pos), first, named[:, g, None].expand(-1, H, -1))
                mass[g, layer] += log_mass.exp()[has[:, g]].sum(0).numpy()
        block, (h, rope_q, rope_k, _, prior, _) = model.blocks[model.config.refer_layer], inputs[model.config.refer_layer]
        q, k, _ = block.attn.project(block.ln_1(h), rope_q, rope_k, prior)
        logp = attention_logp(q, repeat_kv(k, q.size(1)), None, b, pos)[:, :1]  # the first referring head
        for j, r in enumerate(b.tolist()):
            asked_q = chunk[r]
            if asked_q["category"] != "counting" or len(asked_q["objects"]) < 2:
                continue
            c = coverage[asked_q["scene"]]
            ends = [max(asked_q["objects"], key=lambda o: c[:, o].sum()), min(asked_q["objects"], key=lambda o: c[:, o].sum())]
            on = [place_attention(logp[j:j + 1], first[j:j + 1], torch.from_numpy(grounding.referent_places(c, [o]))[None, None])
                  .exp().item() for o in ends]
            looks.append((*on, tok.decode([int(logits[r, pos[j]].argmax())]).strip() == asked_q["answer"]))
        for g in range(3):
            share[g] += (named[:, g].sum(-1) / (pos + 1))[has[:, g]].sum().item()
            counted[g] += has[:, g].sum().item()
        if hasattr(model, "object_head"):
            classes = model.object_head(final["h"]).argmax(-1)  # (B, T): 1 + colour * 3 + shape, 0 for none
            for j, r in enumerate(b.tolist()):
                q = chunk[r]
                if len(grounding.referents(q)[0]) != 1 or not has[j, 0]:
                    continue
                votes = classes[r][first[j]][named[j, 0]]
                votes = votes[votes > 0]
                o = next(o for o in split["scenes"][q["scene"]]["objects"] if o["id"] == q["objects"][0])
                c = int(votes.mode().values) - 1 if len(votes) else -1
                seen.append((o["visible_pixels"], c >= 0 and list(data.COLORS)[c // 3] == o["color"],
                             c >= 0 and data.SHAPES[c % 3] == o["shape"]))
mass, share = mass / counted[:, None, None], share / counted
out = {"ckpt": args.ckpt, "questions": len(asked)}
for g, what in enumerate(GROUPS):
    print(f"\nattention on the places of the {what} at <answer> ({int(counted[g])} questions; uniform: {share[g]:.3f})")
    print("layer" + "".join(f"{f'head {h}':>9}" for h in range(H)))
    for layer in range(L):
        print(f"{layer:<5}" + "".join(f"{mass[g, layer, h]:>9.3f}" for h in range(H)))
    out[what.replace(" ", "_")] = {"n": int(counted[g]), "uniform": round(float(share[g]), 4),
                        "best": round(float(mass[g].max()), 4), "mass": np.round(mass[g], 4).tolist()}
if seen:
    px, colour, shape = (np.array(v) for v in zip(*seen))
    edges = np.quantile(px, [0, 0.25, 0.5, 0.75, 1])
    print(f"\nthe object head over the first object's places ({len(px)} questions): right colour / shape")
    print(f"{'pixels':<12}{'n':>5}{'colour':>8}{'shape':>8}")
    for lo, hi in zip(edges[:-1], edges[1:]):
        k = (px >= lo) & (px <= hi)
        print(f"{f'{lo:.0f}-{hi:.0f}':<12}{k.sum():>5}{colour[k].mean():>8.3f}{shape[k].mean():>8.3f}")
    print(f"{'all':<12}{len(px):>5}{colour.mean():>8.3f}{shape.mean():>8.3f}")
    out["object_head"] = {"n": len(px), "colour": round(float(colour.mean()), 4), "shape": round(float(shape.mean()), 4),
                          "pixel_quartiles": edges.round(1).tolist()}
if looks:
    large, small, right = (np.array(v) for v in zip(*looks))
    passed = small < large / 4
    print(f"\ncounts of 2+ ({len(right)}): the referring head's mass on the largest counted object {large.mean():.3f}, "
          f"on the smallest {small.mean():.3f}; first word right where the smallest gets under a quarter of the "
          f"largest's mass {right[passed].mean():.3f} ({passed.sum()}), elsewhere {right[~passed].mean():.3f} ({(~passed).sum()})")
    out["counting_looks"] = {"n": len(right), "largest": round(float(large.mean()), 4), "smallest": round(float(small.mean()), 4),
                             "passed_by": int(passed.sum()), "right_passed_by": round(float(right[passed].mean()), 4),
                             "right_else": round(float(right[~passed].mean()), 4)}
print("final: " + json.dumps(out))
