"""
What does the answer read off the objects it finds? runs/where_it_looks.py shows the last layer's
heads looking at a comparison's two objects; this asks whether what they bring back says where
those objects are. For val questions that compare two objects (depth order and relation_left,
the options in the question's order), a linear probe (logistic regression, fit on
half the questions, scored on the other half) predicts the fact the answer needs from:
- "looking heads": the attention outputs at <answer> of the first two heads of the layer the
  referring loss teaches (losses.py, "Referring"), taught to look at the question's first and
  second referent (grounding.referents: the answer's object, then the other one);
- "answer state": the residual stream at <answer> after the last layer (what the head reads);
- "place table": the model's own place embedding (wpe_image) averaged over each object's places:
  what a perfect lookup of position alone would bring back, the ceiling of position as it is coded.
The facts, in the options' order: which object is lower in the image (its centre's row; the lower one is nearer for 98%
of pairs), which is nearer the camera, and which is further left. Beside them, the model's own
answers, and how much attention each looking head puts on its own referent and on the other one.
A fact the probes read but the answers miss is there and unused; one the place table holds and
the looking heads do not is lost on the way; one the place table lacks is not coded.

    python runs/what_it_reads.py out/learn/rgb/ckpt.pt --data_dir=data/learn

Ends with `final: {json}`.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batches  # noqa: E402
import data  # noqa: E402
import grounding  # noqa: E402
import probe  # noqa: E402 (runs/probe.py)
from losses import attention_logp, place_attention  # noqa: E402
from model import first_image, repeat_kv  # noqa: E402

parser = probe.parser(__doc__, "a model trained on data_dir's scenes with refer_heads >= 2 (bench.py learn writes out_dir/rgb/ckpt.pt)")
args = parser.parse_args()
torch.manual_seed(0)

model, tok, codes, questions, rgb = probe.load(args)
n_image = codes["val"].shape[-1]
side = math.isqrt(n_image)
split = data.load_split(args.data_dir, "val")
coverage = grounding.place_coverage(split["seg"], side)


def pair(q):
    """The two compared objects in the order the question offers them, or None."""
    if q["kind"] in ("depth_order", "relation_left"):
        return grounding.option_objects(q, split["scenes"][q["scene"]])
    return None


asked = [q for q in questions["val"] if pair(q)]
inputs = []  # the referring block's input in each forward
model.blocks[model.config.refer_layer].register_forward_pre_hook(lambda m, a: inputs.append(a))
final = {}
model.ln_f.register_forward_hook(lambda m, i, o: final.__setitem__("h", o))
feats = {"looking heads": [], "answer state": [], "place table": []}
facts = {"lower": [], "nearer": [], "left": []}
right, kinds, found = [], [], []  # found: (questions, 2, 2) the attention of head h on the h-th object, and on the other
with torch.no_grad():
    for i in range(0, len(asked), 32):
        chunk = asked[i:i + 32]
        rows = batches.vqa_rows(tok, chunk, codes["val"])
        x, y, m = batches.make_batch(tok, rows, model.config.block_size)
        inputs.clear()
        logits, _ = model(x, rgb=batches.scene_pictures(rgb, chunk))
        pos = ((x == tok.answer) & (m == 1)).float().argmax(1)  # each row's one <answer>
        b = torch.arange(len(chunk))
        h, rope_q, rope_k, _, prior, _ = inputs[0]
        block = model.blocks[model.config.refer_layer]
        q_, k_, v_ = block.attn.project(block.ln_1(h), rope_q, rope_k, prior)
        k_, v_ = repeat_kv(k_, q_.size(1)), repeat_kv(v_, q_.size(1))
        out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)  # (B, H, T, D)
        feats["looking heads"].append(out[b, :2, pos].flatten(1))
        first = first_image(x, model.config.image_offset, n_image)
        targets = torch.stack([torch.stack([torch.from_numpy(grounding.referent_places(coverage[q["scene"]], g))
                                            for g in grounding.referents(q)[:2]]) for q in chunk])  # (B, 2, places): head h's
        logp = attention_logp(q_[:, :2], k_[:, :2], None, b, pos)
        found.append(torch.stack([place_attention(logp, first, targets).exp(),
                                  place_attention(logp, first, targets.flip(1)).exp()], 1))  # (B, own/other, heads)
        feats["answer state"].append(final["h"][b, pos])
        for r, q in enumerate(chunk):
            scene = split["scenes"][q["scene"]]
            objs = {o["id"]: o for o in scene["objects"]}
            a, c = (objs[j] for j in pair(q))
            places = [torch.from_numpy(grounding.referent_places(coverage[q["scene"]], [o["id"]])) for o in (a, c)]
            feats["place table"].append(torch.cat([model.wpe_image.weight[p].mean(0) for p in places]))
            facts["lower"].append(a["centroid"][1] > c["centroid"][1])
            facts["nearer"].append(data.camera_distance(scene, a) < data.camera_distance(scene, c))
            facts["left"].append(a["centroid"][0] < c["centroid"][0])
            right.append(bool((logits[r].argmax(-1) == y[r])[m[r] == 1].all()))  # every answer token, greedy
            kinds.append(q["kind"])


def probe(X, t, steps=200):
    """Accuracy on the second half of a logistic regression fit (L-BFGS, L2) on the first half."""
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    n = len(X) // 2
    w = torch.zeros(X.shape[1] + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
    Xb = torch.cat([X, torch.ones(len(X), 1)], 1)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(Xb[:n] @ w, t[:n]) + 1e-2 * w[:-1].square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    return float(((Xb[n:] @ w > 0).float() == t[n:]).float().mean())


result = {"ckpt": args.ckpt}
kinds, right = np.array(kinds), np.array(right)
for kind, needs in (("depth_order", "nearer"), ("relation_left", "left")):
    k = torch.from_numpy(kinds == kind)
    if not k.any():
        continue
    mass = torch.cat(found)[k].mean(0)
    print(f"\n{kind}: {int(k.sum())} questions; the model's answers right {right[kinds == kind].mean():.3f}; "
          f"heads 0 and 1 put {mass[0, 0]:.3f} and {mass[0, 1]:.3f} of their attention on their own referent "
          f"(the first and second), and {mass[1, 0]:.3f} and {mass[1, 1]:.3f} on the other one")
    print(f"{'probe from':<16}" + "".join(f"{f:>9}" for f in facts))
    row = {"n": int(k.sum()), "answers": round(float(right[kinds == kind].mean()), 4),
           "attention_on_own_object": [round(float(a), 4) for a in mass[0]],
           "attention_on_other_object": [round(float(a), 4) for a in mass[1]]}
    for name, parts in feats.items():
        X = torch.cat(parts) if parts[0].dim() == 2 else torch.stack(parts)
        accs = {f: probe(X[k].float(), torch.tensor(v)[k].float()) for f, v in facts.items()}
        print(f"{name:<16}" + "".join(f"{a:>9.3f}" for a in accs.values()))
        row[name.replace(" ", "_")] = {f: round(a, 4) for f, a in accs.items()}
    row["base_rate"] = {f: round(float(torch.tensor(v)[k].float().mean()), 4) for f, v in facts.items()}
    print(f"{'(base rate)':<16}" + "".join(f"{a:>9.3f}" for a in row["base_rate"].values()))
    print(f"(the answer needs: {needs})")
    result[kind] = row
print("final: " + json.dumps(result))
