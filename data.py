"""
The data nanoCOOPER trains and is judged on.

A tiny numpy ray caster renders 3D scenes of cubes, spheres and cylinders on a textured ground
plane. From one scene graph it produces, exactly and at once:
  - rgb    uint8 H×W×3: Lambert shading (one directional light plus ambient)
  - depth  float32 H×W metres: z-depth along the camera axis; sky (and ground beyond DEPTH_MAX) is DEPTH_MAX
  - seg    uint8 H×W: 0 sky, 1 ground, 2… objects, numbered left to right by their mask's centroid
and spatial questions whose answers are computed from the scene graph, so every label is exact.

COOPER's trick is to turn depth and segmentation into RGB-like "pseudo-images" so one image
generator can produce all three: `depth_to_rgb`/`rgb_to_depth` and `seg_to_rgb`/`rgb_to_seg`. The
segmentation pseudo-image paints each object in its own colour's palette entry (`seg_palette_ids`).

Real data enters through manifest.py: a JSONL of image/depth/seg files and questions.

    python data.py                       # write the tiny preset's train/val/test splits to data/tiny
    python data.py --n_train=20000 --image_size=128 --out_dir=data/small
"""
import collections
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

# --- constants: one place for everything a conversion depends on --------------------------------
DEPTH_MIN, DEPTH_MAX = 0.5, 25.0  # metres; the pseudo-image range is absolute, so decoded maps are metric
# Log depth spreads the 256 grey levels evenly in relative terms (~1.5% a step over 0.5–25 m);
# linear would give ~0.1 m steps, i.e. ~5% at 2 m. See `depth_to_rgb`.
DEPTH_ENCODING = "log"
COLORS = {  # name -> albedo (0..1)
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.70, 0.20), "blue": (0.15, 0.30, 0.90),
    "yellow": (0.92, 0.85, 0.15), "purple": (0.55, 0.20, 0.75), "orange": (0.95, 0.50, 0.10),
    "cyan": (0.15, 0.80, 0.85), "white": (0.92, 0.92, 0.92),
}
SHAPES = ("cube", "sphere", "cylinder")
# Segmentation palette: sky, ground, the eight object colours' own entries (in COLORS' order, each
# near the colour it stands for, so a map reads at a glance), then six spares for a second object
# of one colour (seg_palette_ids); all far apart in RGB so a lossy image tokenizer cannot blur one
# into another.
SEG_PALETTE = np.array([
    (0, 0, 0), (128, 128, 128),
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (245, 130, 48),
    (70, 240, 240), (255, 255, 255), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (170, 110, 40), (128, 0, 0),
], dtype=np.uint8)
N_SPARE = len(SEG_PALETTE) - 2 - len(COLORS)
SEG_COLOURING = 2  # a VQ checkpoint's record of its seg pseudo-images: 2, each object its colour's entry; 1, left to right
MODALITIES = ("rgb", "depth", "seg")
SPLITS = ("train", "val", "test")
CATEGORIES = ("distance", "size", "depth_order", "relative_distance", "relation", "counting", "general")
DRILLS = ("exist", "where")  # the grounding drills' kinds (drill_questions), asked in training only
QUESTION_FORMAT = 2  # meta.json's record of how questions are asked: 2, multiple choice answered with one word (offered)
# Tool flag per question kind, the rule the CPR reward relies on: depth helps metric and ordering
# questions, segmentation helps counting and left/right localisation, neither helps colour/shape.
TOOL_FOR = {"distance": "depth", "size": "depth", "depth_order": "depth", "relative_distance": "depth",
            "relation_front": "depth", "relation_left": "seg", "counting": "seg", "general": "none",
            "exist": "none", "where": "seg"}  # the last two: training drills (drill_questions)


@dataclass
class SceneConfig:
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 6
    # Objects stand 2.5..far metres in front of the camera, and a question names one only when it
    # covers min_visible pixels (at 64×64; scaled by area). Nearer and larger than the first
    # settings (8.0 and 16): at those, the VQ round trip kept the shape of only 60% of the smallest
    # named objects, and every question names its object by shape (docs/experiments.md, "Shape is
    # the missing percept").
    min_visible: int = 48
    far: float = 6.0


