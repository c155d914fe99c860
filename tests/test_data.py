"""data.py: exact depth and segmentation, exact answers, conversions, determinism.
Answers and intersections are recomputed here independently of data.py's own code paths."""
import collections
import hashlib
import json
import math
import os
import re
import shutil
import warnings

import numpy as np
import pytest

import data

SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.build_dataset(str(d), 60, 12, 12, data.SceneConfig(image_size=SIZE), seed=3)
    return str(d)


# --- an independent camera model: basis vectors instead of data.py's rotation formulas -----------
def basis(cam):
    p = cam["pitch"]
    forward = np.array([0.0, -math.sin(p), math.cos(p)])
    up = np.array([0.0, math.cos(p), math.sin(p)])
    return np.array([1.0, 0.0, 0.0]), up, forward


def pixel_ray(cam, row, col, size):
    f = (size / 2) / math.tan(cam["fov"] / 2)
    right, up, forward = basis(cam)
    d = right * (col + 0.5 - size / 2) / f - up * (row + 0.5 - size / 2) / f + forward
    return np.array([0.0, cam["height"], 0.0]), d / np.linalg.norm(d)


def hit_sphere(o, d, obj):
    c = np.array(obj["position"])
    oc = o - c
    b = d @ oc
    disc = b * b - (oc @ oc - obj["radius"] ** 2)
    return -b - math.sqrt(disc) if disc >= 0 else math.inf


def hit_cube(o, d, obj):
    """Nearest of the six faces whose intersection lies inside the face."""
    c, s, yaw = np.array(obj["position"]), obj["side"], obj["yaw"]
    axes = [np.array([math.cos(yaw), 0, -math.sin(yaw)]), np.array([0.0, 1, 0]), np.array([math.sin(yaw), 0, math.cos(yaw)])]
    best = math.inf
    for k, n in enumerate(axes):
        for sign in (-1, 1):
            denom = d @ n
            if abs(denom) < 1e-12:
                continue
            t = (n @ c + sign * s / 2 - n @ o) / denom
            p = o + t * d - c
            if t > 0 and all(abs(p @ axes[j]) <= s / 2 + 1e-9 for j in range(3) if j != k):
                best = min(best, t)
    return best


def hit_cylinder(o, d, obj):
    x, _, z = obj["position"]
    r, h = obj["radius"], obj["height"]
    best = math.inf
    a = d[0] ** 2 + d[2] ** 2
    b = 2 * ((o[0] - x) * d[0] + (o[2] - z) * d[2])
    c = (o[0] - x) ** 2 + (o[2] - z) ** 2 - r * r
    if a > 0 and b * b - 4 * a * c >= 0:
        t = (-b - math.sqrt(b * b - 4 * a * c)) / (2 * a)
        if t > 0 and 0 <= o[1] + t * d[1] <= h:
            best = t
    t = (h - o[1]) / d[1]
    p = o + t * d
    if t > 0 and (p[0] - x) ** 2 + (p[2] - z) ** 2 <= r * r:
        best = min(best, t)
    return best


HITS = {"sphere": hit_sphere, "cube": hit_cube, "cylinder": hit_cylinder}
ONE_OBJECT = {
    "sphere": {"shape": "sphere", "color": "red", "position": [0.3, 0.5, 4.0], "radius": 0.5, "footprint": 0.5, "height": 1.0},
    "cube": {"shape": "cube", "color": "blue", "position": [-0.2, 0.4, 3.5], "side": 0.8, "yaw": 0.4,
             "footprint": 0.8 / math.sqrt(2), "height": 0.8},
    "cylinder": {"shape": "cylinder", "color": "green", "position": [0.1, 0.5, 3.0], "radius": 0.3, "height": 1.0,
                 "footprint": 0.3},
}


@pytest.mark.parametrize("shape", list(ONE_OBJECT))
def test_depth_is_exact_ray_surface_z(shape):
    cam = {"height": 1.8, "pitch": math.radians(18), "fov": math.radians(60)}
    graph = {"camera": cam, "objects": [dict(ONE_OBJECT[shape])]}
    rgb, depth, seg = data.render(graph, SIZE)
    obj = graph["objects"][0]
    assert obj["id"] == 2 and obj["visible_pixels"] == (seg == 2).sum() > 50
    # interior pixels only: their whole neighbourhood is on the object
    m = seg == 2
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    rows, cols = np.nonzero(interior)
    forward = basis(cam)[2]
    errs, heights = [], []
    for r, c in zip(rows + 1, cols + 1):
        o, d = pixel_ray(cam, r, c, SIZE)
        t = HITS[shape](o, d, obj)
        assert math.isfinite(t), (r, c)
        errs.append(abs(t * (d @ forward) - depth[r, c]))
        heights.append((o + t * d)[1])
    assert len(errs) > 30 and max(errs) < 1e-4
    top = np.isclose(heights, obj["height"], atol=1e-9)
    if shape != "sphere":  # the camera looks down on them: both top face and sides are checked
        assert top.sum() > 5 and (~top).sum() > 5
    assert (depth[seg == 0] == data.DEPTH_MAX).all()
    assert (rgb[seg == 2].std(0) > 0).any()  # shaded, not flat


