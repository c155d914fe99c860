"""rl.py: each CPR reward component on crafted replies, the exploration term's branches, group
advantages, the GRPO loss (direction of one step, clipping, KL, no gradient on forced tokens), the
alignment of rollout tensors with the sampler, and GRPO running on the shared training loop."""
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import metrics
import rl
import sampler
import tokenizer
import trainer
from model import GPT, GPTConfig
from tests import loop_driver

N = 4  # image codes per map in these tests
QUESTIONS = ["How far is the red cube from the camera, in meters?", "What color is the sphere?",
             "How many cubes are there?", "Which is closer to the camera, the red cube or the blue sphere?"]
THOUGHTS = ["the cube is near", "the depth map shows the cube at 2 meters", "red cube", "blue sphere", "yes no 3 cm m kg"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids OpenMP barriers stalling on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    texts = QUESTIONS + THOUGHTS + [tokenizer.DEPTH_INSTRUCTION, tokenizer.SEG_INSTRUCTION, tokenizer.REFLECTION_PROMPT]
    return tokenizer.Tokenizer(tokenizer.train_bpe(texts, 300), codebook_size=16)


DIST = {"question": QUESTIONS[0], "answer": "2.0 m", "answer_type": "number", "value": 2.0, "unit": "m",
        "tool": "depth", "category": "distance", "scene": 0}
COLOR = {"question": QUESTIONS[1], "answer": "red", "answer_type": "choice", "choices": ["red", "blue"],
         "tool": "none", "category": "general", "scene": 1}
COUNT = {"question": QUESTIONS[2], "answer": "3", "answer_type": "integer", "tool": "seg", "category": "counting", "scene": 2}
ORDER = {"question": QUESTIONS[3], "answer": "red cube", "answer_type": "choice", "choices": ["red cube", "blue sphere"],
         "tool": "depth", "category": "depth_order", "scene": 0}


def reply(tok, *parts, eos=True):
    """Reply ids (what follows <|assistant|>) for conversation parts; images are N codes."""
    images = {"depth": np.arange(N), "seg": np.arange(N) + 1}
    ids, _ = tok.render_conversation([{"role": "assistant", "content": list(parts)}], images)
    ids = ids[2:]  # drop <|bos|><|assistant|>
    return ids if eos else ids[:-1]


def direct(tok, answer, think="the cube is near"):
    return reply(tok, {"think": think}, {"answer": answer})


def with_tool(tok, answer, tool="depth", calls=1):
    turns = []
    for _ in range(calls):
        turns += [{"think": "the cube is near"}, {"tool": tool}, {"image": tool}, {"forced": tokenizer.REFLECTION_PROMPT}]
    return reply(tok, *turns, {"think": "the depth map shows the cube at 2 meters"}, {"answer": answer})


# --- rewards ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("q,answer,want", [
    (DIST, "2.0 m", 1.0), (DIST, "200 cm", 1.0), (DIST, "2 kg", 0.0),  # the unit is parsed and converted
    (DIST, "2.2 m", 0.8),  # MRA: 10 % off is within 8 of the 10 thresholds .05 … .50
    (DIST, "3.5 m", 0.0),  # 75 % off: no credit
    (DIST, "far away", 0.0),
    (COLOR, "Red.", 1.0), (COLOR, "blue", 0.0), (COUNT, "3", 1.0), (COUNT, "4", 0.0),
    (ORDER, "red cube", 1.0), (ORDER, "blue sphere", 0.0),
])
def test_accuracy_reward(tok, q, answer, want):
    assert rl.accuracy_reward(tok, q, direct(tok, answer)) == pytest.approx(want)
    assert rl.accuracy_reward(tok, q, with_tool(tok, answer)) == pytest.approx(want)  # the answer after a map counts alike


def test_accuracy_reward_without_an_answer_is_zero(tok):
    assert rl.accuracy_reward(tok, DIST, reply(tok, {"think": "2.0 m"})) == 0.0  # a number in the thinking is no answer
    assert rl.accuracy_reward(tok, DIST, []) == 0.0


