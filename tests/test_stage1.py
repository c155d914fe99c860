"""train_stage1.py: the mixture, loss masks, bad config, and a tiny end-to-end run."""
import os
import subprocess
import sys

import math

import numpy as np
import pytest
import torch

import batches
import data
import grounding
import tokenizer
import train_stage1 as s1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 16  # image codes per map in these tests


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    data.build_dataset(d, 20, 4, 4, data.SceneConfig(image_size=32), seed=0)
    return d


@pytest.fixture(scope="module")
def setup(data_dir):
    d = data_dir
    tok = tokenizer.build_tokenizer(d, 300, codebook_size=32)
    codes = np.random.default_rng(0).integers(0, 32, (20, 3, N))
    return tok, codes, data.load_questions(d, "train")


def spans(tok, row):
    starts = (row == tok.image_start).nonzero().flatten().tolist()
    return [row[s + 1:s + 1 + N] - tok.image_offset for s in starts]


def test_base_mixture_is_plain_vqa_only(setup):
    tok, codes, qs = setup
    x, y, m = batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 32, 512, {"vqa": 1.0, "depth": 0, "seg": 0, "chain": 0})
    for b in range(len(x)):
        row = torch.cat([x[b, :1], y[b]])
        sp = spans(tok, row)
        assert len(sp) == 1  # the RGB image only
        scenes = [q["scene"] for q in qs if tok.encode(q["question"]) == _question_ids(tok, row)]
        assert any((sp[0].numpy() == codes[s, 0]).all() for s in scenes)  # the question's own scene
        supervised = y[b][m[b] == 1].tolist()
        assert supervised[0] == tok.answer and supervised[-1] == tok.eos  # only "<answer>…</answer><|eos|>"
        assert not any(t >= tok.image_offset for t in supervised)


def _question_ids(tok, row):
    row = row.tolist()
    end = row.index(tok.image_end)
    return row[end + 1:row.index(tok.assistant)]


def test_base_iters_set_the_base_arms_run_only():
    assert s1.run_iters(aux=False, max_iters=1760, base_iters=2640) == 2640
    assert s1.run_iters(aux=True, max_iters=1760, base_iters=2640) == 1760  # stage 1 keeps its own
    assert s1.run_iters(aux=False, max_iters=1760, base_iters=0) == 1760


def test_blind_batches_are_the_same_questions_without_the_image(setup):
    """The blind baseline's batch: the same draws of questions and answers, no image tokens."""
    tok, codes, qs = setup
    w = {"vqa": 1.0}
    seen, blind = (batches.stage1_batch(tok, codes, qs, np.random.default_rng(3), 8, 512, w, blind=b) for b in (False, True))
    assert (seen[0] >= tok.image_offset).any() and not (blind[0] >= tok.image_offset).any()
    assert not (blind[0] == tok.image_start).any()
    for b in range(8):  # what is supervised (the answer) is the same tokens in both
        assert torch.equal(seen[1][b][seen[2][b].bool()], blind[1][b][blind[2][b].bool()])


def test_packed_vqa_asks_several_questions_of_one_scene_after_one_image(setup):
    """per_image=k: one image, then up to k of that scene's questions, every answer supervised; the
    row begins exactly as the one-question row of its first question."""
    tok, codes, qs = setup
    one = batches.stage1_batch(tok, codes, qs, np.random.default_rng(4), 8, 1024, {"vqa": 1.0})
    packed = batches.stage1_batch(tok, codes, qs, np.random.default_rng(4), 8, 1024, {"vqa": 1.0}, per_image=3)
    single = torch.cat([one[0][0, :1], one[1][0]])  # the same first draw
    n = int((single != tok.pad).sum())
    assert torch.equal(torch.cat([packed[0][0, :1], packed[1][0]])[:n], single[:n])
    for b in range(8):
        row = torch.cat([packed[0][b, :1], packed[1][b]])
        assert len(spans(tok, row)) == 1
        scene = next(s for s in range(len(codes)) if (spans(tok, row)[0].numpy() == codes[s, 0]).all())
        own = [q for q in qs if q["scene"] == scene]
        answers = int((packed[1][b][packed[2][b] == 1] == tok.answer).sum())
        assert answers == min(3, len(own)) and answers > 1
        asked = tok.decode(row.tolist()).split("?")[:answers]
        assert all(any(q["question"].split("?")[0] in a for q in own) for a in asked)


