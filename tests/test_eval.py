"""eval.py: answer scoring and map metrics on hand-computed cases, and its sampling noise."""
import json
import math
import os

import numpy as np
import pytest
import torch

import batches
import conversations
import data
import eval as ev
import metrics
import prepare
import report
import tokenizer
from tests import loop_driver


@pytest.mark.parametrize("text,unit,want", [
    ("2.3 m", "m", 2.3), ("230cm", "m", 2.3), ("2.3", "m", 2.3), ("The answer is 45 cm.", "cm", 45.0),
    ("0.45 meters", "cm", 45.0), (".5 m", "m", 0.5), ("3 kg", "m", None), ("about two", "m", None),
    (None, "m", None), ("1,5 m", "m", 1.0),
])
def test_parse_number(text, unit, want):
    got = metrics.parse_number(text, unit)
    assert (got is None and want is None) or got == pytest.approx(want)


def test_mra_by_hand():
    assert metrics.mra(2.0, 2.0) == 1.0
    # 10% off: below 1-θ for θ ≤ .85 (.50,.55,…,.85 = 8 of 10 thresholds)
    assert metrics.mra(2.2, 2.0) == pytest.approx(0.8)
    # 30% off: passes θ = .50, .55, .60, .65 (1-θ > .3) -> 4/10
    assert metrics.mra(1.4, 2.0) == pytest.approx(0.4)
    assert metrics.mra(5.0, 2.0) == 0.0 and metrics.mra(None, 2.0) == 0.0
    assert metrics.within_factor_2(3.9, 2.0) == 1.0 and metrics.within_factor_2(4.0, 2.0) == 0.0
    assert metrics.within_factor_2(1.01, 2.0) == 1.0 and metrics.within_factor_2(None, 2.0) == 0.0


def test_score_answer():
    num = {"answer_type": "number", "value": 2.0, "unit": "m", "answer": "2.0 m"}
    assert metrics.score_answer(num, "200 cm") == 1.0 and metrics.score_answer(num, "2 kg") == 0.0
    ch = {"answer_type": "choice", "answer": "red cube"}
    assert metrics.score_answer(ch, " Red cube. ") == 1.0 and metrics.score_answer(ch, "red sphere") == 0.0
    assert metrics.score_answer({"answer_type": "integer", "answer": "3"}, "3") == 1.0
    assert metrics.score_answer({"answer_type": "yesno", "answer": "yes"}, None) == 0.0


def test_chance_scorer():
    train = [{"kind": "relation_left", "question": "Is the red cube to the left of the blue sphere?", "answer": a,
              "answer_type": "yesno"} for a in ["yes", "yes", "no"]]
    train += [{"kind": "size", "question": f"How tall is the {c} cube, in centimeters?", "answer": "", "value": v,
               "answer_type": "number", "unit": "cm"} for c, v in [("red", 40), ("blue", 50), ("green", 90)]]
    score = metrics.chance_scorer(train)
    assert score({"kind": "relation_left", "question": "Is the green cylinder to the left of the red sphere?",
                  "answer": "yes", "answer_type": "yesno"}) == 1.0
    assert score({"kind": "size", "question": "How tall is the white sphere, in centimeters?", "value": 50,
                  "answer_type": "number", "unit": "cm", "answer": ""}) == 1.0  # median 50
    assert score({"kind": "x", "answer_type": "choice", "choices": ["a", "b", "c", "d"], "question": ""}) == 0.25


def test_depth_metrics_by_hand():
    true = np.full((1, 2, 4), 2.0)
    seg = np.array([[[2, 2, 3, 0], [2, 2, 3, 1]]])
    pred = true.copy()
    pred[0, 0, 0] = 3.0  # one pixel of object 2 is 50% off
    pred[0, :, 2] = 2.2  # object 3 is 10% off everywhere
    pred[0, :, 3] = 99.0  # background is not scored
    m = metrics.depth_metrics(pred, true, seg)
    assert m["depth_absrel"] == pytest.approx((0.5 + 0.1 * 2) / 6)
    assert m["depth_absrel_median"] == pytest.approx(0.05)  # of (0, 0, 0, 0.1, 0.1, 0.5)
    assert m["depth_delta1"] == pytest.approx(5 / 6)
    # object 2: median of (3, 2, 2, 2) = 2 -> 0; object 3: 0.1
    assert m["object_depth_absrel"] == pytest.approx(0.05)