# --- the ray caster ------------------------------------------------------------------------------
def sample_scene(rng, cfg):
    """A scene graph: camera and non-interpenetrating objects with distinct (colour, shape) pairs,
    so "the red cube" always names exactly one object."""
    cam = {"height": float(rng.uniform(1.3, 2.2)), "pitch": float(np.radians(rng.uniform(12, 24))),
           "fov": float(np.radians(rng.uniform(50, 65)))}
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    kinds = rng.permutation(len(COLORS) * len(SHAPES))[:n]
    objects = []
    for k in kinds:
        color, shape = list(COLORS)[k // len(SHAPES)], SHAPES[k % len(SHAPES)]
        for _ in range(100):  # rejection sampling of a free footprint in front of the camera
            z = rng.uniform(2.5, cfg.far)
            x = rng.uniform(-0.45, 0.45) * z
            if shape == "sphere":
                size = rng.uniform(0.25, 0.6)  # radius
                dims = {"radius": size}
                footprint, height = size, 2 * size
            elif shape == "cube":
                size = rng.uniform(0.4, 1.1)  # side
                dims = {"side": size, "yaw": float(rng.uniform(0, np.pi / 2))}
                footprint, height = size / math.sqrt(2), size
            else:
                r, h = rng.uniform(0.2, 0.45), rng.uniform(0.5, 1.4)
                dims = {"radius": r, "height": h}
                footprint, height = r, h
            if all(math.hypot(x - o["position"][0], z - o["position"][2]) > footprint + o["footprint"] + 0.1
                   for o in objects):
                objects.append({"shape": shape, "color": color, "position": [float(x), float(height / 2), float(z)],
                                "footprint": float(footprint), "height": float(height),
                                **{k: float(v) for k, v in dims.items()}})
                break
    return {"camera": cam, "objects": objects}


def camera_rays(cam, size):
    """Ray origin and world directions (H, W, 3), scaled so a hit at parameter t has z-depth t."""
    f = (size / 2) / math.tan(cam["fov"] / 2)
    c = (np.arange(size) + 0.5 - size / 2) / f
    dx, dy = np.meshgrid(c, -c)  # image rows go down, world y goes up
    cp, sp = math.cos(cam["pitch"]), math.sin(cam["pitch"])
    # camera looks along +z pitched down by the pitch: rotate the camera-frame direction (dx, dy, 1) about x
    d = np.stack([dx, dy * cp - sp, dy * sp + cp], axis=-1)
    return np.array([0.0, cam["height"], 0.0]), d


def world_to_camera(cam, points):
    """World points (..., 3) to camera frame (x right, y up, z forward)."""
    cp, sp = math.cos(cam["pitch"]), math.sin(cam["pitch"])
    p = np.asarray(points, dtype=np.float64) - np.array([0.0, cam["height"], 0.0])
    return np.stack([p[..., 0], p[..., 1] * cp + p[..., 2] * sp, -p[..., 1] * sp + p[..., 2] * cp], axis=-1)


def project(cam, size, points):
    """World points (..., 3) to pixel coordinates (col, row) and camera z."""
    f = (size / 2) / math.tan(cam["fov"] / 2)
    q = world_to_camera(cam, points)
    z = q[..., 2]
    return q[..., 0] / z * f + size / 2, -q[..., 1] / z * f + size / 2, z


def intersect(obj, o, d):
    """Ray parameter t of the first hit (inf on a miss) and the unit normal, for rays o + t·d.
    o: (3,), d: (M, 3). Solved in the object's frame (origin at its base centre, yaw removed)."""
    cx, _, cz = obj["position"]
    ro = o - np.array([cx, 0.0, cz])
    t = np.full(len(d), np.inf)
    n = np.zeros_like(d)
    if obj["shape"] == "sphere":
        r = obj["radius"]
        oc = ro - np.array([0.0, r, 0.0])
        a = (d * d).sum(1)
        b = 2 * d @ oc
        disc = b * b - 4 * a * (oc @ oc - r * r)
        hit = disc >= 0
        th = (-b[hit] - np.sqrt(disc[hit])) / (2 * a[hit])
        ok = th > 0
        idx = np.flatnonzero(hit)[ok]
        t[idx] = th[ok]
        n[idx] = (oc + t[idx, None] * d[idx]) / r
        return t, n
    if obj["shape"] == "cube":
        s, yaw = obj["side"], obj["yaw"]
        cy, sy = math.cos(yaw), math.sin(yaw)
        rot = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])  # world -> object frame
        lo_, ld = rot @ ro, d @ rot.T
        lo = np.array([-s / 2, 0.0, -s / 2])
        hi = np.array([s / 2, s, s / 2])
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (lo - lo_) / ld, (hi - lo_) / ld
        tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
        tmin = np.where(np.isnan(tmin), -np.inf, tmin)
        tmax = np.where(np.isnan(tmax), np.inf, tmax)
        tn, tf = tmin.max(1), tmax.min(1)
        ok = (tn <= tf) & (tn > 0)
        t[ok] = tn[ok]
        axis = tmin.argmax(1)
        ln = np.zeros_like(d)
        ln[np.arange(len(d)), axis] = -np.sign(ld[np.arange(len(d)), axis])
        n[ok] = (ln @ rot)[ok]  # back to world
        return t, n
    # cylinder: vertical axis through the base centre, radius r, height h; side and top cap
    r, h = obj["radius"], obj["height"]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (ro[0] * d[:, 0] + ro[2] * d[:, 2])
    c = ro[0] ** 2 + ro[2] ** 2 - r * r
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = b * b - 4 * a * c
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        ys = ro[1] + ts * d[:, 1]
        side = (disc >= 0) & (a > 0) & (ts > 0) & (ys >= 0) & (ys <= h)
        tt = (h - ro[1]) / d[:, 1]
        px, pz = ro[0] + tt * d[:, 0], ro[2] + tt * d[:, 2]
        top = (tt > 0) & (px * px + pz * pz <= r * r)
    t[side] = ts[side]
    p = ro + ts[:, None] * d
    n[side] = np.stack([p[side, 0], np.zeros(side.sum()), p[side, 2]], 1) / r
    better = top & (tt < t)
    t[better] = tt[better]
    n[better] = (0.0, 1.0, 0.0)
    return t, n


