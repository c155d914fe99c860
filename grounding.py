"""
What each place of an image holds, and which places a question is about: the labels that the
place heads, the referring loss and the choosing loss learn from (losses.py, "Place heads",
"Referring", "Choosing"), computed from a split's exact segmentation, depth and scene graphs.

A place is one cell of the side×side grid of a VQ image's codes (12×12 at 48 px: a 4×4 patch of
pixels). `place_coverage` counts each segment's pixels in each place; the object head's label is
the object covering most of a place (`place_objects`), the anchor head's marks each object once
(`place_anchors`), the depth head's is a place's median depth, binned (`place_depths`).
`referents` groups the objects a question names and `referent_places` finds where a group is;
`option_spans` finds each multiple-choice option's words in the question. Manifest scenes, whose
objects carry no colour and shape or which lack a true map, get -1 (no label) where a label needs them.
"""
import math

import numpy as np

import data

N_OBJECT_CLASSES = 1 + len(data.COLORS) * len(data.SHAPES)  # 0: no object; 1 + colour index * 3 + shape index


def place_coverage(seg, side):
    """(N, side², ids) int32: how many pixels of each segment id (0 sky, 1 ground, 2… objects)
    each place of a side×side grid over the (N, H, W) segmentations holds."""
    n, p = len(seg), seg.shape[1] // side
    blocks = seg.reshape(n, side, p, side, p).transpose(0, 1, 3, 2, 4).reshape(n, side * side, p * p)
    return np.stack([(blocks == k).sum(-1, dtype=np.int32) for k in range(len(data.SEG_PALETTE))], -1)


def object_class(obj):
    """The place heads' class of an object: 1 + colour * 3 + shape (0 is none)."""
    return 1 + list(data.COLORS).index(obj["color"]) * len(data.SHAPES) + data.SHAPES.index(obj["shape"])


def has_classes(graph):
    """Whether a scene's objects all carry a colour and shape (not so for manifest data): the
    place heads label only such scenes."""
    objs = graph.get("objects")
    return objs is not None and all(o.get("color") in data.COLORS and o.get("shape") in data.SHAPES for o in objs)


def place_objects(seg, scenes, side, coverage=None):
    """(N, side²) int64: at each place of a side×side grid over the (N, H, W) segmentations, the
    class (1 + colour * 3 + shape) of the object covering most of its pixels, if that is at least a
    quarter of them, else 0; -1 for a scene whose objects carry no colour and shape (manifest data).
    The object head's targets (model.py). coverage: place_coverage(seg, side), if already at hand."""
    n, p = len(seg), seg.shape[1] // side
    counts = place_coverage(seg, side) if coverage is None else coverage.copy()  # the sky and ground are zeroed below
    counts[..., :2] = 0  # sky and ground
    lut = np.zeros((n, len(data.SEG_PALETTE)), dtype=np.int64)
    for i, g in enumerate(scenes):
        if not has_classes(g):
            lut[i] = -1
            continue
        for o in g["objects"]:
            lut[i, o["id"]] = object_class(o)
    labels = np.take_along_axis(lut, counts.argmax(-1), 1)
    labels[(counts.max(-1) < p * p / 4) & (lut.min(1, keepdims=True) >= 0)] = 0
    return labels


def place_anchors(seg, scenes, side, coverage=None):
    """(N, side²) int64: at the one place each object covers most of (its anchor), the object's
    class as place_objects gives it; 0 at every other place, so each object is marked once
    whatever its size; -1 for a scene whose objects carry no colour and shape. Where two objects
    share an anchor, the smaller keeps it. The anchor head's targets (losses.py, "Place heads")."""
    counts = place_coverage(seg, side) if coverage is None else coverage
    out = np.zeros((len(seg), counts.shape[1]), dtype=np.int64)
    for i, g in enumerate(scenes):
        if not has_classes(g):
            out[i] = -1
            continue
        for o in sorted(g["objects"], key=lambda o: -counts[i, :, o["id"]].sum()):
            if counts[i, :, o["id"]].max() > 0:
                out[i, counts[i, :, o["id"]].argmax()] = object_class(o)
    return out


N_DEPTH_BINS = 32  # the depth head's classes: equal steps of log depth over [DEPTH_MIN, DEPTH_MAX], ~13% each


def place_depths(depth, scenes, side):
    """(N, side²) int64: the bin of each place's median depth (N_DEPTH_BINS steps of log depth, the
    depth pseudo-image's scale); -1 for a scene without a true depth map (manifest data). The depth
    head's targets (model.py)."""
    n, p = len(depth), depth.shape[1] // side
    blocks = np.nan_to_num(depth, nan=data.DEPTH_MAX).reshape(n, side, p, side, p).transpose(0, 1, 3, 2, 4).reshape(n, side * side, -1)
    v = np.log(np.clip(np.median(blocks, -1), data.DEPTH_MIN, data.DEPTH_MAX) / data.DEPTH_MIN) / math.log(data.DEPTH_MAX / data.DEPTH_MIN)
    bins = np.minimum((v * N_DEPTH_BINS).astype(np.int64), N_DEPTH_BINS - 1)
    bins[[not g.get("has_depth", True) for g in scenes]] = -1
    return bins


def place_labels(split, side, objects=True, depths=False, coverage=None):
    """(N, side², heads): the place heads' labels for a loaded split (data.load_split), in the model's
    order (object, then depth). coverage: as place_objects takes it."""
    cols = []
    if objects:
        cols.append(place_objects(split["seg"], split["scenes"], side, coverage))
    if depths:
        cols.append(place_depths(split["depth"], split["scenes"], side))
    return np.stack(cols, -1)


def referents(q):
    """The groups of objects (ids) a question is about, in q["objects"]' order: one group of
    everything a count or an existence drill covers, else each object alone. A comparison lists
    its answer first (depth order, relation), a relative distance its anchor first. Manifest
    questions name none. The referring loss's targets, a group a head (losses.py, "Referring")."""
    objs = q.get("objects", [])
    if not objs:
        return []
    return [objs] if q["kind"] in ("counting", "exist") else [[o] for o in objs]


def option_spans(q):
    """[(start, end)]: where each option of a multiple-choice question names its object in the
    question's text ("red cube" in "… the red cube or the blue sphere?"), in the options' order;
    [] for other questions. The choosing loss's and the options' referring targets (losses.py,
    "Choosing")."""
    if "options" not in q:
        return []
    spans, at = [], q["question"].index(", the ")  # the options follow the stem
    for option in q["options"]:
        start = q["question"].index(f"the {option}", at) + len("the ")
        spans.append((start, start + len(option)))
        at = start + len(option)
    return spans


def option_objects(q, graph):
    """The ids of a multiple-choice question's options' objects in its scene graph, in the
    question's order."""
    id_of = {data.name(o): o["id"] for o in graph["objects"] if o["visible_pixels"] >= graph["min_visible"]}
    return [id_of[o] for o in q["options"]]


def referent_places(coverage, group):
    """(side²,) bool: the places a group of objects covers, from one scene's place_coverage: at
    least a quarter of a place's pixels, or, for a group too small for that, its fullest places."""
    c = coverage[:, group].sum(-1)
    covered = c * 4 >= coverage[0].sum()
    return covered if covered.any() or c.max() == 0 else c == c.max()
