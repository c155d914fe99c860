"""train_stage2.py and its traces as tokens: loss masks, parse-back, tool statistics, and a tiny
trained model run through the sampler's tool loop. The trace builder itself: test_conversations.py."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import batches
import conversations
import data
import eval as ev
import grounding
import metrics
import tokenizer
import train_stage2 as s2
import trainer
from model import GPT, GPTConfig
from tests import loop_driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 16  # image codes per map in these tests


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    data.build_dataset(d, 40, 4, 4, data.SceneConfig(image_size=32), seed=0)
    tok = tokenizer.build_tokenizer(d, 300, codebook_size=32)
    split = data.load_split(d, "train")
    codes = np.random.default_rng(0).integers(0, 32, (len(split["scenes"]), 3, N))
    return tok, codes, split


def reply_of(tok, ids):
    return ids[ids.index(tok.assistant) + 1:]


def first(traces, kind):
    return next(t for t in traces if t["kind"] == kind)


@pytest.mark.parametrize("image_loss", [True, False])
def test_trace_masks_forced_zero_generated_one(setup, image_loss):
    tok, codes, split = setup
    t = first(conversations.build_traces(split), "distance")
    ids, mask = tok.render_conversation(t["conversation"], batches.scene_codes(codes, t["scene"]), image_loss=image_loss)
    a = ids.index(tok.assistant)
    assert sum(mask[:a + 1]) == 0  # RGB, question, <|assistant|>: the user's
    reply, m = ids[a + 1:], mask[a + 1:]
    s = reply.index(tok.image_start)
    assert reply[s - 1] == tok.tool_close["depth"] and reply[s + N + 1] == tok.image_end
    r = len(tok.reflection_ids)
    assert reply[s + N + 2:s + N + 2 + r] == tok.reflection_ids
    want = [1] * len(reply)  # the model's own plan, tool call, reading, answer and <|eos|>
    want[s] = want[s + N + 1] = 0  # <|image|> and <|/image|> are forced by the sampler
    want[s + 1:s + N + 1] = [int(image_loss)] * N  # the map it draws: configurable
    want[s + N + 2:s + N + 2 + r] = [0] * r  # the reflection prompt: forced
    assert m == want
    g = first(conversations.build_traces(split), "general")  # text only: the whole reply is the model's
    ids, mask = tok.render_conversation(g["conversation"], batches.scene_codes(codes, g["scene"]))
    assert mask[ids.index(tok.assistant) + 1:] == [1] * len(reply_of(tok, ids)) and tok.image_start not in reply_of(tok, ids)


@pytest.mark.parametrize("tools,reading", [("all", "values"), ("none", "values"), ("all", "brief"), ("none", "brief")])
def test_every_trace_parses_back(setup, tools, reading):
    tok, codes, split = setup
    traces = conversations.build_traces(split, tools, reading)
    assert len(traces) == len(split["questions"]) > 100
    if reading == "brief":  # the same trace but for its thoughts: one fixed plan a tool, and BRIEF
        for t, v in zip(traces, conversations.build_traces(split, tools)):
            *rest, thought, answer = t["conversation"][-1]["content"]
            *v_rest, v_thought, v_answer = v["conversation"][-1]["content"]
            assert thought["think"] == conversations.BRIEF and thought != v_thought and answer == v_answer
            if rest:  # a tool call, planned in its one sentence
                assert rest[0] == {"think": conversations.BRIEF_PLANS[rest[1]["tool"]]} and rest[1:] == v_rest[1:]
            assert t["conversation"][:-1] == v["conversation"][:-1]
    for t, q in zip(traces, split["questions"]):
        ids, _ = tok.render_conversation(t["conversation"], batches.scene_codes(codes, t["scene"]))
        parts, error = tok.parse_reply(reply_of(tok, ids))
        assert error is None, (error, t["conversation"])
        want = t["conversation"][-1]["content"]
        assert [next(iter(p)) for p in parts] == [next(iter(p)) for p in want]
        for p, w in zip(parts, want):
            if "image" in p:
                assert (p["image"] == codes[t["scene"], data.MODALITIES.index(w["image"])]).all()
            else:
                assert p == w
        assert tok.answer_of(parts) == q["answer"]


def test_tool_use_statistics_by_hand(setup):
    tok, codes, split = setup
    traces = conversations.build_traces(split)
    qs = split["questions"]
    reply = {}
    for t, q in zip(traces, qs):
        reply.setdefault(q["kind"], (q, reply_of(tok, tok.render_conversation(t["conversation"], batches.scene_codes(codes, t["scene"]))[0])))
    (qd, rd), (qc, rc), (qg, rg) = reply["distance"], reply["counting"], reply["general"]
    questions = [qd, qc, qg, qg, qd]
    replies = [rd, rc, rg, rc, rd[:-1]]  # right; right; right; segmentation for colour; no <|eos|>
    s = metrics.tool_use(tok, questions, replies)
    assert s["format_valid"] == pytest.approx(4 / 5)
    assert s["tool_pattern"] == pytest.approx(4 / 5)  # the cut-off reply still called the right tool
    assert s["use_seg_general"] == 0.5 and s["use_none_general"] == 0.5 and s["pattern_general"] == 0.5
    assert s["use_depth_distance"] == 1.0 and s["use_none_distance"] == 0.0 and s["pattern_counting"] == 1.0
    broken = rd[:rd.index(tok.tool_close["depth"])] + [tok.end_think, tok.eos]  # a call closed by the wrong tag
    s = metrics.tool_use(tok, [qd], [broken])
    assert s["format_valid"] == 0.0 and s["use_depth_distance"] == 1.0 and s["tool_pattern"] == 1.0


def test_tiny_model_follows_the_tool_loop(setup, tmp_path):
    """A tiny model fit to a few traces, answering through ev.answer (the sampler's tool loop):
    every greedy reply is well formed and calls the tool its question's flag names."""
    tok, codes, split = setup
    balanced = conversations.balance_traces(conversations.build_traces(split), per_category=1)
    qs = [split["questions"][i] for t in balanced for i, q in enumerate(split["questions"])
          if q["scene"] == t["scene"] and q["kind"] == t["kind"]][:len(balanced)]
    assert sorted(q["kind"] for q in qs) == sorted(t["kind"] for t in balanced)
    cfg = dict(loop_driver.LOOP, out_dir=str(tmp_path), n_layer=2, n_head=2, n_embd=64, block_size=512,
               batch_size=8, max_iters=200, warmup_iters=10, learning_rate=3e-3, min_lr=3e-4, log_interval=1000,
               eval_interval=1000, eval_iters=1, attn_impl="sdpa", peak_tflops=1.0)
    torch.manual_seed(0)
    run = trainer.setup_run("cpu")
    model, opt, start = trainer.init_model(cfg, run, tok, N)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from two, and loses a lot on a busy machine
    try:
        last = trainer.train(cfg, run, model, opt, start,
                             lambda split_, rng: batches.stage2_batch(tok, codes, balanced, rng, 8, 512))
        model.eval()
        replies = ev.answer(model, tok, qs, codes, N, mode="interleaved", temperature=0.0)
        no_tools = ev.answer(model, tok, qs, codes, N, mode="interleaved", tools=False, temperature=0.0)
    finally:
        torch.set_num_threads(threads)
    assert last["loss"] < 0.5
    stats = metrics.tool_use(tok, qs, replies)
    assert stats["format_valid"] == 1.0 and stats["tool_pattern"] == 1.0, [tok.decode(r) for r in replies]
    for q, r in zip(qs, replies):  # a tool's map is exactly N codes, then the forced reflection prompt
        parts, _ = tok.parse_reply(r)
        for k, p in enumerate(parts):
            if "image" in p:
                assert len(p["image"]) == N and parts[k + 1] == {"forced": tokenizer.REFLECTION_PROMPT}
    assert not any(t in r for r in no_tools for t in tok.tool_open.values())  # the RE arm's loop masks calls


def test_arm_defaults():
    assert s2.arm_paths("none", "out/stage1/ckpt.pt", "out/stage2") == ("out/base/ckpt.pt", "out/stage2_text")
    assert s2.arm_paths("none", "my/ckpt.pt", "out/x") == ("my/ckpt.pt", "out/x")
    assert s2.arm_paths("all", "out/stage1/ckpt.pt", "out/stage2") == ("out/stage1/ckpt.pt", "out/stage2")


@pytest.mark.parametrize("arg,msg", [("--tools=some", "tools must be one of all, none"),
                                     ("--image_loss=yes", "expected float"),
                                     ("--reading=short", "reading must be one of values, brief")])
def test_bad_config_fails_before_any_work(tmp_path, arg, msg):
    r = subprocess.run([sys.executable, "train_stage2.py", f"--data_dir={tmp_path}/d", f"--out_dir={tmp_path}/o",
                        f"--init_from={tmp_path}/i/ckpt.pt", arg], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and msg in r.stderr
    assert not any(os.path.exists(tmp_path / p) for p in ("d", "o", "i"))


def test_place_settings_come_from_the_stage_1_run_and_survive_a_resume(tmp_path):
    """place_losses=True keeps the losses the init model's stage-1 run set; the stage-2 run's own
    checkpoint carries them, so init_from=resume (which names no stage-1 checkpoint) finds them."""
    stage1 = {"object_head": True, "depth_head": False, "seg_head": True, "anchor_head": True, "refer_heads": 2}
    torch.save({"config": dict(stage1, learning_rate=1e-3)}, tmp_path / "stage1.pt")
    kept = s2.place_settings(str(tmp_path / "stage1.pt"), str(tmp_path / "out"))
    assert kept == stage1
    os.makedirs(tmp_path / "out")
    torch.save({"config": {"place_losses": True, "place_settings": kept}}, tmp_path / "out" / "ckpt.pt")
    assert s2.place_settings("resume", str(tmp_path / "out")) == stage1
    torch.save({"config": {}}, tmp_path / "plain.pt")  # a run that set none of them
    assert s2.place_settings(str(tmp_path / "plain.pt"), str(tmp_path / "out")) == {
        "object_head": False, "depth_head": False, "seg_head": False, "anchor_head": False, "refer_heads": 0}


def test_trace_loss_normalises_text_and_codes_apart(setup):
    """weight 0 is the text-only loss (the mask rendered with image_loss=False); the code part is
    the mean over the drawn codes alone, whatever the text/code ratio of the batch."""
    tok, codes, split = setup
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32,
                          image_offset=tok.image_offset, n_image_tokens=N))
    ts = [t for t in conversations.build_traces(split) if any("tool" in p for p in t["conversation"][1]["content"])][:3]
    rows = [tok.render_conversation(t["conversation"], batches.scene_codes(codes, t["scene"])) for t in ts]
    text_rows = [tok.render_conversation(t["conversation"], batches.scene_codes(codes, t["scene"]), image_loss=False) for t in ts]
    batch, text_batch = batches.make_batch(tok, rows, 512), batches.make_batch(tok, text_rows, 512)
    loss0, parts = s2.trace_loss(model, batch, tok.image_offset, 0.0)
    torch.testing.assert_close(loss0, model(*text_batch)[1])
    x, y, m = batch
    code_mask = m * (y >= tok.image_offset)
    assert code_mask.sum() == 3 * N  # one map of N codes a trace
    logp = model.token_logprobs(x, y)
    loss1, _ = s2.trace_loss(model, batch, tok.image_offset, 0.5)
    torch.testing.assert_close(loss1, loss0 + 0.5 * -(logp * code_mask).sum() / code_mask.sum())
    assert parts["loss_codes"] == pytest.approx((-(logp * code_mask).sum() / code_mask.sum()).item(), rel=1e-5)