@pytest.mark.parametrize("case,want", [
    ("direct", 1.0), ("one tool", 1.0), ("two tools", 1.0),
    ("three tools", 0.0),  # 4 turns: more than MAX_TURNS
    ("answer without think", 0.0), ("two answers", 0.0), ("text after the answer", 0.0),
    ("tokens after eos", 0.0), ("no eos", 0.0), ("unclosed think", 0.0), ("tool without its map", 0.0),
    ("think after the answer", 0.0), ("tool but no reflection", 0.0), ("empty", 0.0),
])
def test_format_reward(tok, case, want):
    a = {"answer": "2.0 m"}
    t = {"think": "the cube is near"}
    replies = {
        "direct": direct(tok, "2.0 m"),
        "one tool": with_tool(tok, "2.0 m"),
        "two tools": with_tool(tok, "2.0 m", calls=2),
        "three tools": with_tool(tok, "2.0 m", calls=3),
        "answer without think": reply(tok, a),
        "two answers": reply(tok, t, a, a),
        "text after the answer": reply(tok, t, a, {"text": "cm"}),
        "tokens after eos": direct(tok, "2.0 m") + tok.encode("yes"),
        "no eos": reply(tok, t, a, eos=False),
        "unclosed think": [tok.think] + tok.encode("the cube") + [tok.answer] + tok.encode("2") + [tok.end_answer, tok.eos],
        "tool without its map": reply(tok, t, {"tool": "depth"}, t, a),
        "think after the answer": reply(tok, t, a, t),
        "tool but no reflection": reply(tok, t, {"tool": "seg"}, {"image": "seg"}, t, a),
        "empty": [tok.eos],
    }
    assert rl.format_reward(tok, replies[case]) == want


def test_used_tool(tok):
    assert rl.used_tool(tok, with_tool(tok, "3", tool="seg"))
    assert rl.used_tool(tok, with_tool(tok, "3", calls=3))  # a malformed reply that called tools still used them
    assert not rl.used_tool(tok, direct(tok, "3"))
    assert not rl.used_tool(tok, direct(tok, "3", think="Segment the objects in the image with different colors."))


@pytest.mark.parametrize("n_used,positive,want", [
    (1, True, 0.2),    # fewer than k users, tools help: users encouraged
    (0, True, None),   # nobody to encourage
    (2, False, 0.0),   # fewer than k on a negative question: nothing
    (3, True, 0.0),    # exactly k: nothing either way
    (3, False, 0.0),
    (5, False, -0.2),  # more than k users, tools do not help: users discouraged
    (5, True, 0.0),    # more than k on a positive question: nothing
    (8, False, -0.2),
])
def test_exploration_reward_branches(n_used, positive, want):
    used = [True] * n_used + [False] * (8 - n_used)
    r = rl.exploration_reward(used, positive, k=3, bonus=0.2)
    assert len(r) == 8
    assert all(x == 0.0 for x, u in zip(r, used) if not u)  # non-users never get the term
    assert all(x == pytest.approx(want) for x, u in zip(r, used) if u)


def test_exploration_reward_k_and_bonus_are_parameters():
    used = [True] * 2 + [False] * 6
    assert rl.exploration_reward(used, True, k=2, bonus=0.5) == [0.0] * 8
    assert rl.exploration_reward(used, True, k=3, bonus=0.5)[:2] == [0.5, 0.5]
    assert rl.exploration_reward(used, False, k=1, bonus=0.5)[:2] == [-0.5, -0.5]