def test_practice_rows_begin_as_the_file_row_and_ask_fresh_questions_of_its_scene(setup, data_dir):
    """practice="drills": the row's first question is the picked one from the question file, as in
    the file-packed row; the others are drawn fresh from its scene (drills among them), so over
    many rows they outnumber the file's own questions. Bad values and real-data scenes stop."""
    tok, codes, qs = setup
    scenes, w = data.load_scenes(data_dir, "train"), {"vqa": 1.0}
    filed = batches.stage1_batch(tok, codes, qs, np.random.default_rng(5), 8, 1024, w, scenes, per_image=4)
    fresh = batches.stage1_batch(tok, codes, qs, np.random.default_rng(5), 8, 1024, w, scenes, per_image=4, practice="drills")
    first = lambda b, row: tok.decode(torch.cat([b[0][row, :1], b[1][row]]).tolist()).split("</answer>")[0]
    asked = []
    assert first(filed, 0) == first(fresh, 0)  # the same first draw
    for r in range(8):
        scene = next(s for s in range(len(codes)) if (spans(tok, fresh[0][r])[0].numpy() == codes[s, 0]).all())
        assert any(q["question"] in first(fresh, r) for q in qs if q["scene"] == scene)
        text = tok.decode(torch.cat([fresh[0][r, :1], fresh[1][r]]).tolist())
        assert int((fresh[1][r][fresh[2][r] == 1] == tok.answer).sum()) == 4 == text.count("</answer>")
        own = [q["question"].split("?")[0] for q in qs if q["scene"] == scene]
        asked += [(t.split("<|user|>")[-1], own) for t in text.split("?")[1:4]]
    assert any("Is there a" in a or "Where is the" in a for a, _ in asked)
    assert sum(a in own for a, own in asked) < len(asked) / 2
    full = batches.stage1_batch(tok, codes, qs, np.random.default_rng(5), 8, 200, w, scenes, per_image=50, practice="scene")
    assert full[0].shape[1] <= 200 and (full[1][:, -40:] != tok.pad).any()  # as many questions as fit the block
    with pytest.raises(ValueError, match="practice_weights takes"):
        batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 2, 1024, w, scenes, per_image=2, practice="scene",
                             practice_weights={"distances": 2})
    for shaping in (dict(practice_weights={"distance": 2}), dict(even_counts=True)):
        with pytest.raises(ValueError, match="practice_weights and even_counts shape"):
            batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 2, 1024, w, scenes, per_image=2, practice="file",
                                 **shaping)
    with pytest.raises(ValueError, match="practice must be"):
        batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 2, 1024, w, scenes, per_image=2, practice="all")
    with pytest.raises(ValueError, match="manifest"):
        batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 2, 1024, w, [{"has_depth": True}] * 20,
                             per_image=2, practice="scene")


def test_map_questions_ask_the_scenes_questions_after_the_maps(setup, data_dir):
    """map_questions=True: a depth or seg row is the map request (its map supervised as before),
    then up to per_image of its scene's questions, each answered; a chain row asks its own question
    first, then more; every answer brings its referring targets; a short block asks fewer."""
    tok, codes, qs = setup
    scenes, cov = data.load_scenes(data_dir, "train"), grounding.place_coverage(data.load_split(data_dir, "train")["seg"], 4)
    for kind, n_maps in (("depth", 2), ("seg", 2), ("chain", 3)):
        x, y, m, extra = batches.stage1_batch(tok, codes, qs, np.random.default_rng(3), 4, 1024, {kind: 1.0}, scenes,
                                              per_image=3, map_questions=True, practice="scene", coverage=cov, refer_heads=2)
        for r in range(4):
            text = tok.decode(torch.cat([x[r, :1], y[r]]).tolist())
            assert text.count("</answer>") == 3 and text.count("<|image|>") == n_maps  # no second RGB
            assert text.split("<|image|>")[-1].count("</answer>") == 3  # every question after the last map
            assert ((y[r] >= tok.image_offset) & (m[r] > 0)).sum() == (n_maps - 1) * N  # every map drawn, supervised
        assert ((extra["refer_at"] >= 0).sum(1) == 3).all()
        is_code = y >= tok.image_offset  # the answers weigh as much as the maps
        assert set(m[is_code].tolist()) == {0, 1} and m[~is_code].sum().item() == pytest.approx(m[is_code].sum().item())
    short = batches.stage1_batch(tok, codes, qs, np.random.default_rng(3), 4, 120, {"depth": 1.0}, scenes,
                                 per_image=9, map_questions=True, practice="scene")
    assert short[0].shape[1] <= 120 and ((short[0] == tok.answer).sum(1) < 9).all()
    with pytest.raises(ValueError, match="map_questions"):
        batches.stage1_batch(tok, codes, qs, np.random.default_rng(3), 4, 1024, {"depth": 1.0}, scenes, per_image=3,
                             map_questions=True, practice="file")