def test_trace_batches_carry_stage_1s_place_and_referring_losses(setup):
    """place_losses=True: a trace batch's 4th item holds each row's place labels and the referring
    targets at its one <answer>; trace_loss then adds exactly what those add to the model's own loss."""
    tok, codes, split = setup
    side = int(N ** 0.5)
    places, coverage = grounding.place_labels(split, side, True, False), grounding.place_coverage(split["seg"], side)
    traces = conversations.build_traces(split, reading="brief")
    x, y, m, extra = batches.stage2_batch(tok, codes, traces, np.random.default_rng(0), 4, 512, places, coverage, 2)
    assert ((extra["refer_at"] == 0) == ((x == tok.answer) & (m == 1))).all()  # where each trace's answer begins
    assert extra["refer"].shape == (4, 1, 2, N) and extra["places"].shape == (4, N, 1)
    again = batches.stage2_batch(tok, codes, traces, np.random.default_rng(0), 4, 512)
    assert all(torch.equal(a, b) for a, b in zip((x, y, m), again))  # the same rows with or without the targets
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32,
                          image_offset=tok.image_offset, n_image_tokens=N, object_classes=grounding.N_OBJECT_CLASSES))
    plain, _ = s2.trace_loss(model, (x, y, m), tok.image_offset, 0.5)
    with_places, _ = s2.trace_loss(model, (x, y, m, extra), tok.image_offset, 0.5)
    added = model(x, y, m, **extra)[1] - model(x, y, m)[1]
    assert added > 0
    torch.testing.assert_close(with_places, plain + added)
    _, _, _, numbered = batches.stage2_batch(tok, codes, traces, np.random.default_rng(0), 4, 512, numbers=True)
    asks_number = [t["question"]["answer_type"] == "number" for t in (traces[i] for i in np.random.default_rng(0).integers(len(traces), size=4))]
    at = (x == tok.answer) & (m == 1)
    assert any(asks_number) and list(numbered) == ["numbers"]
    assert (~numbered["numbers"].isnan()).sum(1).tolist() == [int(a) for a in asks_number]
    assert (~numbered["numbers"].isnan() <= at).all()  # only where a number answer begins