def test_cpr_rewards_per_group(tok):
    """Two groups of 4 (k=1): group 1 (positive) has one tool user -> +0.2 there; group 2 (negative)
    has two tool users -> −0.2 each. Accuracy, format and weights combine per rollout."""
    qs = [DIST] * 4 + [COLOR] * 4
    replies = [with_tool(tok, "2.0 m"), direct(tok, "2.0 m"), direct(tok, "9 m"), reply(tok, {"answer": "2.0 m"}),
               with_tool(tok, "red"), with_tool(tok, "blue"), direct(tok, "red"), direct(tok, "blue") + [tok.eos]]
    r = rl.cpr_rewards(tok, qs, replies, group_size=4, weights=(1.0, 0.5, 1.0), k=1, bonus=0.2)
    assert r["accuracy"].tolist() == [1, 1, 0, 1, 1, 0, 1, 0]
    assert r["format"].tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    assert r["tool"].tolist() == [1, 0, 0, 0, 1, 1, 0, 0]
    assert r["explore"].tolist() == pytest.approx([0, 0, 0, 0, -0.2, -0.2, 0, 0])  # group 1 has exactly k users
    torch.testing.assert_close(r["reward"], r["accuracy"] + 0.5 * r["format"] + r["explore"])
    r = rl.cpr_rewards(tok, qs, replies, group_size=4, k=2, bonus=0.2)  # 1 user < 2 on a positive question
    assert r["explore"].tolist() == pytest.approx([0.2, 0, 0, 0, 0, 0, 0, 0])


# --- GRPO ----------------------------------------------------------------------------------------

def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.7, 0.7, 0.7, 0.7, 2.0, 1.0, 1.0, 0.0])
    adv = rl.group_advantages(r, 4, eps=0.0)
    g1 = torch.tensor([0.75, -0.25, -0.25, -0.25]) / torch.tensor([1.0, 0.0, 0.0, 0.0]).std()
    torch.testing.assert_close(adv[:4], g1)
    assert adv[4:8].tolist() == [0.0] * 4  # zero variance: no signal, exactly 0 (not 0/eps noise)
    assert adv[8:].sum().abs() < 1e-6 and adv[8:].std().item() == pytest.approx(1.0)
    assert adv[8] > 0 > adv[11]
    # eps keeps a nearly flat group finite
    assert rl.group_advantages(torch.tensor([1.0, 1.0 + 1e-5]), 2, eps=1e-4).abs().max() < 0.2


def tiny_model(tok, seed=0, block_size=192):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, attn_impl="sdpa",
                         image_offset=tok.image_offset, n_image_tokens=N))


def prompt(tok, q, seed=0):
    codes = np.random.default_rng(seed).integers(0, tok.codebook_size, N)
    return tok.render_prompt([{"role": "user", "content": [{"image": "rgb"}, {"text": q["question"]}]}], {"rgb": codes})


def fake_generation(tok, replies, model=None, prompts=None):
    """A sampler.Generation for given replies: all tokens sampled, logprobs from the model."""
    L = max(len(r) for r in replies)
    tokens = torch.full((len(replies), L), tok.pad)
    sampled = torch.zeros((len(replies), L), dtype=torch.long)
    for b, r in enumerate(replies):
        tokens[b, :len(r)] = torch.tensor(r)
        sampled[b, :len(r)] = 1
    gen = sampler.Generation(tokens, sampled, torch.zeros(tokens.shape), torch.tensor([len(r) for r in replies]))
    if model is not None:
        idx, targets, mask, _ = rl.rollout_tensors(tok, prompts, gen, True)
        with torch.no_grad():
            lp = model.token_logprobs(idx, targets)
        for b, p in enumerate(prompts):
            gen.logprobs[b, :len(replies[b])] = lp[b, len(p) - 1:len(p) - 1 + len(replies[b])]
    return gen


def seq_logprob(model, idx, targets, mask, b):
    with torch.no_grad():
        return (model.token_logprobs(idx, targets)[b] * mask[b]).sum().item()