def test_depth_metrics_skip_pixels_with_no_true_reading():
    true = np.array([[[2.0, np.nan, 2.0, np.nan]]])  # holes in a real depth file load as NaN
    seg = np.array([[[2, 2, 2, 3]]])  # object 3 is all hole: not scored at all
    pred = np.array([[[2.2, 50.0, 2.6, 9.0]]])
    m = metrics.depth_metrics(pred, true, seg)
    assert m["depth_absrel"] == pytest.approx((0.1 + 0.3) / 2)
    assert m["object_depth_absrel"] == pytest.approx(0.2)  # median(2.2, 2.6) / 2 - 1


def test_seg_miou_by_hand_with_absent_classes():
    true = np.array([[[2, 2, 3, 3], [0, 1, 1, 1]]])
    pred = np.array([[[2, 3, 3, 3], [0, 1, 1, 4]]])  # id 4 absent from the truth: not scored
    # object 2: inter 1, union 2 -> .5; object 3: inter 2, union 3 -> 2/3
    assert metrics.seg_miou(pred, true) == pytest.approx((0.5 + 2 / 3) / 2)
    assert math.isnan(metrics.seg_miou(np.zeros((1, 2, 2)), np.ones((1, 2, 2))))


def test_seg_miou_matched_ignores_colour_order_but_not_shape():
    true = np.array([[[2, 2, 3, 3], [0, 1, 1, 1]]])
    swapped = np.where(true == 2, 3, np.where(true == 3, 2, true))  # right shapes, colours exchanged
    assert metrics.seg_miou(swapped, true) == 0.0 and metrics.seg_miou_matched(swapped, true) == 1.0
    # one predicted object covering both: it matches one of them (IoU 1/2), the other gets nothing
    assert metrics.seg_miou_matched(np.where(true >= 2, 5, true), true) == pytest.approx(0.25)
    pred = np.array([[[2, 3, 3, 3], [0, 1, 1, 4]]])  # the by-hand case above: already the best matching
    assert metrics.seg_miou_matched(pred, true) == pytest.approx(metrics.seg_miou(pred, true))


def fake_scores(acc_by_cat, n=20):
    return [{"category": c, "score": float(i < a * n), "delta2": None} for c, a in acc_by_cat.items() for i in range(n)]


def test_distinct_answers_counts_each_categorys_different_answers():
    """A constant arm gives 1 a category; the count is over a seed's answers, averaged over seeds."""
    constant = [{"category": c, "score": 0.0, "delta2": None, "answer": "yes"} for c in ("relation", "counting") for _ in range(5)]
    assert report.distinct_answers([constant]) == {"relation": (1.0, 5), "counting": (1.0, 5)}
    varied = [dict(s, answer=str(i % 3)) for i, s in enumerate(constant)]
    assert report.distinct_answers([varied, constant]) == {"relation": (2.0, 5), "counting": (2.0, 5)}


