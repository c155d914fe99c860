"""prepare.py: a fresh data directory gets everything built in order, once."""
import functools
import os

import numpy as np

import data
import prepare
import tokenizer
import vqgan


def test_prepare_builds_what_is_missing_once(tmp_path, monkeypatch, capsys):
    d, ckpt = str(tmp_path / "d"), str(tmp_path / "vq" / "ckpt.pt")
    data.build_dataset(d, 4, 2, 2, data.SceneConfig(image_size=32), seed=0)
    # the tiny preset's VQ, shrunk so that training it takes a moment
    monkeypatch.setattr(vqgan, "VQConfig", functools.partial(vqgan.VQConfig, channels=16, n_res_blocks=1, codebook_size=32))
    monkeypatch.setattr(vqgan, "TrainConfig", functools.partial(vqgan.TrainConfig, max_iters=2, batch_size=2,
                                                                warmup_iters=1, disc_start=1, log_interval=1))
    tok, vq, codes, questions, refs = prepare.stage_data(d, ckpt)
    said = capsys.readouterr().out
    assert "no tokenizer" in said and "no VQ tokenizer" in said and said.count("encoded ") == 3
    assert tok.codebook_size == vq.cfg.codebook_size == 32 and tok.vocab_size == tok.image_offset + 32
    assert codes["train"].shape == (4, 3, 64) and len(questions["val"]) > 0
    assert refs == {"tokenizer": tokenizer.tokenizer_path(d), "vq": ckpt, "data_dir": d}
    built = {p: os.path.getmtime(p) for p in (tokenizer.tokenizer_path(d), ckpt, vqgan.codes_path(d, "test"))}
    again = prepare.stage_data(d, ckpt)
    assert capsys.readouterr().out == ""  # nothing left to build
    assert all(os.path.getmtime(p) == t for p, t in built.items())
    assert np.array_equal(again[2]["train"], codes["train"])
