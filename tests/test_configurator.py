"""configurator.py: config files and --key=value overrides; bad keys and types stop before any work."""
import subprocess
import sys

import pytest

from configurator import configure


def fresh():
    return {"__doc__": "demo", "batch_size": 4, "lr": 1e-3, "aux": True, "name": "x", "init": None, "weights": {}}


def test_overrides_and_files(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("# a preset\nbatch_size = 16\nname = 'from_file'\n")
    g = fresh()
    out = configure(g, argv=[str(cfg), "--lr=1", "--aux=False", "--name=cli", "--weights={'a': 2}"])
    assert out == {"aux": False, "batch_size": 16, "init": None, "lr": 1.0, "name": "cli", "weights": {"a": 2}}
    assert g["batch_size"] == 16 and isinstance(g["lr"], float)


@pytest.mark.parametrize("argv,msg", [
    (["--batch=3"], "unknown config key 'batch' \\(did you mean batch_size"),
    (["--aux=1"], "--aux=1: expected bool, got int"),
    (["--batch_size=2.5"], "expected int, got float"),
    (["--lr=fast"], "expected float, got str"),
    (["--weights=3"], "expected dict, got int"),
    (["batch_size=3"], "cannot read config file"),
    (["--batch_size"], "expected --key=value"),
])
def test_bad_input_stops_with_a_clear_message(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        configure(fresh(), argv=argv)


def test_config_file_with_unknown_key(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("bach_size = 16\n")
    with pytest.raises(SystemExit, match="sets unknown key 'bach_size'"):
        configure(fresh(), argv=[str(cfg)])


def test_help_lists_keys_for_a_real_script():
    r = subprocess.run([sys.executable, "data.py", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--n_train=4000" in r.stdout and "--out_dir='data/tiny'" in r.stdout
    r = subprocess.run([sys.executable, "data.py", "--n_trian=5"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown config key 'n_trian'" in r.stderr and "writing" not in r.stdout


def test_preset_sections_apply_only_to_their_script(tmp_path):
    cfg = tmp_path / "preset.py"
    cfg.write_text("_shared = 8\nvqgan = dict(batch_size=_shared)\nstage1 = dict(batch_size=2 * _shared, lr=3e-4)\n")
    g = fresh()
    configure(g, "stage1", [str(cfg)])
    assert g["batch_size"] == 16 and g["lr"] == 3e-4
    g = fresh()
    configure(g, "vqgan", [str(cfg)])
    assert g["batch_size"] == 8 and g["lr"] == 1e-3
    cfg.write_text("stage1 = dict(batchsize=3)\n")
    with pytest.raises(SystemExit, match=r"\[stage1\] sets unknown key 'batchsize'"):
        configure(fresh(), "stage1", [str(cfg)])
    configure(fresh(), "vqgan", [str(cfg)])  # another script's section is not checked here


def test_shipped_presets_fit_their_scripts():
    """Every section of every preset names keys its script really has (checked via --help)."""
    import glob
    import re
    import configurator
    scripts = {"data": "data.py", "tokenizer": "tokenizer.py", "vqgan": "vqgan.py", "stage1": "train_stage1.py",
               "stage2": "train_stage2.py", "rl": "rl.py", "eval": "eval.py"}
    presets = glob.glob("config/*.py")
    assert presets
    for preset in presets:
        sections = {}
        exec(open(preset).read(), sections)
        for name, script in scripts.items():
            if name not in sections or not __import__("os").path.exists(script):
                continue
            r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
            keys = set(re.findall(r"^  --(\w+)=", r.stdout, re.M))
            assert set(sections[name]) <= keys, (preset, name, set(sections[name]) - keys)
        assert not [k for k in sections if not k.startswith("_") and k not in configurator.SECTIONS]