def test_summarise_and_claims():
    cats = report.SPATIAL + ("general",)
    base = report.summarise([fake_scores({c: 0.3 for c in cats})])
    better = report.summarise([fake_scores({c: 0.8 for c in cats})])
    assert base["spatial_avg"][0] == pytest.approx(0.3) and base["acc_general"][0] == pytest.approx(0.3)
    se = np.sqrt(0.3 * 0.7 * 20 / 19 / 20)  # binomial SE with ddof=1
    assert base["acc_distance"][1] == pytest.approx(se)
    assert base["spatial_avg"][1] == pytest.approx(np.sqrt(6 * se ** 2) / 6)
    seeds = report.summarise([fake_scores({c: 0.3 for c in cats}), fake_scores({c: 0.5 for c in cats})])
    assert seeds["spatial_avg"] == (pytest.approx(0.4), pytest.approx(0.1))  # mean and SE over two seeds
    text = report.claims({"Base": base, "PE": better, "COOPER": base, "RE": better})
    assert any("PE beats Base on spatial_avg" in c and "+50.0" in c and "held" in c for c in text)
    assert any("COOPER beats RE" in c and "reversed" in c for c in text)
    assert any("keeps general ability" in c and "not shown" in c for c in text)  # equal, but 20 questions a side
    keep = lambda cooper: report.claims({"Base": {"acc_general": (0.80, 0.01)}, "COOPER": {"acc_general": cooper}})[0]  # noqa: E731
    assert keep((0.79, 0.01)).endswith("held.")  # −1 ± 1.4: a loss over 5 points is ruled out
    assert "a clear loss" in keep((0.50, 0.01))
    assert "not shown" in keep((0.79, 0.05))  # −1 ± 5.1: could be a 11-point loss


def test_report_curves_render_from_fake_metrics(tmp_path):
    from PIL import Image
    for stage, key in (("stage1", "loss"), ("rl", "reward")):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text(
            "".join(f'{{"iter": {i}, "{key}": {1.0 / (i + 1)}}}\n' for i in range(10)) + '{"iter": 10, "val_loss": 1}\n')
    out = tmp_path / "report"
    out.mkdir()
    assert report.curves(str(tmp_path), str(out)) == ["loss.png", "reward.png"]
    img = np.asarray(Image.open(out / "loss.png"))
    assert img.shape == (200, 360, 3) and (img != 255).any(axis=-1).mean() > 0.01  # something was drawn