def test_place_labels_follow_each_rows_scene(setup):
    """With places, a batch brings each row's scene's place labels (any kind of example), and -1
    rows for the blind baseline, whose rows show no image; the three token tensors are unchanged."""
    tok, codes, qs = setup
    places = np.arange(20)[:, None, None] * 100 + np.arange(N)[:, None] * 2 + np.arange(2)  # different for each scene
    w = {"vqa": 1, "depth": 1, "seg": 1, "chain": 1}
    for seed in range(6):
        plain = batches.stage1_batch(tok, codes, qs, np.random.default_rng(seed), 4, 1024, w)
        x, y, m, extra = batches.stage1_batch(tok, codes, qs, np.random.default_rng(seed), 4, 1024, w, places=places)
        labels = extra["places"]
        assert all(torch.equal(a, b) for a, b in zip(plain, (x, y, m)))
        for b in range(4):
            first = spans(tok, torch.cat([x[b, :1], y[b]]))[0].numpy()
            scene = int(labels[b, 0, 0]) // 100
            assert (codes[scene, 0] == first).all() and labels[b].tolist() == places[scene].tolist()
    blind = batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 4, 1024, {"vqa": 1}, blind=True, places=places)[3]["places"]
    assert blind.shape == (4, N, 2) and (blind == -1).all()


def test_place_targets_end_with_the_seg_maps_codes(data_dir, setup):
    """seg_head adds, after the object and depth labels, each place's code of the scene's seg
    pseudo-image; alone, it is the only label."""
    _, codes, _ = setup
    splits = {"train": data.load_split(data_dir, "train")}
    heads, _ = batches.place_targets(splits, N, object_head=True, depth_head=True)
    with_seg, _ = batches.place_targets(splits, N, object_head=True, depth_head=True, seg_head=True, codes={"train": codes})
    assert with_seg["train"].shape == (20, N, 3)
    assert (with_seg["train"][..., :2] == heads["train"]).all()
    assert (with_seg["train"][..., 2] == codes[:, data.MODALITIES.index("seg")]).all()
    alone, _ = batches.place_targets(splits, N, seg_head=True, codes={"train": codes})
    assert alone["train"].shape == (20, N, 1) and (alone["train"][..., 0] == with_seg["train"][..., 2]).all()
    assert batches.place_targets(splits, N)[0] == {}
    anchored, _ = batches.place_targets(splits, N, object_head=True, depth_head=True, seg_head=True, codes={"train": codes},
                                        anchor_head=True)  # the anchors last, as model.PLACE_HEADS
    side = int(N ** 0.5)
    assert (anchored["train"][..., :3] == with_seg["train"]).all()
    assert (anchored["train"][..., 3] == grounding.place_anchors(splits["train"]["seg"], splits["train"]["scenes"], side)).all()