def test_one_step_raises_positive_and_lowers_negative(tok):
    model = tiny_model(tok).train()
    p = prompt(tok, DIST)
    good, bad = direct(tok, "2.0 m"), direct(tok, "9 m", think="red cube")
    prompts = [p, p]
    gen = fake_generation(tok, [good, bad], model, prompts)
    idx, targets, mask, old = rl.rollout_tensors(tok, prompts, gen, False)
    batch = (idx, targets, mask, {"advantages": torch.tensor([1.0, -1.0]), "old_logprobs": old})
    before = [seq_logprob(model, idx, targets, mask, b) for b in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, stats = rl.grpo_loss(model, batch)
    # at the old policy the ratio is 1: the loss is -mean(A) over tokens and nothing is clipped
    assert loss.item() == pytest.approx(-(mask[0].sum() - mask[1].sum()).item() / mask.sum().item(), abs=1e-5)
    assert stats["clip_frac"] == 0.0 and stats["entropy"] > 0
    loss.backward()
    opt.step()
    after = [seq_logprob(model, idx, targets, mask, b) for b in range(2)]
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3, (before, after)


class LogitsModel(nn.Module):
    """A 'model' whose logits are a parameter the test reads gradients from."""

    def __init__(self, B, T, V):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(B, T, V))

    def forward(self, idx, targets=None, loss_mask=None, rgb=None):  # GPT.forward's contract: with a mask, its positions' logits
        return (self.logits if loss_mask is None else self.logits[loss_mask.bool()]), None


