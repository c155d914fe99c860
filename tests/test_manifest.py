"""manifest.py: real data from a JSONL manifest, on files the tests write (PNG, JPEG, 16-bit PNG,
.npy), its error messages, and its import as dataset splits."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import manifest


def write_manifest(tmp_path, rows):
    p = tmp_path / "manifest.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


def test_manifest_reads_png_jpeg_16bit_png_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (48, 80, 3)).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "a.png")
    Image.fromarray(photo).save(tmp_path / "b.jpg", quality=95)
    mm = np.full((48, 80), 3000, dtype=np.uint16)
    mm[:, 40:] = 1500
    Image.fromarray(mm).save(tmp_path / "d.png")
    np.save(tmp_path / "d.npy", mm.astype(np.float32) / 1000)
    ids = np.zeros((48, 80), dtype=np.uint8)
    ids[10:30, 50:70], ids[10:30, 5:25] = 7, 3  # instance 7 right of instance 3
    Image.fromarray(ids).save(tmp_path / "s.png")
    q = {"question": "How far?", "answer": "3.0 m", "category": "distance"}
    path = write_manifest(tmp_path, [{"image": "a.png", "depth": "d.png", "seg": "s.png", **q},
                                     {"image": "b.jpg", "depth": "d.npy", **q},
                                     {"image": "a.png", "depth": "d.png", "seg": "s.png", **q}])
    out = manifest.load_manifest(path, image_size=32)
    assert out["rgb"].shape == (2, 32, 32, 3) and len(out["questions"]) == 3
    assert [q["scene"] for q in out["questions"]] == [0, 1, 0]  # same files -> same scene
    for i in range(2):  # 48×80 -> 32×53 -> centre crop: columns 10..41 of the resized image
        left, right = out["depth"][i][:, :8], out["depth"][i][:, -8:]
        assert np.allclose(left, 3.0) and np.allclose(right, 1.5)
    assert np.abs(out["rgb"][0].astype(int) - out["rgb"][1].astype(int)).mean() < 20  # jpeg ~ png
    seg = out["seg"][0]
    assert set(np.unique(seg)) == {0, 2, 3}
    assert np.nonzero(seg == 2)[1].mean() < np.nonzero(seg == 3)[1].mean()  # renumbered left to right
    assert (out["seg"][1] == 0).all()


def test_manifest_errors_name_the_line_and_file(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    q = {"question": "q", "answer": "a", "category": "general"}
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: cannot read image file .*corrupt.png"):
        manifest.load_manifest(write_manifest(tmp_path, [{"image": "ok.png", **q}, {"image": "corrupt.png", **q}]))
    with pytest.raises(FileNotFoundError, match=r"manifest.jsonl:1: image file .*gone.png not found"):
        manifest.load_manifest(write_manifest(tmp_path, [{"image": "gone.png", **q}]))
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: malformed JSON"):
        manifest.load_manifest(write_manifest(tmp_path, [{"image": "ok.png", **q}, "{not json"]))
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: missing field\(s\) answer"):
        manifest.load_manifest(write_manifest(tmp_path, [{"image": "ok.png", "question": "q", "category": "general"}]))
    with pytest.raises(FileNotFoundError, match=r"manifest.jsonl:1: depth file .*nope.npy not found"):
        manifest.load_manifest(write_manifest(tmp_path, [{"image": "ok.png", "depth": "nope.npy", **q}]))


def test_manifests_import_as_splits(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3)).astype(np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"image": "0.png", "question": "How far is the chair, in meters?", "answer": "2.5 m", "category": "distance"},
            {"image": "1.png", "question": "Is the cup left of the plate?", "answer": "yes", "category": "relation"},
            {"image": "2.png", "question": "How many cups?", "answer": "3", "category": "counting"}]
    for split in data.SPLITS:
        write_manifest(tmp_path, rows)
        os.replace(tmp_path / "manifest.jsonl", tmp_path / f"{split}.jsonl")
    out = str(tmp_path / "real")
    meta = data.build_dataset(out, 0, 0, 0, data.SceneConfig(image_size=32), manifest=str(tmp_path / "{split}.jsonl"))
    assert meta["counts"]["val"] == {"scenes": 3, "questions": 3}
    s = data.load_split(out, "train")
    assert s["rgb"].shape == (3, 32, 32, 3) and np.isnan(s["depth"]).all()
    assert [q["answer_type"] for q in s["questions"]] == ["number", "yesno", "integer"]
    assert s["questions"][0]["value"] == 2.5 and s["questions"][0]["unit"] == "m"