def test_noisy_maps_touch_only_the_drawn_maps_inputs(setup):
    """map_noise replaces about that share of the drawn maps' input codes with random codes; the
    question image, the text, the targets and the mask stay as they were; 0 changes nothing."""
    tok, codes, qs = setup
    w = {"vqa": 1, "depth": 1, "seg": 1, "chain": 1}
    cfg = dict(batch_size=32, block_size=1024, questions_per_image=1, practice="file", branched=False, refer_heads=0,
               choose=False, refer_options=False, map_questions=False, practice_weights={})
    scenes = {"train": [{}] * len(codes)}
    plain = batches.stage1_batches(tok, {"train": codes}, {"train": qs}, scenes, cfg, w, {}, {})("train", np.random.default_rng(5))
    x, y, m = batches.stage1_batches(tok, {"train": codes}, {"train": qs}, scenes, dict(cfg, map_noise=0.3), w, {}, {})(
        "train", np.random.default_rng(5))
    assert torch.equal(y, plain[1]) and torch.equal(m, plain[2])
    changed, drawn = 0, 0
    for b in range(len(x)):
        sp_plain, sp = spans(tok, plain[0][b]), spans(tok, x[b])
        assert torch.equal(sp[0], sp_plain[0])  # the question image
        rest = (x[b] < tok.image_offset) | (plain[0][b] < tok.image_offset)
        assert torch.equal(x[b][rest], plain[0][b][rest])  # text and tags
        for a, p in zip(sp[1:], sp_plain[1:]):
            changed, drawn = changed + int((a != p).sum()), drawn + len(p)
    assert drawn > 1000 and 0.24 < changed / drawn < 0.34  # 0.3 × 31/32 (a random code is the true one 1 time in 32), ± 3 s.e.
    again = batches.stage1_batches(tok, {"train": codes}, {"train": qs}, scenes, dict(cfg, map_noise=0.0), w, {}, {})(
        "train", np.random.default_rng(5))
    assert all(torch.equal(a, b) for a, b in zip(again, plain))


def test_pictures_follow_each_rows_scene(setup):
    """With rgb (a split's pictures), a batch brings each row's scene's picture, for a model that
    reads the question image's pixels; the blind baseline's rows show no image and bring none."""
    tok, codes, qs = setup
    rgb = np.broadcast_to(np.arange(len(codes), dtype=np.uint8)[:, None, None, None], (len(codes), 4, 4, 3))
    w = {"vqa": 1, "depth": 1, "seg": 1, "chain": 1}
    for seed in range(6):
        plain = batches.stage1_batch(tok, codes, qs, np.random.default_rng(seed), 4, 1024, w)
        x, y, m, extra = batches.stage1_batch(tok, codes, qs, np.random.default_rng(seed), 4, 1024, w, rgb=rgb)
        assert all(torch.equal(a, b) for a, b in zip(plain, (x, y, m)))
        for b in range(4):
            first = spans(tok, torch.cat([x[b, :1], y[b]]))[0].numpy()
            scene = int(extra["rgb"][b, 0, 0, 0])
            assert (codes[scene, 0] == first).all() and (extra["rgb"][b].numpy() == rgb[scene]).all()
    blind = batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 4, 1024, {"vqa": 1}, blind=True, rgb=rgb)
    assert len(blind) == 3


def test_stage1_mixture_masks(setup):
    tok, codes, qs = setup
    kinds = set()
    for seed in range(12):
        x, y, m = batches.stage1_batch(tok, codes, qs, np.random.default_rng(seed), 4, 512, {"vqa": 1, "depth": 1, "seg": 1, "chain": 1})
        assert len({len(spans(tok, torch.cat([x[b, :1], y[b]]))) for b in range(len(x))}) == 1  # one kind per batch
        kinds |= _check_masks(tok, x, y, m)
    assert kinds == {1, 2, 3}  # vqa; depth or seg generation; the chain


def _check_masks(tok, x, y, m):
    kinds = set()
    for b in range(len(x)):
        row = torch.cat([x[b, :1], y[b]])
        sup = torch.cat([torch.zeros(1, dtype=torch.long), m[b]])
        n_img = len(spans(tok, row))
        kinds.add(n_img)
        first_asst = row.tolist().index(tok.assistant)
        assert sup[:first_asst + 1].sum() == 0  # nothing before the first reply is supervised
        for s in (row == tok.image_start).nonzero().flatten().tolist()[1:]:  # generated maps: codes supervised
            assert sup[s + 1:s + 1 + N].all() and sup[s + 1 + N] == 0  # <|/image|> is forced
        assert (row[sup.bool()] != tok.pad).all()  # padding is never a target
    return kinds