def test_forced_tokens_and_padding_get_no_gradient():
    torch.manual_seed(0)
    B, T, V = 2, 6, 11
    model = LogitsModel(B, T, V)
    targets = torch.randint(0, V, (B, T))
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]])  # 0: prompt, forced, masked codes, padding
    old = torch.log_softmax(model.logits.detach(), -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    batch = (torch.zeros(B, T, dtype=torch.long), targets, mask, {"advantages": torch.tensor([1.0, -0.5]), "old_logprobs": old})
    loss, _ = rl.grpo_loss(model, batch)
    loss.backward()
    g = model.logits.grad.abs().sum(-1)
    assert (g[mask == 0] == 0).all()
    assert (g[mask == 1] > 0).all()


def test_clip_stops_gradient_only_past_the_trust_region():
    """ratio e ≈ 2.7 > 1 + ε: with A > 0 the clipped term wins (no gradient); with A < 0 the
    unclipped one does (gradient flows) — PPO's pessimistic bound."""
    torch.manual_seed(0)
    model = LogitsModel(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.long)
    old = torch.log_softmax(model.logits.detach(), -1).gather(-1, targets[..., None]).squeeze(-1) - 1.0
    batch = (torch.zeros(2, 3, dtype=torch.long), targets, mask, {"advantages": torch.tensor([1.0, -1.0]), "old_logprobs": old})
    loss, stats = rl.grpo_loss(model, batch, clip_eps=0.2)
    loss.backward()
    g = model.logits.grad.abs().sum(-1)
    assert (g[0] == 0).all() and (g[1] > 0).all()
    assert stats["clip_frac"] == 1.0
    model.logits.grad = None
    rl.grpo_loss(model, batch, clip_eps=5.0)[0].backward()  # a wide region: row 0 trains again
    assert (model.logits.grad[0].abs().sum(-1) > 0).all()


def test_kl_term_k3():
    torch.manual_seed(0)
    model = LogitsModel(1, 4, 5)
    targets = torch.randint(0, 5, (1, 4))
    mask = torch.ones(1, 4, dtype=torch.long)
    logp = torch.log_softmax(model.logits.detach(), -1).gather(-1, targets[..., None]).squeeze(-1)
    extra = {"advantages": torch.zeros(1), "old_logprobs": logp}  # A = 0: only the KL term is left
    same = rl.grpo_loss(model, (targets, targets, mask, dict(extra, ref_logprobs=logp)), kl_beta=0.1)
    assert same[0].item() == pytest.approx(0.0, abs=1e-7) and same[1]["kl"] == pytest.approx(0.0, abs=1e-7)
    d = torch.tensor([[0.5, -0.5, 1.0, 0.0]])
    loss, stats = rl.grpo_loss(model, (targets, targets, mask, dict(extra, ref_logprobs=logp + d)), kl_beta=0.1)
    k3 = (d.exp() - d - 1).mean().item()
    assert stats["kl"] == pytest.approx(k3, rel=1e-5) and loss.item() == pytest.approx(0.1 * k3, rel=1e-5)
    assert "kl" not in rl.grpo_loss(model, (targets, targets, mask, extra))[1]  # β = 0: no reference needed


# --- rollouts ------------------------------------------------------------------------------------

def test_rollout_tensors_align_with_the_sampler(tok):
    """Prompts that end right after a tool call: the sampler forces <|image|>, samples N codes,
    forces <|/image|> and the reflection prompt. Old log-probs equal a full forward's at every
    trained position; forced tokens and (by default) codes are not trained."""
    model = tiny_model(tok).eval()
    call = [tok.think] + tok.encode("the cube is near") + [tok.end_think, tok.tool_open["depth"]] \
        + tok.encode(tokenizer.DEPTH_INSTRUCTION) + [tok.tool_close["depth"]]
    prompts = [prompt(tok, DIST, 0) + call, prompt(tok, COUNT, 1)[:-3] + [tok.assistant] + call]  # different lengths
    gen = sampler.generate(model, tok, prompts, 60, N, temperature=1.0, seed=0)
    for images in (False, True):
        idx, targets, mask, old = rl.rollout_tensors(tok, prompts, gen, images)
        assert idx.shape == targets.shape == mask.shape == old.shape
        for b, p in enumerate(prompts):
            r = gen.row(b)
            assert targets[b, len(p) - 1:len(p) - 1 + len(r)].tolist() == r
            assert idx[b, :len(p)].tolist() == p
            m = mask[b, len(p) - 1:len(p) - 1 + len(r)]
            assert mask[b, :len(p) - 1].sum() == 0 and mask[b, len(p) - 1 + len(r):].sum() == 0  # prompt, padding
            assert m[0] == 0 and r[0] == tok.image_start  # forced
            assert m[1 + N] == 0 and r[1 + N] == tok.image_end
            assert m[2 + N:2 + N + len(tok.reflection_ids)].sum() == 0
            assert m[1:1 + N].tolist() == [int(images)] * N  # the codes the model drew
            assert m[2 + N + len(tok.reflection_ids):].sum() > 0  # the reasoning after the map is trained
        with torch.no_grad():
            full = model.token_logprobs(idx, targets)
        torch.testing.assert_close(old, full * mask, atol=1e-4, rtol=0)


def rollout_setup(tok):
    codes = np.random.default_rng(0).integers(0, tok.codebook_size, (3, 3, N))
    cfg = dict(prompts_per_batch=2, group_size=4, temperature=1.0, max_new_tokens=24, tools="all",
               accuracy_weight=1.0, format_weight=1.0, explore_weight=1.0, explore_k=1, explore_bonus=0.2,
               adv_eps=1e-4, rl_image_tokens=False)
    return codes, cfg


def test_rollout_batch_is_a_pure_function_of_the_rng(tok, monkeypatch):
    """Same rng, same batch; groups share a prompt; a group whose rewards are all equal carries no
    gradient and is left out. (A random model earns nothing real: the format reward is replaced by
    one that alternates 0, 1, 0, 1, … so every group has something to learn.)"""
    monkeypatch.setattr(rl, "format_reward", lambda tok, reply, calls=itertools.count(): float(next(calls) % 2))
    model = tiny_model(tok).eval()
    codes, cfg = rollout_setup(tok)
    qs = [DIST, COLOR, COUNT, ORDER]
    a = rl.rollout_batch(model, tok, qs, codes, N, np.random.default_rng(5), cfg)
    b = rl.rollout_batch(model, tok, qs, codes, N, np.random.default_rng(5), cfg)
    c = rl.rollout_batch(model, tok, qs, codes, N, np.random.default_rng(6), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3]["old_logprobs"], b[3]["old_logprobs"])
    assert not (a[0].shape == c[0].shape and torch.equal(a[0], c[0]))
    idx, targets, mask, extra = a
    assert idx.shape[0] == 8 and extra["advantages"].shape == (8,) and extra["stats"]["trained_rows"] == 8
    assert (idx[:4, :3] == idx[0, :3]).all()  # a group shares its prompt
    assert mask[:, -1].any()  # trimmed to the last trained position
    assert set(extra["stats"]) >= {"reward", "r_accuracy", "r_format", "r_explore", "tool_rate", "length"}
    assert not model.training  # rollout_batch restores the mode it found
    model.train()
    rl.rollout_batch(model, tok, qs, codes, N, np.random.default_rng(5), cfg)
    assert model.training
    # rewards 1 1 0 0 | 1 1 1 1: the second group is flat and dropped, the first keeps its 4 rows
    monkeypatch.setattr(rl, "format_reward", lambda tok, reply, calls=itertools.count(): float(next(calls) in (0, 1, 4, 5, 6, 7)))
    idx, targets, mask, extra = rl.rollout_batch(model, tok, qs, codes, N, np.random.default_rng(5), cfg)
    assert idx.shape[0] == 4 and extra["stats"]["trained_rows"] == 4 and extra["stats"]["flat_groups"] == 0.5
    assert (extra["advantages"] != 0).all()
    monkeypatch.setattr(rl, "format_reward", lambda tok, reply: 1.0)  # every group flat: nothing to train
    idx, targets, mask, extra = rl.rollout_batch(model, tok, qs, codes, N, np.random.default_rng(5), cfg)
    assert idx.shape[0] == 0 and extra["advantages"].shape == (0,)
    loss, _ = rl.grpo_loss(model, (idx, targets, mask, extra))
    loss.backward()  # an empty batch is a zero loss, not an error
    assert loss.item() == 0.0