def test_ground_depth_grows_toward_horizon():
    cam = {"height": 1.6, "pitch": math.radians(15), "fov": math.radians(55)}
    _, depth, seg = data.render({"camera": cam, "objects": []}, SIZE)
    assert set(np.unique(seg)) == {0, 1}
    for col in (0, SIZE // 2, SIZE - 1):
        ground = depth[seg[:, col] == 1, col]  # rows top to bottom
        assert len(ground) > 20 and (np.diff(ground) <= 0).all() and ground[0] > 3 * ground[-1]
    # exact on the ground too: t where the ray meets y = 0
    o, d = pixel_ray(cam, SIZE - 1, 7, SIZE)
    t = -o[1] / d[1]
    assert abs(t * (d @ basis(cam)[2]) - depth[SIZE - 1, 7]) < 1e-4


def test_objects_never_interpenetrate_and_are_uniquely_named():
    cfg = data.SceneConfig()
    for i in range(200):
        g = data.sample_scene(np.random.default_rng(i), cfg)
        assert cfg.min_objects <= len(g["objects"]) <= cfg.max_objects
        names = [data.name(o) for o in g["objects"]]
        assert len(set(names)) == len(names)
        for a in g["objects"]:
            for b in g["objects"]:
                if a is not b:
                    assert data.ground_distance(a, b) > a["footprint"] + b["footprint"]


# --- answers, recomputed from the scene graph and the seg map ------------------------------------
def recompute(q, scene, seg):
    objs = {o["id"]: o for o in scene["objects"]}
    cam, size = scene["camera"], scene["image_size"]
    cam_pos = np.array([0.0, cam["height"], 0.0])
    right, up, forward = basis(cam)
    named = [objs[i] for i in q["objects"]]
    pos = {o["id"]: np.array(o["position"]) for o in scene["objects"]}

    def cam_dist(o):
        return float(np.linalg.norm(pos[o["id"]] - cam_pos))

    def ground(a, b):
        return float(np.hypot(*(pos[a["id"]] - pos[b["id"]])[[0, 2]]))

    def by_name(text):
        return next(o for o in scene["objects"] if f"{o['color']} {o['shape']}" == text)

    text, kind = q["question"], q["kind"]
    stem, _, offered = text.partition(", the ")  # multiple choice: the options' names follow the stem
    options = re.findall(r"(?:^|the )(\w+ \w+)", offered)
    if kind == "distance":
        v = ground(*named) if "apart" in text else cam_dist(named[0])
        return f"{v:.1f} m"
    if kind == "size":
        o = named[0]
        v = 100 * (o["height"] if "tall" in text else 2 * o["radius"])
        return f"{round(v)} cm"
    if kind == "depth_order":
        assert len(options) == 2
        pick = min if "closer" in text else max
        return data.answer_key(data.name(pick(map(by_name, options), key=cam_dist)), options)
    if kind == "relative_distance":
        anchor = by_name(stem.split("the ")[-1])
        vis = [o for o in scene["objects"] if o is not anchor and (seg == o["id"]).sum() >= scene["min_visible"]]
        assert sorted(options) == sorted(map(data.name, vis))  # the options are every other visible object
        pick = min if "closest" in text else max
        return data.answer_key(data.name(pick(vis, key=lambda o: ground(anchor, o))), options)
    if kind == "relation_front":
        assert len(options) == 2
        pick = min if "in front" in text else max
        return data.answer_key(data.name(pick(map(by_name, options), key=lambda o: (pos[o["id"]] - cam_pos) @ forward)), options)
    if kind == "relation_left":
        assert len(options) == 2
        f = (size / 2) / math.tan(cam["fov"] / 2)
        pick = min if "left" in text else max
        return data.answer_key(data.name(pick(map(by_name, options), key=lambda o: ((pos[o["id"]] - cam_pos) @ right) /
                                              ((pos[o["id"]] - cam_pos) @ forward) * f)), options)
    if kind == "counting":
        word = text.split("How many ")[1].split(" ")[0]
        attr, value = ("shape", word[:-1]) if word.endswith("s") and word[:-1] in data.SHAPES else ("color", word)
        return str(sum(o[attr] == value and (seg == o["id"]).any() for o in scene["objects"]))
    if kind == "general":
        if text.startswith("What color"):
            return next(o["color"] for o in scene["objects"] if o["shape"] == text.split("the ")[1].rstrip("?"))
        return next(o["shape"] for o in scene["objects"] if o["color"] == text.split("the ")[1].split(" ")[0])
    if kind == "exist":
        color = text.split("a ")[1].split(" ")[0]
        return "yes" if any(o["color"] == color and (seg == o["id"]).sum() >= scene["min_visible"] for o in scene["objects"]) else "no"
    if kind == "where":
        rows, cols = np.nonzero(seg == named[0]["id"])
        v = cols.mean() if "left or right" in text else rows.mean()
        words = ("left", "middle", "right") if "left or right" in text else ("high", "middle", "low")
        return words[min(2, int(3 * v / size))]
    raise AssertionError(f"no recomputation for {kind}")


def test_every_answer_matches_an_independent_recomputation(dataset):
    for split in data.SPLITS:
        s = data.load_split(dataset, split)
        assert len(s["questions"]) > 4 * len(s["scenes"])
        for q in s["questions"]:
            scene, seg = s["scenes"][q["scene"]], s["seg"][q["scene"]]
            assert recompute(q, scene, seg) == q["answer"], q
            for k, o in enumerate(scene["objects"][i - 2] for i in q["objects"]):
                # counting lists what it counts; relative distance lists the anchor, then the answer
                # general questions name an object by its one unique attribute
                if q["kind"] not in ("counting", "general") and not (q["kind"] == "relative_distance" and k == 1):
                    assert f"the {data.name(o)}" in q["question"]
                assert (seg == o["id"]).sum() >= scene["min_visible"]  # named objects are clearly visible
            if q["answer_type"] == "choice":
                assert q["answer"] in q["choices"]
            assert q["tool"] in ("depth", "seg", "none") and q["category"] in data.CATEGORIES


def test_practice_questions_are_right_distinct_and_skip_the_asked_one(dataset):
    """Training rows draw more questions of a scene (and the grounding drills) fresh: every answer
    still matches the recomputation, no question comes twice, the row's first question is not asked
    again, and every category the scene supports turns up."""
    s, rng = data.load_split(dataset, "train"), np.random.default_rng(0)
    kinds = collections.Counter()
    for q0 in s["questions"]:
        scene, seg = s["scenes"][q0["scene"]], s["seg"][q0["scene"]]
        qs = data.practice_questions(scene, rng, 1000, drills=True, skip=q0)
        stems = [(q["question"].split(", the ")[0], tuple(q["objects"])) for q in qs]
        assert len(set(stems)) == len(stems) and (q0["question"].split(", the ")[0], tuple(q0["objects"])) not in stems
        for q in qs:
            assert recompute(q, scene, seg) == q["answer"], q
            kinds[q["kind"]] += 1
        assert not any(q["category"] == "drill" for q in data.practice_questions(scene, rng, 1000, drills=False))
    assert set(kinds) == set(data.TOOL_FOR)
    assert len(data.practice_questions(s["scenes"][0], rng, 3)) == 3


def test_practice_weights_set_how_often_a_category_is_drawn(dataset):
    """practice_weights: a category weighted 0 never comes, one weighted 4 comes about 4x as often
    as one left at 1 while both have questions left (k=2 draws from a fresh scene)."""
    scenes, rng = data.load_split(dataset, "train")["scenes"], np.random.default_rng(0)
    n = collections.Counter()
    for _ in range(20):
        for scene in scenes:
            for q in data.practice_questions(scene, rng, 2, drills=False, weights={"distance": 4, "general": 0}):
                n[q["category"]] += 1
    assert n["general"] == 0 and n["distance"] > 2.5 * n["size"] > 0


def test_even_counts_draw_each_count_a_scene_offers_equally_often(dataset):
    """even_counts: after zeros are passed over as before, a counting question's count is drawn
    uniformly over the counts left (3 and more as one), so counts above 1 come more often than as
    make_questions draws them; the questions stay right (the answer counts what they name)."""
    scenes = data.load_split(dataset, "train")["scenes"]
    only = {c: 0 for c in data.CATEGORIES if c != "counting"}
    drawn = {}
    for even in (False, True):
        rng, n = np.random.default_rng(0), collections.Counter()
        for _ in range(20):
            for scene in scenes:
                for q in data.practice_questions(scene, rng, 1, drills=False, weights=only, even_counts=even):
                    assert q["category"] == "counting" and q["answer"] == str(len(q["objects"]))
                    n[min(int(q["answer"]), 3)] += 1
        drawn[even] = n
    assert sum(drawn[True].values()) == sum(drawn[False].values())
    assert drawn[True][1] < drawn[False][1] and drawn[True][2] + drawn[True][3] > drawn[False][2] + drawn[False][3]
    rng, picks = np.random.default_rng(1), collections.Counter()
    qs = [{"answer": a} for a in ("1", "1", "1", "1", "2", "4")]  # one scene's counts: four 1s, a 2, a 4
    for _ in range(3000):
        picks[data.pick_question("counting", qs, rng, even_counts=True)["answer"]] += 1
    assert all(900 < picks[a] < 1100 for a in ("1", "2", "4"))  # each count a third, whatever its questions


def test_answer_key_is_the_shortest_word_that_picks_the_option_out():
    assert data.answer_key("red cube", ["blue sphere", "red cube"]) == "red"
    assert data.answer_key("red cube", ["red sphere", "red cube"]) == "cube"
    assert data.answer_key("red cube", ["red sphere", "blue cube", "red cube"]) == "red cube"
    assert data.answer_key("blue cube", ["red sphere", "blue cube", "red cube"]) == "blue"


def test_multiple_choice_answers_are_not_given_away_by_wording_or_position():
    """"Which is closer…, the A or the B?" once always had the nearer object first, so the wording
    alone gave the answer. Now the answer is the first option no more often than a random one, and
    it always picks out one option (data.answer_key)."""
    rng = np.random.default_rng(0)
    cfg = data.SceneConfig(image_size=32)
    seen = collections.defaultdict(list)
    for seed in range(150):
        for q in data.make_questions(data.render_scene([9, seed], cfg)["graph"], rng):
            if "options" in q:
                assert q["choices"] == [data.answer_key(o, q["options"]) for o in q["options"]] and q["answer"] in q["choices"]
                assert len(set(q["choices"])) == len(q["choices"])
                seen[(q["kind"], q["question"].split(", the ")[0].split(" the ")[0])].append(
                    (q["answer"] == q["choices"][0], 1 / len(q["options"])))
    closer, farther = seen[("depth_order", "Which is closer to")], seen[("depth_order", "Which is farther from")]
    assert min(len(closer), len(farther)) > 30
    relation = [x for k, v in seen.items() if k[0].startswith("relation_") for x in v]
    for v in (closer, farther, relation, [x for k, v in seen.items() if k[0] == "relative_distance" for x in v]):
        first, share = np.mean(v, axis=0)
        assert abs(first - share) < 0.15, (first, share)  # the first option is right as often as a random one


def test_scene_graph_matches_images(dataset):
    s = data.load_split(dataset, "val")
    for scene, seg in zip(s["scenes"], s["seg"]):
        json.dumps(scene)  # JSON-serialisable
        ids = [o["id"] for o in scene["objects"]]
        assert ids == list(range(2, 2 + len(ids)))
        cx = [o["centroid"][0] for o in scene["objects"] if o["centroid"] is not None]
        assert cx == sorted(cx)  # canonical left-to-right order
        for o in scene["objects"]:
            assert o["visible_pixels"] == (seg == o["id"]).sum()


def test_all_categories_and_tools_present(dataset):
    qs = data.load_split(dataset, "train")["questions"]
    assert {q["category"] for q in qs} == set(data.CATEGORIES)
    assert {q["tool"] for q in qs} == {"depth", "seg", "none"}
    assert {q["answer_type"] for q in qs} == {"number", "choice", "integer"}


# --- conversions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["log", "linear"])
def test_depth_round_trip_within_half_a_step(encoding):
    d = np.random.default_rng(0).uniform(data.DEPTH_MIN, data.DEPTH_MAX, (50, 64)).astype(np.float32)
    back = data.rgb_to_depth(data.depth_to_rgb(d, encoding), encoding)
    if encoding == "log":
        step = math.log(data.DEPTH_MAX / data.DEPTH_MIN) / 255
        err = np.abs(np.log(back / d))
    else:
        step = (data.DEPTH_MAX - data.DEPTH_MIN) / 255
        err = np.abs(back - d)
    assert err.max() <= step / 2 * 1.0001
    assert err.max() > step / 4  # it does quantise
    grey = data.depth_to_rgb(d, encoding)
    assert grey.dtype == np.uint8 and grey.shape == (50, 64, 3) and (grey[..., 0] == grey[..., 2]).all()


def test_depth_with_no_reading_is_drawn_far_not_near():
    d = np.array([[np.nan, 1.0, np.inf]], dtype=np.float32)  # real depth files' holes load as NaN
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no invalid-cast warning: the hole is handled, not cast
        grey = data.depth_to_rgb(d)[..., 0]
    assert grey[0, 0] == grey[0, 2] == 255 and grey[0, 1] < 255


def test_seg_round_trip_exact_and_snaps_noisy_colours():
    seg = np.random.default_rng(0).integers(0, len(data.SEG_PALETTE), (4, 32, 32)).astype(np.uint8)
    img = data.seg_to_rgb(seg)
    assert (data.rgb_to_seg(img) == seg).all()
    # palette colours are >= 60 apart, so noise of up to 15 a channel (26 in all) must snap back
    noisy = np.clip(img.astype(int) + np.random.default_rng(1).integers(-15, 16, img.shape), 0, 255)
    assert (data.rgb_to_seg(noisy) == seg).all()
    with pytest.raises(ValueError, match="palette"):
        data.seg_to_rgb(np.full((2, 2), len(data.SEG_PALETTE)))


def test_seg_palette_ids_colour_objects_by_their_own_colour(dataset):
    seg = np.zeros((2, 4, 8), dtype=np.uint8)
    seg[:, 2:] = 1
    seg[:, 1, 0:2], seg[:, 1, 3:5], seg[:, 1, 6:8] = 2, 3, 4  # three objects, ids left to right
    objs = [{"id": 2, "color": "blue"}, {"id": 3, "color": "red"}, {"id": 4, "color": "blue"}]
    scenes = [{"objects": objs}, {"objects": [{"id": 2}, {"id": 3}, {"id": 4}]}]  # the second: no colours (manifest)
    out = data.seg_palette_ids(seg, scenes)
    blue = list(data.COLORS).index("blue")
    assert out[0, 1, 0] == 2 + blue and out[0, 1, 3] == 2 + list(data.COLORS).index("red")
    assert out[0, 1, 6] == 2 + len(data.COLORS) + blue % data.N_SPARE  # the second blue, further right: blue's spare
    assert (out[0, :1] == 0).all() and (out[0, 2:] == 1).all()  # sky and ground keep their entries
    assert (out[1] == seg[1]).all()  # no colours: the left-to-right ids as they are
    # the real scenes: one entry per visible object, never shared while spares last
    split = data.load_split(dataset, "train")
    pal = data.seg_palette_ids(split["seg"], split["scenes"])
    for a, b in zip(split["seg"], pal):
        pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
        assert len({x for x, _ in pairs}) == len(pairs) == len({y for _, y in pairs})

# --- files ---------------------------------------------------------------------------------------
def digest(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            if f != "meta.json":  # holds the wall time
                h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_same_seed_byte_identical_and_splits_disjoint(tmp_path, dataset):
    cfg = data.SceneConfig(image_size=SIZE)
    data.build_dataset(str(tmp_path / "a"), 60, 12, 12, cfg, seed=3)
    assert digest(tmp_path / "a") == digest(dataset)
    data.build_dataset(str(tmp_path / "b"), 60, 12, 12, cfg, seed=4)
    assert digest(tmp_path / "b") != digest(dataset)
    seen = {}
    for split in data.SPLITS:
        s = data.load_split(dataset, split)
        seeds = {tuple(sc["seed"]) for sc in s["scenes"]}
        images = {hashlib.sha256(x.tobytes()).hexdigest() for x in s["rgb"]}
        for other, (oseeds, oimages) in seen.items():
            assert not seeds & oseeds and not images & oimages, (split, other)
        seen[split] = (seeds, images)


def test_prepare_is_a_no_op_on_a_complete_dataset(dataset, capsys):
    """A complete dataset is used as it is; asked for other scene settings than it was built
    with, prepare stops instead of handing back stale scenes."""
    meta = data.prepare(dataset)
    assert meta["counts"]["train"]["scenes"] == 60
    assert data.prepare(dataset, far=data.SceneConfig.far) == meta
    assert "building" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="min_visible"):
        data.prepare(dataset, min_visible=data.SceneConfig.min_visible + 1)
    old = os.path.join(os.path.dirname(dataset), "old_format")  # built before one-word answers: no question_format
    shutil.copytree(dataset, old)
    json.dump({k: v for k, v in meta.items() if k != "question_format"}, open(os.path.join(old, "meta.json"), "w"))
    with pytest.raises(SystemExit, match="format 1"):
        data.prepare(old)