def test_scenes_without_a_true_map_never_draw_it(setup):
    """Real data may lack a depth or seg file (manifest.py's has_depth / has_seg): such a scene
    still serves plain VQA, but is never the source of a map target or a maps-in-context chain."""
    tok, codes, qs = setup
    scenes = [{"has_depth": i >= 10, "has_seg": not 10 <= i < 15} for i in range(len(codes))]
    used = {kind: set() for kind in ("vqa", "depth", "seg", "chain")}
    for kind in used:
        for seed in range(6):
            x, y, _ = batches.stage1_batch(tok, codes, qs, np.random.default_rng(seed), 8, 1024, {kind: 1.0}, scenes)
            for b in range(len(x)):
                rgb = spans(tok, torch.cat([x[b, :1], y[b]]))[0].numpy()
                used[kind] |= {s for s in range(len(codes)) if (codes[s, 0] == rgb).all()}
    assert used["depth"] and not used["depth"] & set(range(10))
    assert used["seg"] and not used["seg"] & set(range(10, 15))
    assert used["chain"] and not used["chain"] & set(range(15))
    assert used["vqa"] & set(range(15))  # plain VQA still uses them
    with pytest.raises(ValueError, match="set depth_weight=0"):
        batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 4, 1024, {"depth": 1.0}, [{"has_depth": False}] * len(codes))


def test_too_long_example_fails_clearly(setup):
    tok, codes, qs = setup
    with pytest.raises(ValueError, match="does not fit block_size 20"):
        batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 4, 20, {"vqa": 1.0})


@pytest.mark.parametrize("arg,msg", [("--max_iter=5", "unknown config key 'max_iter'"),
                                     ("--max_iters=abc", "expected int, got str")])
def test_bad_config_fails_before_any_work(tmp_path, arg, msg):
    r = subprocess.run([sys.executable, "train_stage1.py", f"--data_dir={tmp_path}/d", f"--out_dir={tmp_path}/o", arg],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and msg in r.stderr
    assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "o")


def test_branched_questions_are_each_predicted_as_if_asked_alone(setup, data_dir):
    """branched=True: one image, then each question as its own branch. The model's logits at every
    branch's tokens equal those of the question's own one-question row, so no answer can be read
    off another question; the same questions packed in turn are predicted differently."""
    from model import GPT, GPTConfig
    tok, codes, qs = setup
    scenes, w = data.load_scenes(data_dir, "train"), {"vqa": 1.0}
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          image_offset=tok.image_offset, n_image_tokens=N)).eval()
    x, y, m, extra = batches.stage1_batch(tok, codes, qs, np.random.default_rng(6), 4, 1024, w, scenes, per_image=3,
                                          practice="scene", branched=True)
    br = extra["branches"]
    with torch.no_grad():
        logits = model(x, branches=br)[0]
        assert not torch.allclose(logits, model(x)[0], atol=1e-3)  # in turn, later questions see earlier ones
        checked = 0
        for b in range(4):
            shared = int((br[b] == 0).sum())
            for k in range(1, int(br[b].max()) + 1):
                at = (br[b] == k).nonzero().flatten()
                at = at[x[b, at] != tok.pad] if k == int(br[b].max()) else at
                alone = torch.cat([x[b, :shared], x[b, at]])[None]
                assert (x[b, :shared] >= tok.image_offset).sum() == N  # the image is shared
                torch.testing.assert_close(model(alone)[0][0, shared:], logits[b, at], atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked >= 8
    loss = model(x, y, m, branches=br)[1]
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="branches"):
        model(x[:, :4], kv_cache=object(), branches=br[:, :4])  # the sampler decodes one branch a row


