"""
How well could "How far apart are the A and the B?" be answered by a model that knows each object's
distance to the camera only as well as the trained models do? No model here: each val question's
two objects keep their image direction and have their distance to the camera scaled by log-normal
noise of width sigma; the distance apart on the ground computed from the two noisy positions is
scored by MRA, beside what the same noise does to distance to the camera. The trained models
answer distance to the camera at MRA 0.83–0.88 and distance apart at its prior (docs/experiments.md).

    python runs/apart_ceiling.py --data_dir=data/learn

Ends with `final: {json}`.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import metrics  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default="data/learn")
parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.05, 0.08, 0.12, 0.2])
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

scenes = data.load_scenes(args.data_dir, "val")
distance = [q for q in data.load_questions(args.data_dir, "val") if q["kind"] == "distance"]
apart = [q for q in distance if len(q["objects"]) == 2]
to_camera = [q for q in distance if len(q["objects"]) == 1]
rng = np.random.default_rng(args.seed)


def ground_point(obj, scale):
    """Where on the ground the object's centre seems to be if its distance to the camera is off by
    scale (the camera stands at x = z = 0 and has no yaw)."""
    x, _, z = obj["position"]
    return np.array([x, z]) * scale


result = {"apart": len(apart), "to_camera": len(to_camera)}
print(f"{'sigma':>6}{'to the camera':>15}{'apart':>8}   (MRA over val questions)")
for sigma in args.sigmas:
    noise = lambda: math.exp(rng.normal(0, sigma))
    cam = np.mean([metrics.mra(q["value"] * noise(), q["value"]) for q in to_camera])
    scores = []
    for q in apart:
        graph = scenes[q["scene"]]
        a, b = ([o for o in graph["objects"] if o["id"] == i][0] for i in q["objects"])
        pa, pb = ground_point(a, noise()), ground_point(b, noise())
        scores.append(metrics.mra(float(data.number_text(np.linalg.norm(pa - pb), "m").split()[0]), q["value"]))
    print(f"{sigma:>6}{cam:>15.3f}{np.mean(scores):>8.3f}")
    result[f"sigma {sigma}"] = {"to_camera": round(float(cam), 4), "apart": round(float(np.mean(scores)), 4)}
print("final: " + json.dumps(result))