def test_rollouts_read_each_questions_picture(tok, monkeypatch):
    """For a model that reads the question image's pixels, each rollout row carries its scene's
    picture, and the loss's forward reads it as the sampler did: the sampled tokens' log-probs
    are the model's with those pictures."""
    import vqgan
    monkeypatch.setattr(rl, "format_reward", lambda tok, reply, calls=itertools.count(): float(next(calls) % 2))
    reader = dict(image_size=4, downsample=2, channels=16, n_res_blocks=1, codebook_size=tok.codebook_size, code_dim=4)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=192, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, attn_impl="sdpa",
                          image_offset=tok.image_offset, n_image_tokens=N, reader_vq=reader, reader_pixels=True)).eval()
    model.reader.load_vq(vqgan.VQModel(vqgan.VQConfig(**reader)).eval())
    codes, cfg = rollout_setup(tok)
    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    idx, targets, mask, extra = rl.rollout_batch(model, tok, [DIST, COLOR, COUNT], codes, N, np.random.default_rng(5),
                                                 cfg, rgb=rgb)
    assert len(idx) > 0
    for row, picture in zip(idx, extra["rgb"]):
        scene = next(k for k in range(3) if (rgb[k] == picture.numpy()).all())
        assert torch.equal(row[row >= tok.image_offset][:N] - tok.image_offset, torch.as_tensor(codes[scene, 0]))
    torch.testing.assert_close(model.token_logprobs(idx, targets, extra["rgb"]) * mask, extra["old_logprobs"],
                               atol=1e-4, rtol=0)
    loss, _ = rl.grpo_loss(model, (idx, targets, mask, extra))
    assert torch.isfinite(loss)


class BigramPolicy(nn.Module):
    """Logits depend only on the last token (table[last], written by the test): a scripted policy."""

    def __init__(self, tok):
        super().__init__()
        self.config = GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=16)
        self.table = nn.Parameter(torch.zeros(tok.vocab_size, tok.vocab_size))

    def prefer(self, after, *ids):
        for rank, i in enumerate(ids):
            self.table.data[after, i] = 100.0 - 30 * rank  # gaps of 30: near-certain at temperature 1

    def forward(self, idx, kv_cache=None, rgb=None):
        return self.table[idx], None