def test_trace_batches_carry_each_traces_picture(setup):
    """With rgb (the split's pictures), a trace batch brings each row's scene's picture, and
    trace_loss passes it to the model without adding a loss of its own."""
    tok, codes, split = setup
    traces = conversations.build_traces(split, reading="brief")
    rgb = np.broadcast_to(np.arange(len(codes), dtype=np.uint8)[:, None, None, None], (len(codes), 2, 2, 3))
    x, y, m, extra = batches.stage2_batch(tok, codes, traces, np.random.default_rng(0), 4, 512, rgb=rgb)
    plain = batches.stage2_batch(tok, codes, traces, np.random.default_rng(0), 4, 512)
    assert all(torch.equal(a, b) for a, b in zip((x, y, m), plain)) and list(extra) == ["rgb"]
    for b in range(4):
        first = x[b][x[b] >= tok.image_offset][:N] - tok.image_offset
        assert torch.equal(first, torch.as_tensor(codes[int(extra["rgb"][b, 0, 0, 0]), 0]).long())
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32,
                          image_offset=tok.image_offset, n_image_tokens=N))
    seen = []
    forward = model.forward
    model.forward = lambda *a, **kw: seen.append(kw.get("rgb")) or forward(*a, **kw)
    with_rgb, _ = s2.trace_loss(model, (x, y, m, extra), tok.image_offset, 0.5)
    torch.testing.assert_close(with_rgb, s2.trace_loss(model, plain, tok.image_offset, 0.5)[0])
    assert seen[0] is extra["rgb"]