def test_refer_targets_mark_each_answer_and_the_places_of_its_objects(setup, data_dir):
    """refer_heads: the position of each question's <answer> holds the question's index, in order;
    its groups' places are grounding.referent_places of the row's scene; a branched row's referring loss
    is that of its questions asked alone; blind and map batches bring no targets."""
    import conversations
    from model import GPT, GPTConfig
    tok, codes, qs = setup
    scenes, cov = data.load_scenes(data_dir, "train"), grounding.place_coverage(data.load_split(data_dir, "train")["seg"], 4)
    s = next(s for s in range(20) if sum(q["scene"] == s and len(q["objects"]) == 2 for q in qs) >= 1
             and sum(q["scene"] == s for q in qs) >= 3)
    asked = sorted((q for q in qs if q["scene"] == s), key=lambda q: -len(q["objects"]))[:3]
    render = lambda qq: tok.render_conversation(conversations.packed_vqa(qq), batches.scene_codes(codes, s))
    x, y, m = batches.make_batch(tok, [render(asked)], 1024)
    t = batches.refer_targets(tok, x, m, [asked], [cov[s]], 2)
    at = (t["refer_at"][0] >= 0).nonzero().flatten()
    assert t["refer_at"][0, at].tolist() == [0, 1, 2] and (x[0, at] == tok.answer).all()
    for k, q in enumerate(asked):
        groups = grounding.referents(q)
        for h in range(2):
            want = grounding.referent_places(cov[s], groups[h]) if h < len(groups) else np.zeros(N, bool)
            assert t["refer"][0, k, h].tolist() == want.tolist()
    assert t["refer"][0, 0, 1].any()  # a two-object question fills the second head

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          image_offset=tok.image_offset, n_image_tokens=N)).eval()

    def refer_part(rows, row_qs):  # the referring loss and how many (position, head) pairs it averages
        x, y, m, *br = batches.make_batch(tok, rows, 1024)
        t = batches.refer_targets(tok, x, m, row_qs, [cov[s]] * len(rows), 2)
        extra = {"branches": br[0]} if br else {}
        with torch.no_grad():
            return model(x, y, m, **extra, **t)[1] - model(x, y, m, **extra)[1], int(t["refer"].any(-1).sum())
    branched = batches.branched_row([render([q]) for q in asked])
    together, _ = refer_part([branched], [asked])
    alone = [refer_part([render([q])], [[q]]) for q in asked]
    torch.testing.assert_close(together, sum(l * n for l, n in alone) / sum(n for _, n in alone), atol=1e-5, rtol=1e-5)

    w = {"vqa": 1.0}
    b = batches.stage1_batch(tok, codes, qs, np.random.default_rng(1), 4, 1024, w, scenes, per_image=3,
                             coverage=cov, refer_heads=2)
    x, extra = b[0], b[3]
    assert ((extra["refer_at"] >= 0).sum(1) == (x == tok.answer).sum(1)).all()
    blind = batches.stage1_batch(tok, codes, qs, np.random.default_rng(1), 4, 1024, w, scenes, blind=True,
                                 coverage=cov, refer_heads=2)
    maps = batches.stage1_batch(tok, codes, qs, np.random.default_rng(1), 4, 1024, {"depth": 1.0}, scenes,
                                coverage=cov, refer_heads=2)
    assert len(blind) == 3 and len(maps) == 3
    with pytest.raises(ValueError, match="coverage"):
        batches.stage1_batch(tok, codes, qs, np.random.default_rng(1), 4, 1024, w, scenes, refer_heads=2)


def test_number_targets_hold_each_number_answers_log_metres_at_its_answer(setup, data_dir):
    """number_targets: at each number question's <answer> in a packed row, the log of its answer in
    metres (a height in cm divided by 100); NaN everywhere else, a choice question's <answer> too.
    stage1_batch brings them with numbers=True, blind rows included, and not otherwise."""
    import conversations
    tok, codes, qs = setup
    scenes = data.load_scenes(data_dir, "train")
    s = next(s for s in range(40) if {"m", "cm"} <= {q.get("unit") for q in qs if q["scene"] == s}
             and any(q["answer_type"] != "number" for q in qs if q["scene"] == s))
    asked = [q for q in qs if q["scene"] == s][:6]
    x, y, m = batches.make_batch(tok, [tok.render_conversation(conversations.packed_vqa(asked), batches.scene_codes(codes, s))], 1024)
    t = batches.number_targets(tok, x, m, [asked])
    at = (x[0] == tok.answer).nonzero().flatten().tolist()
    want = [math.log(q["value"] / (100 if q["unit"] == "cm" else 1)) if q["answer_type"] == "number" else None for q in asked]
    assert len(at) == len(asked) and any(w is None for w in want) and sum(w is not None for w in want) >= 2
    for pos, w in zip(at, want):
        assert (math.isnan(t[0, pos]) if w is None else abs(t[0, pos].item() - w) < 1e-6)
    assert int((~t.isnan()).sum()) == sum(w is not None for w in want)
    for blind in (False, True):
        b = batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 8, 1024, {"vqa": 1.0}, scenes, blind=blind,
                                 per_image=3, practice="scene", numbers=True)
        n_numbers = (~b[3]["numbers"].isnan()).sum(1)
        assert (n_numbers <= (b[0] == tok.answer).sum(1)).all() and n_numbers.sum() > 0
    assert len(batches.stage1_batch(tok, codes, qs, np.random.default_rng(0), 8, 1024, {"vqa": 1.0}, scenes, per_image=3,
                                    practice="scene")) == 3