def test_tools_none_never_calls_a_tool(tok):
    """The RE arm: a policy that always wants a depth call draws maps with tools=all (well-formed,
    so the format reward is 1) and answers straight away with tools=none."""
    m = BigramPolicy(tok)
    A, B = 1, 2  # control bytes: text ids no prompt contains
    m.prefer(tok.assistant, tok.think)
    m.prefer(tok.think, A)
    m.prefer(A, tok.end_think)
    m.prefer(tok.end_think, tok.tool_open["depth"], tok.answer)
    m.prefer(tok.tool_open["depth"], tok.tool_close["depth"])
    m.prefer(tok.image_start, tok.image_offset + 3)
    m.prefer(tok.image_offset + 3, tok.image_offset + 3)
    m.prefer(tok.reflection_ids[-1], tok.think)
    m.prefer(tok.answer, B)
    m.prefer(B, tok.end_answer)
    m.prefer(tok.end_answer, tok.eos)
    codes, cfg = rollout_setup(tok)
    cfg = dict(cfg, max_new_tokens=200)
    stats_all = rl.rollout_batch(m, tok, [DIST], codes, N, np.random.default_rng(0), cfg)[3]["stats"]
    stats_none = rl.rollout_batch(m, tok, [DIST], codes, N, np.random.default_rng(0), dict(cfg, tools="none"))[3]["stats"]
    assert stats_all["tool_rate"] == 1.0 and stats_all["r_format"] == 1.0 and stats_all["tool_rate_pos"] == 1.0
    assert stats_none["tool_rate"] == 0.0 and stats_none["r_format"] == 1.0
    assert stats_all["length"] > stats_none["length"] + 2 * N


class Crash(Exception):
    pass


def test_grpo_on_the_training_loop_logs_rewards_and_resumes_exactly(tok, tmp_path, monkeypatch):
    """GRPO through trainer.train: reward components reach metrics.jsonl, two optimizer steps per
    batch (ppo_epochs=2) clip, and a run killed after its iteration-2 checkpoint and resumed
    continues bit for bit (rollouts come from the rng the loop passes). A random model earns no
    real reward, so here the format reward is replaced by one that varies within a group."""
    monkeypatch.setattr(rl, "format_reward", lambda tok, reply: float(reply[0] % 2 == 0))
    codes, cfg = rollout_setup(tok)
    qs = [DIST, COLOR, COUNT, ORDER]

    def run_loop(name, init="scratch", crash_after=None):
        loop_cfg = dict(loop_driver.LOOP, out_dir=str(tmp_path / name), max_iters=4, init_from=init,
                        n_layer=2, n_head=2, n_embd=32, block_size=96, batch_size=8, warmup_iters=1,
                        learning_rate=1e-2, log_interval=1, eval_interval=2, eval_iters=0, peak_tflops=1.0, attn_impl="sdpa")
        torch.manual_seed(0)
        run = trainer.setup_run("cpu")
        model, opt, start = trainer.init_model(loop_cfg, run, tok, N)
        calls = []

        def get_batch(split, rng):
            calls.append(split)
            if crash_after is not None and len(calls) > crash_after:
                raise Crash()
            return rl.rollout_batch(model, tok, qs, codes, N, rng, cfg)

        trainer.train(loop_cfg, run, model, opt, start, get_batch, loss_fn=lambda m, b: rl.grpo_loss(m, b, 0.2),
                      steps_per_batch=2)
        return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]

    straight = run_loop("straight")
    logged = [r for r in straight if "reward" in r]
    keys = {"r_accuracy", "r_format", "r_explore", "tool_rate", "length", "entropy", "clip_frac"}
    assert len(logged) == 4 and all(keys <= set(r) for r in logged)
    assert all(0 < r["r_format"] < 1 and r["flat_groups"] < 1 for r in logged)  # there is something to learn
    assert all("val_loss" not in r for r in straight)  # eval_iters=0: no val loss for RL
    assert max(r["clip_frac"] for r in logged) > 0  # the second step on a batch leaves the trust region somewhere
    with pytest.raises(Crash):
        run_loop("resumed", crash_after=2)
    resumed = run_loop("resumed", "resume")
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in straight if "loss" in r]
    wa = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_paired_change_by_hand():
    """Scores of four questions before and after: differences 0, +1, 0, −0.5."""
    out = metrics.paired_change([1, 0, 0, 1], [1, 1, 0, 0.5])
    d = np.array([0, 1, 0, -0.5])
    assert out["acc_change"] == pytest.approx(0.125)
    assert out["acc_change_se"] == pytest.approx(np.sqrt(((d - 0.125) ** 2).sum() / 3) / 2)
    assert (out["questions_gained"], out["questions_lost"]) == (1, 1)
