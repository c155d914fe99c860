"""trainer.py, the one training loop: DDP equivalence, exact resume, atomic checkpoints, NaN stop."""
import json
import os
import subprocess
import types

import pytest
import torch

import trainer
from tests import loop_driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if "loss" in r]


def run_driver(tmp_path, name, iters, accum, init="scratch", optimizer="adamw", object_head=False):
    loop_driver.main(str(tmp_path / name), iters, accum, init, optimizer, object_head)
    return str(tmp_path / name)


@pytest.mark.parametrize("object_head", [False, True])
def test_ddp_two_ranks_match_one_process(tmp_path, object_head):
    """2 gloo ranks × 2 micro-batches against 1 process × 4 micro-batches: the same 4 micro-batches
    an iteration, so the same losses. Tolerance 1e-5: only the order of float sums differs. With
    an object head that no batch trains (stage 2 and RL from a stage-1 checkpoint), DDP must not
    wait for its gradient."""
    single = run_driver(tmp_path, "single", 6, 4, object_head=object_head)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "tests/loop_driver.py",
                        str(tmp_path / "ddp"), "6", "4", "scratch", "adamw", str(object_head)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(single), losses(str(tmp_path / "ddp"))
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert a[-1] < a[0]  # and it is learning
    wa = torch.load(os.path.join(single, "ckpt.pt"), weights_only=True)["model"]
    wb = torch.load(str(tmp_path / "ddp" / "ckpt.pt"), weights_only=True)["model"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


class Crash(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_kill_and_resume_is_exact(tmp_path, monkeypatch, optimizer):
    straight = run_driver(tmp_path, "straight", 8, 2, optimizer=optimizer)
    # the same run, crashing in the first batch after the iteration-4 checkpoint
    calls = {"n": 0}
    real = loop_driver.get_batch

    def crashing(split, rng, batch_size=4):
        if split == "train":
            calls["n"] += 1
            if calls["n"] > 4 * 2:
                raise Crash()
        return real(split, rng, batch_size)

    monkeypatch.setattr(loop_driver, "get_batch", crashing)
    with pytest.raises(Crash):
        run_driver(tmp_path, "resumed", 8, 2, optimizer=optimizer)
    assert torch.load(str(tmp_path / "resumed" / "ckpt.pt"), weights_only=True)["iter_num"] == 4
    monkeypatch.setattr(loop_driver, "get_batch", real)
    with pytest.raises(SystemExit, match="optimizer"):  # another optimizer's state does not fit
        run_driver(tmp_path, "resumed", 8, 2, "resume", {"adamw": "muon", "muon": "adamw"}[optimizer])
    run_driver(tmp_path, "resumed", 8, 2, "resume", optimizer)
    assert losses(straight) == losses(str(tmp_path / "resumed"))  # bit for bit, and no duplicate lines
    wa = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    wb = torch.load(str(tmp_path / "resumed" / "ckpt.pt"), weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wb["iter_num"] == 8 and wb["config"]["max_iters"] == 8 and wb["tokens_seen"] == wa["tokens_seen"] == 8 * 2 * 4 * 24


def test_crash_while_writing_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    trainer.save_checkpoint(path, {"w": torch.ones(3), "iter_num": 1})

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path, {"w": torch.zeros(3), "iter_num": 2})
    ck = trainer.load_checkpoint(path)
    assert ck["iter_num"] == 1 and torch.equal(ck["w"], torch.ones(3))


def test_checkpoint_of_another_model_version_fails_clearly(tmp_path):
    """A checkpoint whose model_args name a setting model.py no longer has stops with its name,
    not a bare TypeError; one that fits loads."""
    from model import GPT, GPTConfig
    args = dict(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)
    model = GPT(GPTConfig(**args))
    good, bad = str(tmp_path / "good.pt"), str(tmp_path / "bad.pt")
    trainer.save_checkpoint(good, {"model": model.state_dict(), "model_args": args})
    trainer.save_checkpoint(bad, {"model": model.state_dict(), "model_args": dict(args, rope_spin=3)})
    assert trainer.load_model(good)[0].config.n_embd == 16
    with pytest.raises(ValueError, match="another version of model.py: GPTConfig has no rope_spin"):
        trainer.load_model(bad)


def test_init_model_gives_the_depth_head_its_weight_and_the_kv_heads(tmp_path):
    cfg = dict(loop_driver.config(str(tmp_path), 1, 1), depth_head=True, depth_head_weight=0.25, n_kv_head=2)
    model = trainer.init_model(cfg, trainer.setup_run("cpu"), loop_driver.TOK, 0)[0]
    assert hasattr(model, "depth_head") and model.config.depth_head_weight == 0.25
    assert model.config.n_kv_head == 2 and model.blocks[0].attn.n_kv_head == 2
    no_reader = trainer.init_model(dict(cfg, reader_pixels=True), trainer.setup_run("cpu"), loop_driver.TOK, 0)[0]
    assert not no_reader.config.reader_pixels  # without image_reader there is no reader to read pixels


def test_a_next_stage_takes_its_own_loss_weights_keeps_the_checkpoints_heads_and_may_add_one(tmp_path):
    """init_from a previous stage's checkpoint: the loss weights come from this run's config where it
    sets them (the checkpoint's where it does not, as in stage 2 and RL), the heads and weights from
    the checkpoint; a head it lacks is added from scratch; turning one of its heads off, or the number
    head on or off, stops with a clear error."""
    from dataclasses import asdict
    run = trainer.setup_run("cpu")
    tok = types.SimpleNamespace(**dict(vars(loop_driver.TOK), codebook_size=8))  # 8 codes for a seg head to name
    cfg = dict(loop_driver.config(str(tmp_path / "a"), 1, 1), depth_head=True, depth_head_weight=0.25, number_weight=1.0)
    earlier = trainer.init_model(cfg, run, tok, 0)[0]
    path = str(tmp_path / "earlier.pt")
    trainer.save_checkpoint(path, {"model": earlier.state_dict(), "model_args": asdict(earlier.config), "iter_num": 1})
    later = trainer.init_model(dict(cfg, init_from=path, depth_head_weight=0.5, number_weight=2.0), run, tok, 0)[0]
    assert (later.config.depth_head_weight, later.config.number_weight) == (0.5, 2.0)
    assert all(torch.equal(later.state_dict()[k], v) for k, v in earlier.state_dict().items())
    kept = {k: v for k, v in cfg.items() if k not in ("depth_head", "depth_head_weight", "number_weight")}
    assert trainer.init_model(dict(kept, init_from=path), run, tok, 0)[0].config.depth_head_weight == 0.25
    grown = trainer.init_model(dict(cfg, init_from=path, seg_head=True, seg_head_weight=0.5), run, tok, 0)[0]
    assert grown.config.seg_codes == tok.codebook_size and grown.config.seg_head_weight == 0.5
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in earlier.state_dict().items())
    for change, message in [(dict(depth_head=False), "trained with the depth head, but this run sets depth_head=False"),
                            (dict(number_weight=0.0), "trained with the number head")]:
        with pytest.raises(ValueError, match=message):
            trainer.init_model(dict(cfg, init_from=path, **change), run, tok, 0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = loop_driver.get_batch
    calls = {"n": 0}
    cfg = loop_driver.config(str(tmp_path / "nan"), 6, 1)
    run = trainer.setup_run("cpu")
    model, opt, start = trainer.init_model(cfg, run, loop_driver.TOK, 0)
    orig_forward = model.forward

    def forward(idx, targets=None, loss_mask=None, **kw):
        logits, loss = orig_forward(idx, targets, loss_mask, **kw)
        calls["n"] += model.training
        return logits, (loss * float("nan") if model.training and calls["n"] == 5 else loss)

    monkeypatch.setattr(model, "forward", forward)
    good = None
    with pytest.raises(trainer.NonFiniteLoss, match="non-finite loss at iteration 4"):
        trainer.train(cfg, run, model, opt, start, real)
    good = trainer.load_checkpoint(str(tmp_path / "nan" / "ckpt.pt"))
    assert good["iter_num"] == 3 and good["tokens_seen"] == 3 * 4 * loop_driver.T and all(torch.isfinite(v).all() for v in good["model"].values())
    assert "last good checkpoint" in capsys.readouterr().out


def test_lr_schedule():
    cfg = dict(warmup_iters=10, max_iters=110, learning_rate=1.0, min_lr=0.1)
    assert trainer.lr_at(0, cfg) == pytest.approx(0.1) and trainer.lr_at(9, cfg) == pytest.approx(1.0)
    assert trainer.lr_at(60, cfg) == pytest.approx(0.55) and trainer.lr_at(110, cfg) == pytest.approx(0.1)


def test_lr_warmdown_holds_the_peak_then_falls_straight():
    cfg = dict(warmup_iters=10, max_iters=110, learning_rate=1.0, min_lr=0.1, warmdown=0.5)
    assert trainer.lr_at(9, cfg) == pytest.approx(1.0) and trainer.lr_at(55, cfg) == pytest.approx(1.0)
    assert trainer.lr_at(82.5, cfg) == pytest.approx(0.55) and trainer.lr_at(110, cfg) == pytest.approx(0.1)
    assert trainer.lr_at(200, cfg) == pytest.approx(0.1)  # past the end it stays at the floor