LIGHT = np.array([-0.4, 0.8, -0.45]) / np.linalg.norm([-0.4, 0.8, -0.45])
AMBIENT = 0.35


def render(scene, size):
    """Ray-cast a scene graph. Returns rgb, depth, seg and fills each object's visible_pixels,
    centroid and id (ids follow the canonical left-to-right order)."""
    cam = scene["camera"]
    o, d = camera_rays(cam, size)
    d = d.reshape(-1, 3)
    depth = np.full(len(d), np.inf)
    normal = np.zeros_like(d)
    label = np.zeros(len(d), dtype=np.int64)  # 0 sky, 1 ground, 2+k object k (creation order)
    albedo = np.zeros_like(d)
    with np.errstate(divide="ignore"):
        tg = np.where(d[:, 1] < 0, -o[1] / d[:, 1], np.inf)
    g = np.isfinite(tg)
    depth[g], label[g], normal[g] = tg[g], 1, (0.0, 1.0, 0.0)
    gp = o + tg[g, None] * d[g]
    # 1 m checker tiles: a texture that carries depth cues. Its contrast fades once a tile spans
    # only a few pixels, as a mip-mapped texture would, instead of aliasing into noise.
    checker = (np.floor(gp[:, 0]) + np.floor(gp[:, 2])) % 2 - 0.5
    tile_px = (size / 2) / math.tan(cam["fov"] / 2) / tg[g]
    albedo[g] = (0.485 + 0.13 * checker * np.clip(tile_px / 6, 0, 1))[:, None]
    for k, obj in enumerate(scene["objects"]):
        # only rays inside the projected bounding box can hit: a big saving for small objects
        x, y, z = obj["position"]
        rad = obj["footprint"]
        corners = np.array([[x + sx * rad, sy * obj["height"], z + sz * rad]
                            for sx in (-1, 1) for sy in (0, 1) for sz in (-1, 1)])
        u, v, cz = project(cam, size, corners)
        if cz.min() > 0.05:
            c0, c1 = max(int(u.min()) - 1, 0), min(int(u.max()) + 2, size)
            r0, r1 = max(int(v.min()) - 1, 0), min(int(v.max()) + 2, size)
            if c0 >= c1 or r0 >= r1:
                continue
            rows, cols = np.mgrid[r0:r1, c0:c1]
            idx = (rows * size + cols).ravel()
        else:
            idx = np.arange(len(d))
        t, n = intersect(obj, o, d[idx])
        closer = t < depth[idx]
        sel = idx[closer]
        depth[sel], normal[sel], label[sel] = t[closer], n[closer], 2 + k
        albedo[sel] = COLORS[obj["color"]]
    shade = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT, 0, None)
    rgb = albedo * shade[:, None]
    sky = label == 0
    sky_t = np.clip(d[sky, 1] / np.linalg.norm(d[sky], axis=1), 0, 1)[:, None]
    rgb[sky] = (0.75, 0.85, 0.95) * (1 - sky_t) + (0.35, 0.55, 0.90) * sky_t
    rgb = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(size, size, 3)
    depth = np.minimum(depth, DEPTH_MAX).astype(np.float32).reshape(size, size)
    # canonical ids: visible objects left to right by mask centroid, then hidden ones
    cols = np.tile(np.arange(size), size)
    for k, obj in enumerate(scene["objects"]):
        m = label == 2 + k
        obj["visible_pixels"] = int(m.sum())
        obj["centroid"] = [float(cols[m].mean()), float((np.arange(len(m)) // size)[m].mean())] if m.any() else None
    order = sorted(range(len(scene["objects"])),
                   key=lambda k: (scene["objects"][k]["centroid"] is None, (scene["objects"][k]["centroid"] or [0])[0]))
    remap = np.zeros(2 + len(order), dtype=np.uint8)
    remap[1] = 1
    for new, k in enumerate(order):
        remap[2 + k] = 2 + new
    seg = remap[label].reshape(size, size)
    scene["objects"] = [scene["objects"][k] for k in order]
    for new, obj in enumerate(scene["objects"]):
        obj["id"] = 2 + new
    return rgb, depth, seg


def render_scene(seed, cfg):
    """One scene from its seed: {"rgb", "depth", "seg", "graph"} where graph is JSON-serialisable."""
    rng = np.random.default_rng(seed)
    graph = sample_scene(rng, cfg)
    graph["seed"] = seed if isinstance(seed, int) else list(seed)
    graph["image_size"] = cfg.image_size
    graph["min_visible"] = round(cfg.min_visible * (cfg.image_size / 64) ** 2)
    rgb, depth, seg = render(graph, cfg.image_size)
    return {"rgb": rgb, "depth": depth, "seg": seg, "graph": graph}


# --- pseudo-RGB conversions (COOPER §3.1) ------------------------------------------------------
def depth_to_rgb(depth, encoding=DEPTH_ENCODING):
    """Metric depth (..., H, W) -> grey uint8 (..., H, W, 3) over the fixed range [DEPTH_MIN, DEPTH_MAX].
    A pixel with no reading (NaN, as a real depth file's zeros load) is drawn as far as the sky:
    left as NaN it would cast to an arbitrary grey (0, i.e. nearest, on most machines)."""
    d = np.asarray(depth, dtype=np.float64)
    d = np.clip(np.where(np.isfinite(d), d, DEPTH_MAX), DEPTH_MIN, DEPTH_MAX)
    if encoding == "log":
        v = np.log(d / DEPTH_MIN) / math.log(DEPTH_MAX / DEPTH_MIN)
    elif encoding == "linear":
        v = (d - DEPTH_MIN) / (DEPTH_MAX - DEPTH_MIN)
    else:
        raise ValueError(f"unknown depth encoding {encoding!r}")
    grey = np.round(v * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def rgb_to_depth(img, encoding=DEPTH_ENCODING):
    """Grey pseudo-image (..., H, W, 3), uint8 or float in [0, 255] -> metres. Channels are
    averaged, so a generated map that is not perfectly grey still decodes."""
    v = np.clip(np.asarray(img, dtype=np.float64).mean(-1) / 255, 0, 1)
    if encoding == "log":
        return (DEPTH_MIN * np.exp(v * math.log(DEPTH_MAX / DEPTH_MIN))).astype(np.float32)
    if encoding == "linear":
        return (DEPTH_MIN + v * (DEPTH_MAX - DEPTH_MIN)).astype(np.float32)
    raise ValueError(f"unknown depth encoding {encoding!r}")


def seg_to_rgb(seg):
    """Instance ids (..., H, W) -> palette colours (..., H, W, 3)."""
    seg = np.asarray(seg)
    if seg.size and seg.max() >= len(SEG_PALETTE):
        raise ValueError(f"segmentation id {seg.max()} exceeds the palette's {len(SEG_PALETTE)} entries")
    return SEG_PALETTE[seg]


def seg_palette_ids(seg, scenes):
    """Instance ids (N, H, W) -> the palette indices the segmentation pseudo-images are drawn in.
    Each object takes the entry of its own colour (2 + its index in COLORS); a second object of one
    colour, left to right, takes that colour's spare (one of N_SPARE after the eight; each colour
    has its own, so a spare still says which colour it stands for). The ids themselves stay
    left to right (questions and readings use them); only the colours change, because a generator
    then decides an object's colour from what it sees at that place, not from the object's rank
    among all centroids, a fact about the whole image. Scenes whose objects carry no colour
    (manifest data) keep their left-to-right ids."""
    seg = np.asarray(seg)
    out = seg.copy()
    for i, g in enumerate(scenes):
        objs = sorted((o for o in g.get("objects") or [] if o.get("id") is not None), key=lambda o: o["id"])
        if not objs or any(o.get("color") not in COLORS for o in objs):
            continue
        lut, used = np.arange(len(SEG_PALETTE), dtype=np.uint8), set()
        for o in objs:
            if not (seg[i] == o["id"]).any():
                continue
            c = list(COLORS).index(o["color"])
            # its own entry, else its colour's spare, else the next free spare, else (beyond the
            # palette) its own entry again
            spares = [2 + len(COLORS) + (c + k) % N_SPARE for k in range(N_SPARE)]
            lut[o["id"]] = next((e for e in [2 + c] + spares if e not in used), 2 + c)
            used.add(int(lut[o["id"]]))
        out[i] = lut[seg[i]]
    return out


def rgb_to_seg(img):
    """Palette image (..., H, W, 3) -> ids of the nearest palette colour (a lossy decoder's
    colours snap back to the right object)."""
    x = np.asarray(img, dtype=np.float32)
    dist = ((x[..., None, :] - SEG_PALETTE.astype(np.float32)) ** 2).sum(-1)
    return dist.argmin(-1).astype(np.uint8)


def pseudo_images(split):
    """{"rgb", "depth", "seg"} -> the three images per scene as uint8 (N, H, W, 3)."""
    return {"rgb": split["rgb"], "depth": depth_to_rgb(split["depth"]), "seg": seg_to_rgb(seg_palette_ids(split["seg"], split["scenes"]))}


# --- questions with exact answers ----------------------------------------------------------------
def name(obj):
    return f"{obj['color']} {obj['shape']}"


def camera_distance(graph, obj):
    x, y, z = obj["position"]
    return math.sqrt(x * x + (y - graph["camera"]["height"]) ** 2 + z * z)


def ground_distance(a, b):
    """Distance between two objects' centres on the ground plane (their footprints' centres)."""
    return math.hypot(a["position"][0] - b["position"][0], a["position"][2] - b["position"][2])


def image_x(graph, obj):
    """Column of the object's centre in the image."""
    u, _, _ = project(graph["camera"], graph["image_size"], obj["position"])
    return float(u)


def question(category, kind, text, answer, answer_type, objects, **extra):
    return {"category": category, "kind": kind, "question": text, "answer": answer,
            "answer_type": answer_type, "tool": TOOL_FOR[kind], "objects": [o["id"] for o in objects], **extra}


def multiple_choice(category, kind, stem, options, answer, objects):
    """A question whose answer is one of `options` (object names). The options stay in a fixed
    order here; make_questions shuffles them into the text (offered), so neither the wording nor
    the position gives the answer away."""
    return question(category, kind, stem, answer, "choice", objects, options=options)


def offered(q, rng):
    """A multiple_choice candidate with its options shuffled and named after the stem, answered
    with the word that picks the chosen option out (answer_key): "Which is closer to the camera,
    the red cube or the blue sphere?" -> "red". Not a letter ("(A) the red cube (B) …" -> "A"):
    a model that has found the nearer object can say what it is, as it says a colour, where a
    letter needs one more lookup, from the object found back to the words that name it, which no
    small model here learned. Not the whole name either: its first word comes out right as often
    (0.95 for depth order), but the next one has to be copied from the question, and that copy
    was right only 0.57-0.66 of the time after 5.4M tokens (docs/experiments.md)."""
    options = [q["options"][i] for i in rng.permutation(len(q["options"]))]
    names = [f"the {o}" for o in options]
    text = q["question"][:-1] + ", " + ", ".join(names[:-1]) + " or " + names[-1] + "?"
    return dict(q, question=text, options=options, choices=[answer_key(o, options) for o in options],
                answer=answer_key(q["answer"], options))


def answer_key(option, options):
    """The shortest answer that says which of `options` (object names) is meant: its colour where
    no other option has that colour, else its shape where no other has that shape, else its name."""
    colour, shape = option.split()
    others = [o.split() for o in options if o != option]
    if all(c != colour for c, _ in others):
        return colour
    return shape if all(s != shape for _, s in others) else option


def number_text(value, unit):
    """How an answer writes a length: metres to a tenth, centimetres whole ("4.5 m", "99 cm")."""
    return f"{value:.1f} {unit}" if unit == "m" else f"{round(value)} {unit}"


def number(category, kind, text, value, unit, objects):
    shown = number_text(value, unit)
    return question(category, kind, text, shown, "number", objects, value=float(shown.split()[0]), unit=unit)


def candidate_questions(graph):
    """Every question this scene supports, by category. Only clearly visible objects are named,
    and comparisons need a clear margin so the answer is not a coin toss."""
    objs = graph["objects"]
    vis = [o for o in objs if o["visible_pixels"] >= graph["min_visible"]]
    pairs = [(a, b) for a in vis for b in vis if a is not b]
    q = {c: [] for c in CATEGORIES}
    for a, b in pairs:
        if a["id"] < b["id"]:
            q["distance"].append(number("distance", "distance", f"How far apart are the {name(a)} and the {name(b)}, in meters?",
                                        ground_distance(a, b), "m", [a, b]))
        da, db = camera_distance(graph, a), camera_distance(graph, b)
        za, zb = world_to_camera(graph["camera"], a["position"])[2], world_to_camera(graph["camera"], b["position"])[2]
        ua, ub = image_x(graph, a), image_x(graph, b)
        for category, kind, clear, word_a, word_b in (
                ("depth_order", "depth_order", da + 0.5 <= db, "closer to the camera", "farther from the camera"),
                ("relation", "relation_front", za + 0.5 <= zb, "in front of the other", "behind the other"),
                ("relation", "relation_left", ua + 0.05 * graph["image_size"] <= ub, "farther left", "farther right")):
            if clear:  # a is clearly nearer (in front, left): asked both ways, the answer's object listed
                for word, ans, other in ((word_a, a, b), (word_b, b, a)):  # first, where the first referring head looks
                    q[category].append(multiple_choice(category, kind, f"Which is {word}?", [name(a), name(b)],
                                                       name(ans), [ans, other]))
    for a in vis:
        q["distance"].append(number("distance", "distance", f"How far is the {name(a)} from the camera, in meters?",
                                    camera_distance(graph, a), "m", [a]))
        q["size"].append(number("size", "size", f"How tall is the {name(a)}, in centimeters?", 100 * a["height"], "cm", [a]))
        if a["shape"] != "cube":
            q["size"].append(number("size", "size", f"How wide is the {name(a)}, in centimeters?", 200 * a["radius"], "cm", [a]))
        others = sorted((o for o in vis if o is not a), key=lambda o: ground_distance(a, o))
        if len(others) >= 2:
            options = [name(o) for o in sorted(others, key=lambda o: o["id"])]
            if ground_distance(a, others[1]) - ground_distance(a, others[0]) >= 0.4:
                q["relative_distance"].append(multiple_choice("relative_distance", "relative_distance",
                                                              f"Which object is closest to the {name(a)}?",
                                                              options, name(others[0]), [a, others[0]]))
            if ground_distance(a, others[-1]) - ground_distance(a, others[-2]) >= 0.4:
                q["relative_distance"].append(multiple_choice("relative_distance", "relative_distance",
                                                              f"Which object is farthest from the {name(a)}?",
                                                              options, name(others[-1]), [a, others[-1]]))
    for attr, values, text in (("shape", SHAPES, "How many {}s are there?"), ("color", COLORS, "How many {} objects are there?")):
        for v in values:
            group = [o for o in objs if o[attr] == v]
            if all(o["visible_pixels"] >= graph["min_visible"] or o["visible_pixels"] == 0 for o in group):
                seen = [o for o in group if o["visible_pixels"] > 0]
                q["counting"].append(question("counting", "counting", text.format(v), str(len(seen)), "integer", seen))
        # "the sphere" only names an object when it is the only one of its kind in the scene
        for v in values:
            group = [o for o in objs if o[attr] == v]
            if len(group) == 1 and group[0] in vis:
                a = group[0]
                if attr == "shape":
                    q["general"].append(question("general", "general", f"What color is the {v}?", a["color"], "choice",
                                                 [a], choices=list(COLORS)))
                else:
                    q["general"].append(question("general", "general", f"What shape is the {v} object?", a["shape"],
                                                 "choice", [a], choices=list(SHAPES)))
    return q


def pick_question(category, qs, rng, even_counts=False):
    """One of a category's candidates at random, or None. Counting questions whose answer is 0 are
    passed over most of the time, so counts are not mostly zero; even_counts=True then draws the
    count first, each one left (1, 2, 3 or more) equally often, and a question of that count."""
    if category == "counting" and rng.random() < 0.7:
        qs = [x for x in qs if x["answer"] != "0"] or qs
    if category == "counting" and even_counts and qs:
        counts = sorted({min(int(x["answer"]), 3) for x in qs})
        n = counts[int(rng.integers(len(counts)))]
        qs = [x for x in qs if min(int(x["answer"]), 3) == n]
    return qs[int(rng.integers(len(qs)))] if qs else None


def make_questions(graph, rng):
    """One question per category (where the scene supports one), drawn at random."""
    out = []
    for category, qs in candidate_questions(graph).items():
        q = pick_question(category, qs, rng)
        if q is not None:
            out.append(offered(q, rng) if "options" in q else q)
    return out


def drill_questions(graph):
    """Grounding drills, asked in training only: questions that need nothing but the named object
    found, which every spatial question needs first. "exist": is there an object of each colour
    (skipped when one is only partly visible, so the answer is never a coin toss); "where": the
    column of a visible object's centre, and its row, which orders most pairs by depth (a lower
    object is nearer the camera)."""
    objs, size = graph["objects"], graph["image_size"]
    vis = [o for o in objs if o["visible_pixels"] >= graph["min_visible"]]
    q = {kind: [] for kind in DRILLS}
    for c in COLORS:
        group = [o for o in objs if o["color"] == c]
        if not any(0 < o["visible_pixels"] < graph["min_visible"] for o in group):
            q["exist"].append(question("drill", "exist", f"Is there a {c} object?", "yes" if any(o in vis for o in group) else "no",
                                       "yesno", [o for o in group if o in vis]))
    third = lambda v: min(2, int(3 * v / size))
    for o in vis:
        for axis, thirds in enumerate((("left", "middle", "right"), ("high", "middle", "low"))):
            q["where"].append(question("drill", "where", f"Where is the {name(o)}, {thirds[0]} or {thirds[2]}?",
                                       thirds[third(o["centroid"][axis])], "choice", [o], choices=list(thirds)))
    return q


def practice_questions(graph, rng, k, drills=True, skip=None, weights=None, even_counts=False):
    """Up to k questions about the scene, drawn fresh for a training row: at each draw a category
    at random among those the scene supports (the drills' two kinds among them; with weights
    {category: w}, in proportion to w, 1 for a category not named), then one of its questions as
    make_questions picks it, offered; no question twice, none about skip's objects with skip's stem
    (the row's first question, asked already; an offered question's options take the place of its
    stem's "?"). even_counts=True draws a counting question's count first (pick_question): drawn as
    make_questions draws them, 63% of the counts are 1 and 19% more than 1 (the tiny preset's
    scenes), and a model answers 1 to many 2s; evenly, 58% and 31%."""
    pools = {**candidate_questions(graph), **(drill_questions(graph) if drills else {})}
    if skip is not None:
        pools = {c: [x for x in qs if not (x["objects"] == skip["objects"] and skip["question"].startswith(x["question"][:-1]))]
                 for c, qs in pools.items()}
    pools = {c: qs for c, qs in pools.items() if qs and (weights or {}).get(c, 1.0) > 0}
    out = []
    while pools and len(out) < k:
        if weights:  # (without, the draw every preset's figures were measured with)
            w = np.array([weights.get(c, 1.0) for c in pools])
            c = list(pools)[int(rng.choice(len(pools), p=w / w.sum()))]
        else:
            c = list(pools)[int(rng.integers(len(pools)))]
        q = pick_question(c, pools[c], rng, even_counts)
        out.append(offered(q, rng) if "options" in q else q)
        pools[c] = [x for x in pools[c] if x is not q]
        if not pools[c]:
            del pools[c]
    return out


# --- the dataset on disk -------------------------------------------------------------------------
SHARD_SIZE = 1000


def write_split(out_dir, split, n_scenes, cfg, seed):
    """Render n_scenes into out_dir/split. Scene i of a split has seed (seed, split index, i), so
    splits never share a scene seed."""
    scenes, questions, arrays, t0 = [], [], {m: [] for m in MODALITIES}, time.time()
    for i in range(n_scenes):
        s = render_scene([seed, SPLITS.index(split), i], cfg)
        for m in MODALITIES:
            arrays[m].append(s[m])
        for q in make_questions(s["graph"], np.random.default_rng([seed, SPLITS.index(split), i, 1])):
            questions.append({"scene": i, **q})
        scenes.append(s["graph"])
        if (i + 1) % SHARD_SIZE == 0 or i + 1 == n_scenes:
            print(f"  {split}: {i + 1}/{n_scenes} scenes, {len(questions)} questions, {time.time() - t0:.1f}s")
    save_split(out_dir, split, {m: np.stack(a) for m, a in arrays.items()}, scenes, questions)
    return scenes, questions


def save_split(out_dir, split, arrays, scenes, questions):
    """out_dir/split: shard_XXX.npz (rgb, depth, seg; SHARD_SIZE scenes each), scenes.jsonl, questions.jsonl."""
    d = os.path.join(out_dir, split)
    os.makedirs(d, exist_ok=True)
    for k, start in enumerate(range(0, len(scenes), SHARD_SIZE)):
        np.savez_compressed(os.path.join(d, f"shard_{k:03d}.npz"), **{m: arrays[m][start:start + SHARD_SIZE] for m in MODALITIES})
    for fname, rows in (("scenes.jsonl", scenes), ("questions.jsonl", questions)):
        with open(os.path.join(d, fname), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def load_split(data_dir, split):
    """{"rgb" (N,H,W,3) uint8, "depth" (N,H,W) float32 m, "seg" (N,H,W) uint8, "scenes", "questions"}."""
    d = os.path.join(data_dir, split)
    if not os.path.exists(os.path.join(d, "questions.jsonl")):
        raise FileNotFoundError(f"no {split} split in {data_dir}: run `python data.py --out_dir={data_dir}`")
    shards = sorted(f for f in os.listdir(d) if f.startswith("shard_") and f.endswith(".npz"))
    out = {m: [] for m in MODALITIES}
    for f in shards:
        with np.load(os.path.join(d, f)) as z:
            for m in MODALITIES:
                out[m].append(z[m])
    out = {m: np.concatenate(a) for m, a in out.items()}
    out["scenes"] = load_scenes(data_dir, split)
    out["questions"] = load_questions(data_dir, split)
    return out


def build_dataset(out_dir, n_train, n_val, n_test, cfg, seed=0, manifest=""):
    """All three splits: rendered, or with `manifest` (a path with {split}) imported from real data."""
    t0 = time.time()
    counts, summary = {}, {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        if manifest:
            # the one place real data plugs in, and the project's one import cycle: manifest.py
            # reads this module's constants, so it is imported here, only when a manifest is given
            from manifest import load_manifest
            split_data = load_manifest(manifest.format(split=split), cfg.image_size)
            scenes, questions = split_data["scenes"], split_data["questions"]
            save_split(out_dir, split, split_data, scenes, questions)
        else:
            scenes, questions = write_split(out_dir, split, n, cfg, seed)
        counts[split] = {"scenes": len(scenes), "questions": len(questions)}
        summary[split] = collections.Counter(q["category"] for q in questions)
    meta = {"config": asdict(cfg), "seed": seed, "manifest": manifest, "counts": counts, "categories": summary,
            "depth_encoding": DEPTH_ENCODING, "question_format": QUESTION_FORMAT, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:  # written last: its presence means "complete"
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    return meta


def load_meta(data_dir):
    """The dataset's meta.json (written last, so it exists only for a complete dataset)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no dataset in {data_dir}: run `python data.py --out_dir={data_dir}`")
    return json.load(open(path))


def prepare(data_dir="data/tiny", **preset):
    """Build the dataset in data_dir if it is not complete yet: the tiny preset, with any of its
    settings (TINY_PRESET) or SceneConfig's far and min_visible given in preset. A dataset already
    there is used as it is, unless it was built with other scene settings than preset names, or
    asks its questions in an older format: then this stops, since stale scenes would quietly ask
    other questions."""
    scene = {k: v for k, v in preset.items() if k in ("far", "min_visible")}
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        meta = load_meta(data_dir)
        stale = {k: meta["config"].get(k) for k, v in scene.items() if meta["config"].get(k) != v}
        if stale:
            raise SystemExit(f"{data_dir} holds scenes built with {stale}, not {scene}: remove it to rebuild, or pick another data_dir")
        if meta.get("question_format", 1) != QUESTION_FORMAT:
            raise SystemExit(f"{data_dir} asks its questions in format {meta.get('question_format', 1)}, not {QUESTION_FORMAT} "
                             "(multiple choice answered with one word): remove it to rebuild, or pick another data_dir")
        return meta
    p = dict(TINY_PRESET, **preset)
    print(f"dataset {data_dir} missing: building it ({p['n_train']}/{p['n_val']}/{p['n_test']} scenes)")
    return build_dataset(data_dir, p["n_train"], p["n_val"], p["n_test"], SceneConfig(image_size=p["image_size"], **scene), p["seed"])


TINY_PRESET = {"n_train": 4000, "n_val": 200, "n_test": 400, "image_size": 48, "seed": 0}


def load_questions(data_dir, split):
    return [json.loads(line) for line in open(os.path.join(data_dir, split, "questions.jsonl"))]


def load_scenes(data_dir, split):
    return [json.loads(line) for line in open(os.path.join(data_dir, split, "scenes.jsonl"))]


if __name__ == "__main__":
    # -----------------------------------------------------------------------------
    out_dir = "data/tiny"
    n_train, n_val, n_test = TINY_PRESET["n_train"], TINY_PRESET["n_val"], TINY_PRESET["n_test"]
    image_size = TINY_PRESET["image_size"]
    far = SceneConfig.far  # metres: the farthest object; nearer scenes have larger objects
    min_visible = SceneConfig.min_visible  # pixels at 64×64 (scaled by area) for an object to be named
    seed = TINY_PRESET["seed"]
    force = False  # rebuild even if out_dir already holds this dataset
    manifest = ""  # real data instead: JSONL manifests, a path with {split}, e.g. "real/{split}.jsonl"
    from configurator import configure
    configure(globals(), section="data")
    # -----------------------------------------------------------------------------
    cfg = SceneConfig(image_size=image_size, far=far, min_visible=min_visible)
    meta_path = os.path.join(out_dir, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None
    wanted = {"train": n_train, "val": n_val, "test": n_test}
    if (not force and meta and SceneConfig(**meta["config"]) == cfg and meta["seed"] == seed and meta.get("manifest", "") == manifest
            and meta.get("question_format", 1) == QUESTION_FORMAT
            and (manifest or {s: c["scenes"] for s, c in meta["counts"].items()} == wanted)):
        print(f"{out_dir} already holds this dataset: skipping (--force=True rebuilds it)")
    else:
        print(f"writing {manifest or f'{n_train}/{n_val}/{n_test} scenes'} at {image_size}x{image_size} to {out_dir}")
        meta = build_dataset(out_dir, n_train, n_val, n_test, cfg, seed, manifest)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out_dir) for f in fs)
    print(f"{'category':<18}" + "".join(f"{s:>8}" for s in SPLITS))
    for c in sorted({c for s in SPLITS for c in meta["categories"][s]}):
        print(f"{c:<18}" + "".join(f"{meta['categories'][s].get(c, 0):>8}" for s in SPLITS))
    print(f"done in {meta['seconds']}s, {size / 1e6:.1f} MB on disk")
    print("final: " + json.dumps({**{f"{s}_{k}": v for s in SPLITS for k, v in meta["counts"][s].items()},
                                  "seconds": meta["seconds"], "mbytes": round(size / 1e6, 1)}))