def test_choose_and_option_targets_mark_the_words_of_each_option(setup, data_dir):
    """choose: in a packed row, each position that predicts a multiple-choice answer's second or
    later word takes an entry after the questions', marking exactly the question's token that says
    that word in the answer's option (" cube" of "the red cube" where the answer is "red cube", as
    data.answer_key gives it when no one word picks the option out; here every multiple-choice
    answer is made so); nothing for other questions, and refer_heads=0 still marks each answer's
    position. With graphs,
    the last token of each option's name takes an entry after the questions', whose first head
    looks at that option's object."""
    import conversations
    tok, codes, qs = setup
    s = next(s for s in range(40) if any(q["scene"] == s and "options" in q for q in qs)
             and any(q["scene"] == s and "options" not in q for q in qs))
    asked = sorted((q for q in qs if q["scene"] == s), key=lambda q: "options" in q)[-3:]
    assert any("options" not in q for q in asked) and "options" in asked[-1]
    asked = [dict(q, choices=q["options"], answer=q["options"][q["choices"].index(q["answer"])]) if "options" in q else q
             for q in asked]
    rows = [tok.render_conversation(conversations.packed_vqa(asked), batches.scene_codes(codes, s))]
    x, y, m = batches.make_batch(tok, rows, 1024)
    t = batches.refer_targets(tok, x, m, [asked], None, 0, choose=True)
    starts = ((x[0] == tok.answer) & (m[0] == 1)).nonzero().flatten().tolist()
    assert "refer" not in t and [int(t["refer_at"][0, p]) for p in starts] == [0, 1, 2]
    entries = {int(t["refer_at"][0, p]): p for p in (t["refer_at"][0] >= 0).nonzero().flatten().tolist()}
    said = {}  # position of each multiple-choice answer's words -> the question's tokens of its option
    for q, start in zip(asked, starts):
        options = batches.option_tokens(tok, x[0], start, q)
        assert [tok.decode(x[0, p].tolist()).strip() for p in options] == (q["options"] if "options" in q else [])
        if options:
            said.update({start + i: options[q["choices"].index(q["answer"])] for i in range(1, len(tok.encode(q["answer"])))})
    assert sorted(entries) == list(range(len(entries))) and 3 < len(entries) <= 3 + len(said)
    assert not t["choose"][0, :3].any()
    for e in range(3, len(entries)):
        at, marked = entries[e], t["choose"][0, e].nonzero().flatten().tolist()
        assert len(marked) == 1 and marked[0] in said[at] and x[0, marked[0]] == y[0, at]  # the word it predicts

    graphs = [data.load_scenes(data_dir, "train")[s]]
    cov = grounding.place_coverage(data.load_split(data_dir, "train")["seg"], 4)
    t = batches.refer_targets(tok, x, m, [asked], [cov[s]], 2, graphs=graphs)
    at = {int(t["refer_at"][0, p]): p for p in (t["refer_at"][0] >= 0).nonzero().flatten().tolist()}
    offered = [(obj, choice) for q in asked if "options" in q  # each option, in the questions' order
               for obj, choice in zip(grounding.option_objects(q, graphs[0]), q["choices"])]
    assert sorted(at) == list(range(3 + len(offered))) and "choose" not in t  # the questions' entries, then each option's
    for j, (obj, choice) in enumerate(offered):
        p = at[3 + j]
        assert tok.decode(x[0, :p + 1].tolist()).endswith(choice)
        assert t["refer"][0, 3 + j, 0].tolist() == grounding.referent_places(cov[s], [obj]).tolist()
        assert not t["refer"][0, 3 + j, 1].any()
