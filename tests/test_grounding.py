"""grounding.py on hand-made grids: the place heads' labels and the referring loss's targets."""
import numpy as np

import data
import grounding


def test_place_objects_names_the_object_covering_most_of_each_place():
    """On a hand-made 2×2 grid of 4×4-pixel places: a place mostly covered by the red sphere gets its
    class, a place where an object covers under a quarter gets 0, and a scene whose objects have no
    colour and shape (manifest data) gets -1 everywhere."""
    seg = np.ones((2, 8, 8), dtype=np.uint8)  # ground
    seg[:, :4, :4] = 2  # place 0: object 2 everywhere
    seg[:, :3, 4] = 3  # place 1: object 3 on 3 of 16 pixels
    seg[:, 4:, :4] = 0  # place 2: sky
    seg[:, 4:, 4:6] = 3  # place 3: object 3 on 8 of 16
    scenes = [{"objects": [{"id": 2, "color": "red", "shape": "sphere"}, {"id": 3, "color": "white", "shape": "cube"}]},
              {"image": "real.png"}]
    labels = grounding.place_objects(seg, scenes, 2)
    red_sphere = 1 + list(data.COLORS).index("red") * 3 + data.SHAPES.index("sphere")
    white_cube = 1 + list(data.COLORS).index("white") * 3 + data.SHAPES.index("cube")
    assert labels[0].tolist() == [red_sphere, 0, 0, white_cube]
    assert labels[1].tolist() == [-1] * 4
    assert labels.max() < grounding.N_OBJECT_CLASSES
    coverage = grounding.place_coverage(seg, 2)
    given = grounding.place_objects(seg, scenes, 2, coverage)  # the coverage passed in, as place_targets does
    assert np.array_equal(given, labels) and np.array_equal(coverage, grounding.place_coverage(seg, 2))  # and left as it was
    # anchors: each object's class once, at the place it covers most, however little of it that is
    anchors = grounding.place_anchors(seg, scenes, 2)
    assert anchors[0].tolist() == [red_sphere, 0, 0, white_cube] and anchors[1].tolist() == [-1] * 4
    seg[0, 4:, 4:6] = 1  # object 3 now shows only its 3 pixels in place 1: no place's class, still an anchor
    assert grounding.place_objects(seg, scenes, 2)[0].tolist() == [red_sphere, 0, 0, 0]
    assert grounding.place_anchors(seg, scenes, 2)[0].tolist() == [red_sphere, white_cube, 0, 0]
    seg[0, 0, 0] = 4  # an object in the scene's map but not its graph is not asked about: no anchor
    scenes[0]["objects"].append({"id": 5, "color": "red", "shape": "cube"})  # nor one out of view
    assert grounding.place_anchors(seg, scenes, 2)[0].tolist() == [red_sphere, white_cube, 0, 0]


def test_referent_places_are_what_a_questions_objects_cover():
    """The referring loss's targets, on a hand-made 2×2 grid of 4×4-pixel places: an object's places
    are those it covers a quarter of; one too small for any gets its fullest place; a count's objects
    are one group, a comparison's each its own, and a question naming none has no group."""
    seg = np.ones((1, 8, 8), dtype=np.uint8)
    seg[0, :2, :4] = 2  # place 0: object 2 on 8 of 16 pixels
    seg[0, 0, 4:7] = 2  # place 1: 3 of 16
    seg[0, 4, :2] = 3  # place 2: object 3 on 2 of 16
    seg[0, 4:7, 4] = 3  # place 3: 3 of 16
    cov = grounding.place_coverage(seg, 2)[0]
    assert cov.shape == (4, len(data.SEG_PALETTE)) and (cov.sum(-1) == 16).all()
    assert grounding.referent_places(cov, [2]).tolist() == [True, False, False, False]
    assert grounding.referent_places(cov, [3]).tolist() == [False, False, False, True]  # too small: its fullest place
    assert grounding.referent_places(cov, [2, 3]).tolist() == [True, False, False, False]
    assert grounding.referent_places(cov, [4]).tolist() == [False] * 4  # not in the image
    assert grounding.referents({"kind": "counting", "objects": [2, 3]}) == [[2, 3]]
    assert grounding.referents({"kind": "relation_left", "objects": [3, 2]}) == [[3], [2]]
    assert grounding.referents({"kind": "general", "question": "a manifest question"}) == []


def test_place_depths_bins_each_places_median_depth_on_the_log_scale():
    """The depth head's label is the bin of the place's median depth: the near and far ends of the
    range land in the first and last bins, one step of the log scale moves one bin, and a scene
    without a true depth map (manifest data) gets -1 everywhere."""
    step = (data.DEPTH_MAX / data.DEPTH_MIN) ** (1 / grounding.N_DEPTH_BINS)  # one bin's ratio
    depth = np.full((2, 8, 8), data.DEPTH_MAX, dtype=np.float32)  # sky
    depth[:, :4, :4] = 0.1  # nearer than the range
    depth[:, :4, 4:] = data.DEPTH_MIN * step ** 5.5
    depth[:, :4, 4] = 0.6  # a minority of nearer pixels does not move the median
    depth[:, 4:, :4] = np.nan  # no reading: as far as the sky
    labels = grounding.place_depths(depth, [{"objects": []}, {"image": "real.png", "has_depth": False}], 2)
    last = grounding.N_DEPTH_BINS - 1
    assert labels[0].tolist() == [0, 5, last, last]
    assert labels[1].tolist() == [-1] * 4
    split = {"seg": np.ones((2, 8, 8), dtype=np.uint8), "depth": depth, "scenes": [{"objects": []}] * 2}
    both = grounding.place_labels(split, 2, objects=True, depths=True)
    assert both.shape == (2, 4, 2) and both[0, :, 1].tolist() == [0, 5, last, last] and (both[..., 0] == 0).all()
