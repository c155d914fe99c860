"""bench.py's learn config: the maps arm's own defaults, under the same overrides."""
import pytest

import bench


def test_rgb_arm_keeps_learn_defaults():
    cfg = bench.learn_config([])
    assert cfg["arm"] == "rgb"
    assert {k: cfg[k] for k in bench.MAPS_ARM} == {k: bench.LEARN[k] for k in bench.MAPS_ARM}


def test_maps_arm_starts_from_its_defaults_and_overrides_win():
    cfg = bench.learn_config(["--arm=maps"])
    assert {k: cfg[k] for k in bench.MAPS_ARM} == bench.MAPS_ARM
    cfg = bench.learn_config(["--arm=maps", "--vqa_weight=1", "--seg_head_weight=0.5"])
    assert cfg["vqa_weight"] == 1.0 and cfg["seg_head_weight"] == 0.5 and cfg["seg_head"] is True


def test_maps_defaults_do_not_leak_into_module_state():
    bench.learn_config(["--arm=maps"])
    assert bench.LEARN["seg_head"] is False and bench.learn_config([])["number_weight"] == bench.LEARN["number_weight"]


@pytest.mark.parametrize("argv, message", [
    (["--arm=foo"], "arm must be rgb, maps or blind"),
    (["--arm=maps", "--seg_head=False"], "seg_guidance > 0 needs seg_head=True"),
    (["--arm=maps", "--seg_head_weight=x"], "expected float"),
    (["--no_such_key=1"], "unknown config key"),
    (["--base_share=0.5"], "base_share must be in \\[0, 1\\) and needs arm=maps"),
    (["--arm=maps", "--base_share=1"], "base_share must be in"),
])
def test_bad_learn_config_stops_with_a_clear_error(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.learn_config(argv)
