"""
Can an object's shape be seen at all? A small CNN is trained on crops of every named object of the
train scenes (its box around the segment, squared, resized to 16×16) to name its shape, and scored
on val, by the object's size in pixels (quartiles). With --decoded the crops come from the images
as the VQ codes give them back (vqgan.decode), which is all a model reading codes has. The two
figures bound what a model reading this data can learn about shape: the data itself, and what the
VQ round trip keeps.

    python runs/shape_ceiling.py --data_dir=data/learn [--decoded --vq_ckpt=out/vqgan_learn/ckpt.pt]

Ends with `final: {json}`.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import vqgan  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default="data/learn")
parser.add_argument("--decoded", action="store_true", help="crop the VQ round trip of each image instead of its pixels")
parser.add_argument("--vq_ckpt", default="out/vqgan_learn/ckpt.pt")  # bench.py learn's
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
torch.manual_seed(args.seed)
vq = vqgan.load_vqgan(args.vq_ckpt) if args.decoded else None


def crops(split):
    """(crops (N, 3, 16, 16), shapes (N,), visible pixels (N,)) of the split's named objects."""
    s = data.load_split(args.data_dir, split)
    rgb = s["rgb"]
    if vq is not None:
        codes = vqgan.load_codes(args.data_dir, split)[:, data.MODALITIES.index("rgb")]
        rgb = np.concatenate([vq.decode(codes[k:k + 256]).numpy() for k in range(0, len(codes), 256)])
    out, shapes, pixels = [], [], []
    for i, g in enumerate(s["scenes"]):
        for o in g["objects"]:
            if o["visible_pixels"] < g["min_visible"]:
                continue
            ys, xs = np.nonzero(s["seg"][i] == o["id"])
            side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 3
            cy, cx = (ys.min() + ys.max()) // 2 + side, (xs.min() + xs.max()) // 2 + side
            img = np.pad(rgb[i].astype(np.float32) / 255, ((side, side), (side, side), (0, 0)))
            crop = torch.from_numpy(img[cy - side // 2:cy - side // 2 + side, cx - side // 2:cx - side // 2 + side])
            out.append(F.interpolate(crop.permute(2, 0, 1)[None], size=(16, 16), mode="bilinear", align_corners=False)[0])
            shapes.append(data.SHAPES.index(o["shape"]))
            pixels.append(o["visible_pixels"])
    return torch.stack(out), torch.tensor(shapes), np.array(pixels)


(xt, yt, _), (xv, yv, pv) = crops("train"), crops("val")
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                    nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, len(data.SHAPES)))
opt = torch.optim.AdamW(net.parameters(), 2e-3)
for epoch in range(args.epochs):
    for j in torch.randperm(len(xt)).split(128):
        loss = F.cross_entropy(net(xt[j]), yt[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = (net(xv).argmax(-1) == yv).numpy()
    print(f"epoch {epoch}: {len(xt)} train objects, val shape accuracy {right.mean():.3f}")
edges = np.quantile(pv, [0, 0.25, 0.5, 0.75, 1])
print(f"\n{'pixels':<12}{'n':>5}{'shape':>8}   ({'VQ round trip' if args.decoded else 'true pixels'}, val)")
by_size = []
for lo, hi in zip(edges[:-1], edges[1:]):
    k = (pv >= lo) & (pv <= hi)
    by_size.append(round(float(right[k].mean()), 4))
    print(f"{f'{lo:.0f}-{hi:.0f}':<12}{k.sum():>5}{right[k].mean():>8.3f}")
print("final: " + json.dumps({"data_dir": args.data_dir, "decoded": args.decoded, "val_objects": len(yv),
                              "shape_acc": round(float(right.mean()), 4), "by_size_quartile": by_size,
                              "pixel_quartiles": edges.round(1).tolist()}))