def test_one_evaluation_draws_one_stream_of_noise():
    """Successive sampler calls of one evaluation continue one random stream: with every code
    equally likely, the second batch is not a copy of the first (each call restarting from the
    seed made it one, and gave a row's depth and seg maps the same draws), and the same seed still
    gives the same maps."""
    from tests.test_model import BigramMock
    tok = tokenizer.Tokenizer(tokenizer.train_bpe([tokenizer.DEPTH_INSTRUCTION], 280), codebook_size=64)
    model = BigramMock(tok)  # all-zero logits: every code equally likely
    convs, images = [conversations.map_request("depth")[:1]] * 4, [{"rgb": np.zeros(4, dtype=np.int64)}] * 4
    first = ev.generate_map_codes(model, tok, convs, images, 4, batch_size=2, seed=0, temperature=1.0)
    assert not np.array_equal(first[:2], first[2:])
    again = ev.generate_map_codes(model, tok, convs, images, 4, batch_size=2, seed=0, temperature=1.0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def tiny_data_and_vq(tmp_path):
    """A tiny dataset at 32 px, an untrained VQ with its codes, and a tokenizer:
    (data_dir, vq_path, tok, VQConfig)."""
    from dataclasses import asdict

    import trainer
    import vqgan
    d = str(tmp_path / "data")
    data.build_dataset(d, 4, 2, 8, data.SceneConfig(image_size=32), seed=0)
    mc = vqgan.VQConfig(image_size=32, channels=16, n_res_blocks=1, codebook_size=32)
    torch.manual_seed(0)
    vq_path = str(tmp_path / "vq.pt")
    trainer.save_checkpoint(vq_path, {"model_args": asdict(mc), "model": vqgan.VQModel(mc).state_dict(), "depth_encoding": "log",
                                     "seg_colouring": data.SEG_COLOURING})
    prepare.ensure_codes(d, vq_path)
    return d, vq_path, tokenizer.build_tokenizer(d, 300, mc.codebook_size), mc


def test_answer_given_forces_the_true_map_then_its_reading(tmp_path):
    """answer_given cuts each question's stage-2 trace at the right places: with upto="map" a tool
    question's reply carries the scene's own codes for the tool's map, then the reflection prompt,
    and the trace's reading is left to the model; with upto="reading" the reading is forced too.
    A question answered without a tool gets nothing forced with "map"."""
    from tests.test_model import BigramMock
    import vqgan
    d, _, tok, _ = tiny_data_and_vq(tmp_path)
    split, codes = data.load_split(d, "val"), vqgan.load_codes(d, "val").astype(np.int64)
    with_tool = next(q for q in split["questions"] if q["tool"] != "none")
    without = next(q for q in split["questions"] if q["tool"] == "none")
    model = BigramMock(tok, block_size=1024)
    model.prefer(tok.end_think, tok.answer)  # whatever is forced, the model answers at once
    n_image = codes.shape[-1]
    by = {upto: ev.answer_given(model, tok, [with_tool, without], split, codes, n_image, upto, temperature=0.0)
          for upto in ("map", "reading")}
    def trace(q):
        s = q["scene"]
        readings = conversations.map_readings(split["depth"][s], split["seg"][s])
        return conversations.trace_conversation(q, split["scenes"][s], readings)[-1]["content"]

    reading, plain_reading = trace(with_tool)[4]["think"], trace(without)[0]["think"]
    for upto, (tool_reply, plain_reply) in by.items():
        parts = tok.parse_reply(tool_reply)[0]
        drawn = next(p["image"] for p in parts if "image" in p)
        assert np.array_equal(np.asarray(drawn), batches.scene_codes(codes, with_tool["scene"])[with_tool["tool"]])
        assert (reading in [p.get("think") for p in parts]) == (upto == "reading")
        assert (plain_reading in [p.get("think") for p in tok.parse_reply(plain_reply)[0]]) == (upto == "reading")
    # the model writes on from what was forced: right after the forced reading it opens its answer
    ends = [i for i, t in enumerate(by["reading"][0]) if t == tok.end_think]
    assert by["reading"][0][ends[1] + 1] == tok.answer
    with pytest.raises(ValueError, match="upto"):
        ev.answer_given(model, tok, [with_tool], split, codes, n_image, "maps")
    # a model fine-tuned on brief traces gets its own last thought forced, not a reading
    brief = ev.answer_given(model, tok, [with_tool], split, codes, n_image, "reading", reading="brief", temperature=0.0)[0]
    thoughts = [p.get("think") for p in tok.parse_reply(brief)[0]]
    assert conversations.BRIEF in thoughts and reading not in thoughts


def test_eval_script_writes_the_report_and_workers_agree(tmp_path):
    """python eval.py end to end on untrained checkpoints of every arm under two seeds' roots: the
    report has the table, claims and map grid, and the final line is the same whether the arms are
    evaluated in two worker processes or in this one (each arm's decoding has its own seed)."""
    import subprocess
    import sys
    from dataclasses import asdict

    import trainer
    d, vq_path, tok, mc = tiny_data_and_vq(tmp_path)
    cfg = dict(loop_driver.LOOP, n_layer=1, n_head=2, n_embd=32, block_size=640, attn_impl="sdpa", init_from="scratch")
    for seed_root in ("s1", "s2"):
        for stage in {a[0] for a in ev.ARMS.values()}:
            torch.manual_seed(len(stage) + len(seed_root))
            model = trainer.init_model(cfg, trainer.setup_run("cpu"), tok, mc.grid ** 2)[0]
            trainer.save_checkpoint(str(tmp_path / seed_root / stage / "ckpt.pt"),
                                    {"model": model.state_dict(), "model_args": asdict(model.config)})
    finals = []
    for workers in (2, 1):
        report = tmp_path / f"report{workers}"
        out = subprocess.run([sys.executable, "eval.py", f"--data_dir={d}", f"--vq_ckpt={vq_path}",
                              f"--runs={tmp_path / 's1'},{tmp_path / 's2'}", f"--report_dir={report}",
                              "--n_questions=14", "--n_map_scenes=2", f"--workers={workers}"],
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        finals.append(json.loads(out.stdout.strip().splitlines()[-1].removeprefix("final: ")))
        text = (report / "report.md").read_text()
        assert all(f"| {arm} |" in text for arm in ev.ARMS) and "## Claims" in text and "## Distinct answers" in text
        assert "| COOPER, true map forced |" in text and "| COOPER, true reading forced |" in text
        assert (report / "maps_pe.png").exists()
    assert set(finals[0]) == set(ev.ARMS) and all(f["seeds"] == 2 for f in finals[0].values())
    assert finals[0] == finals[1]


@pytest.mark.parametrize("blind", [False, True])
def test_direct_scores_equal_greedy_answers(tmp_path, blind):
    """direct_scores' one forward pass scores every question as decoding greedily and scoring the
    answer does: a model that always answers "1" is right exactly on the questions whose answer is 1."""
    from tests.test_model import BigramMock
    import vqgan
    d, _, tok, _ = tiny_data_and_vq(tmp_path)
    codes = vqgan.load_codes(d, "test").astype(np.int64)
    qs = [q for s in ("train", "val", "test") for q in data.load_questions(d, s) if q["scene"] < len(codes)]
    model = BigramMock(tok, block_size=1024)
    model.prefer(tok.assistant, tok.answer)
    prev = tok.answer
    for t in tok.encode("1"):
        model.prefer(prev, t)
        prev = t
    model.prefer(prev, tok.end_answer)
    model.prefer(tok.end_answer, tok.eos)
    fast = ev.direct_scores(model, tok, qs, codes, codes.shape[-1], blind=blind, batch_size=5)
    greedy = [metrics.score_answer(q, tok.answer_of(tok.parse_reply(r)[0]))
              for q, r in zip(qs, ev.answer(model, tok, qs, codes, codes.shape[-1], blind=blind, temperature=0.0))]
    assert fast == greedy
    said = [f for f, q in zip(fast, qs) if q["answer_type"] != "number"]  # numbers score 1 by MRA
    assert said == [float(q["answer"] == "1") for q in qs if q["answer_type"] != "number"] and 0 < sum(said) < len(said)


def test_direct_scores_send_each_question_its_own_picture(tmp_path):
    """With rgb, every model call that holds a question image (the forced pass and the decoded
    numbers' prefills) gets, for each row, the picture of the scene whose codes the row holds."""
    from tests.test_model import BigramMock
    import vqgan
    d, _, tok, _ = tiny_data_and_vq(tmp_path)
    codes = vqgan.load_codes(d, "test").astype(np.int64)
    qs = [q for q in data.load_questions(d, "test")]
    rgb = np.broadcast_to(np.arange(len(codes), dtype=np.uint8)[:, None, None, None], (len(codes), 2, 2, 3))
    model, calls = BigramMock(tok, block_size=1024), []
    model.forward = lambda idx, kv_cache=None, rgb=None: calls.append((idx, rgb)) or (model.table[idx], None)
    ev.direct_scores(model, tok, qs, codes, codes.shape[-1], batch_size=5, rgb=rgb)
    read = [(row, picture) for idx, pictures in calls if pictures is not None for row, picture in zip(idx, pictures)]
    assert {q["answer_type"] for q in qs} >= {"number", "choice"} and len(read) >= len(qs)
    for row, picture in read:
        first = row[row >= tok.image_offset][:codes.shape[-1]] - tok.image_offset
        assert torch.equal(first, torch.as_tensor(codes[int(picture[0, 0, 0]), 0]))


def test_number_answers_are_the_median_of_sampled_answers(tmp_path):
    """A number question's reply keeps its greedy part through <answer> and then says the median of
    the values the sampler draws after it (the same draws for the same seed); any other reply is
    the greedy one. The model below writes 2, 3 or 7 equally likely, so greedy (the first of a
    tie) says 2 and the median of 9 draws is usually 3."""
    from tests.test_model import BigramMock
    import sampler
    import vqgan
    d, _, tok, _ = tiny_data_and_vq(tmp_path)
    codes = vqgan.load_codes(d, "val").astype(np.int64)
    split = [q for q in data.load_questions(d, "val") if q["scene"] < len(codes)]
    qs = [next(q for q in split if q["answer_type"] == "number"), next(q for q in split if q["answer_type"] != "number")]
    model = BigramMock(tok, block_size=1024)
    model.prefer(tok.assistant, tok.answer)
    digits = [tok.encode(c)[0] for c in "237"]
    for t in digits:
        model.table.data[tok.answer, t] = 100.0  # the same logit for each digit
        model.prefer(t, tok.end_answer)
    model.prefer(tok.end_answer, tok.eos)
    n = codes.shape[-1]
    greedy = ev.answer(model, tok, qs, codes, n, seed=0, temperature=0.0, number_samples=1)
    median = ev.answer(model, tok, qs, codes, n, seed=0, temperature=0.0, number_samples=9)
    start = greedy[0][:greedy[0].index(tok.answer) + 1]
    assert greedy[0] == start + [digits[0], tok.end_answer, tok.eos] and median[1] == greedy[1]
    prompt = tok.render_prompt(conversations.vqa_conversation(qs[0], answer=False), batches.scene_codes(codes, qs[0]["scene"]))
    draws = sampler.generate(model, tok, [prompt + start] * 9, ev.MAX_NUMBER_TOKENS, n, tools=False, temperature=1.0,
                             generator=torch.Generator().manual_seed(0))
    values = [float(tok.enc.decode([draws.row(b)[0]])) for b in range(9)]
    want = data.number_text(float(np.median(values)), qs[0]["unit"])
    assert median[0] == start + tok.encode(want) + [tok.end_answer, tok.eos] and len(set(values)) > 1
    assert metrics.parse_number(tok.answer_of(tok.parse_reply(median[0])[0]), qs[0]["unit"]) != 2.0


def test_chain_with_true_maps_reads_the_scenes_own_codes(tmp_path):
    """mode="chain_true" asks the perception chain's question after the scene's true depth and seg
    codes (no map is drawn: the model sees one prompt a question, holding all three images), where
    mode="chain" shows the maps the model draws itself."""
    from tests.test_model import BigramMock
    import vqgan
    d, _, tok, _ = tiny_data_and_vq(tmp_path)
    codes = vqgan.load_codes(d, "val").astype(np.int64)
    q = next(q for q in data.load_questions(d, "val") if q["scene"] < len(codes))
    model = BigramMock(tok, block_size=1024)
    model.prefer(tok.assistant, tok.answer)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    n = codes.shape[-1]
    ev.answer(model, tok, [q], codes, n, mode="chain_true", temperature=0.0, number_samples=1)
    prefill = seen[0][0].tolist()
    true = batches.scene_codes(codes, q["scene"])
    for m in ("rgb", "depth", "seg"):
        want = [tok.image_start] + (np.asarray(true[m]) + tok.image_offset).tolist() + [tok.image_end]
        assert any(prefill[i:i + len(want)] == want for i in range(len(prefill))), m
    assert prefill[-1] == tok.assistant and len(seen) > 1  # then it decodes its answer
    seen.clear()
    ev.answer(model, tok, [q], codes, n, mode="chain", temperature=0.0, number_samples=1)
    assert seen[0].shape[1] < len(prefill)  # the first call only asks for the depth map


def test_balanced_sample_and_accuracy_of_no_questions():
    """n questions split evenly over the categories, at least one each; n = 0 asks none, and no
    questions score nothing rather than NaN."""
    qs = [{"category": c, "id": i} for c in ("a", "b", "c") for i in range(5)]
    picked = ev.balanced_sample(qs, 6)
    assert len(picked) == 6 and sorted(q["category"] for q in picked) == ["a", "a", "b", "b", "c", "c"]
    assert ev.balanced_sample(qs, 6) == picked  # a fixed order
    assert len(ev.balanced_sample(qs, 1)) == 3 and ev.balanced_sample(qs, 0) == []
    assert metrics.vqa_accuracy(None, [], []) == {}


def test_report_reads_what_a_stage_started_from(tmp_path):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "config.json").write_text('{"init_from": "out/base/ckpt.pt", "max_iters": 10}')
    assert report.started_from(str(tmp_path), "stage1") == "out/base/ckpt.pt"
    assert report.started_from(str(tmp_path), "stage2") == "scratch"  # no saved config
