"""Tests for model.py (the transformer, its KV cache) and sampler.py (the one sampler).

Equivalences are checked in fp32 against a full forward pass; the sampler's grammar (image spans,
forced tokens, the tool loop and its turn budget) is checked on mock models whose logits the test
writes, as nanochat's tests/test_engine.py does."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import model as model_module
import optim
import tokenizer
from model import GPT, GPTConfig, KVCache, image_grid_index
from sampler import generate

N_IMAGE = 4  # codes per image in these tests
A, B_ = 1, 2  # two text ids (control bytes) that no BPE'd prompt contains


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread skips an OpenMP barrier per op, which on a shared 2-core
    machine can stall for a scheduler time slice (~10 ms) whenever the other core is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    texts = ["How far apart are the red cube and the blue sphere, in meters?", "3.2 meters",
             tokenizer.DEPTH_INSTRUCTION, tokenizer.SEG_INSTRUCTION, tokenizer.REFLECTION_PROMPT]
    return tokenizer.Tokenizer(tokenizer.train_bpe(texts, 300), codebook_size=16)


def tiny_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(block_size=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,  # head dim 16
                image_offset=tok.image_offset, n_image_tokens=N_IMAGE)
    args.update(kw)
    return GPT(GPTConfig(**args)).eval()


def mixed_sequence(tok, seed, n_codes=N_IMAGE):
    """A rendered conversation with a user image, a tool call, a generated map and an answer."""
    rng = np.random.default_rng(seed)
    images = {"rgb": rng.integers(0, tok.codebook_size, n_codes),
              "depth": rng.integers(0, tok.codebook_size, n_codes)}
    conv = [{"role": "user", "content": [{"image": "rgb"}, {"text": "How far is the red cube?"}]},
            {"role": "assistant", "content": [{"think": "the cube"}, {"tool": "depth"}, {"image": "depth"},
                                              {"forced": tokenizer.REFLECTION_PROMPT},
                                              {"think": "3.2"}, {"answer": f"{seed % 10}.2"}]}]
    return tok.render_conversation(conv, images)


def user_prompt(tok, text, seed=0):
    codes = np.random.default_rng(seed).integers(0, tok.codebook_size, N_IMAGE)
    return tok.render_prompt([{"role": "user", "content": [{"image": "rgb"}, {"text": text}]}], {"rgb": codes})


# ---------------------------------------------------------------------------------------------
# the model

def test_image_grid_index_counts_each_run_of_codes():
    o = 10  # ids >= 10 are codes
    idx = torch.tensor([[1, 10, 15, 11, 12, 2, 3, 19, 10, 4],
                        [13, 14, 5, 11, 11, 11, 11, 11, 11, 6]])
    expect = torch.tensor([[-1, 0, 1, 2, 3, -1, -1, 0, 1, -1],
                           [0, 1, -1, 0, 1, 2, 3, 0, 1, -1]])  # a run longer than n wraps
    assert torch.equal(image_grid_index(idx, o, 4), expect)


def test_grid_rope_lines_up_each_code_with_the_place_it_predicts(tok):
    """In the grid half of the rotations, the query of the map code at place k (which predicts
    place k+1) is rotated exactly like the key of the RGB code at place k+1, and unlike the key at
    place k; the <|image|> tag opening the map queries place 0. The sequence half rotates queries
    and keys alike. Without grid_rope every pair follows the sequence position."""
    model = tiny_model(tok)
    ids, _ = mixed_sequence(tok, 0)  # an RGB image, then a depth map: 4 codes each, a 2 x 2 grid
    idx = torch.tensor([ids])
    pos, place = torch.arange(len(ids))[None], image_grid_index(idx, tok.image_offset, N_IMAGE)
    (cos_q, sin_q), (cos_k, sin_k) = model.rotations(pos, place)
    codes = (place[0] >= 0).nonzero().flatten().tolist()
    rgb, depth = codes[:N_IMAGE], codes[N_IMAGE:]
    half = cos_q.size(-1) // 2  # pairs 0 … half-1 follow the sequence, the rest the grid
    torch.testing.assert_close(cos_q[..., :half], cos_k[..., :half], atol=0, rtol=0)
    query = lambda t: torch.cat((cos_q[0, 0, t, half:], sin_q[0, 0, t, half:]))
    key = lambda t: torch.cat((cos_k[0, 0, t, half:], sin_k[0, 0, t, half:]))
    torch.testing.assert_close(query(depth[0] - 1), key(rgb[0]), atol=0, rtol=0)  # the tag predicts place 0
    for k in range(N_IMAGE - 1):
        torch.testing.assert_close(query(depth[k]), key(rgb[k + 1]), atol=0, rtol=0)
        assert (query(depth[k]) - key(rgb[k])).abs().max() > 0.1
    plain = tiny_model(tok, grid_rope=False)
    rope_q, rope_k = plain.rotations(pos, place)
    assert rope_q is rope_k
    head_dim = plain.config.n_embd // plain.config.n_head
    freq = 1.0 / plain.config.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    torch.testing.assert_close(rope_q[0][0, 0], torch.outer(pos[0].float(), freq).cos())


def test_grid_prior_points_map_codes_at_the_aligned_rgb_place(tok, monkeypatch):
    """With grid_prior, of the attention an untrained model's first head gives the RGB image from
    a map code, most goes to the RGB code at the place the map code predicts; without it the
    aligned place gets about its share (1 of 4)."""
    seen = []

    def keep_probabilities(q, k, v, impl, mask=None):
        att = ((q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5).masked_fill(
            ~torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        seen.append(att[0])
        return att @ v

    monkeypatch.setattr(model_module, "attend", keep_probabilities)
    ids, _ = mixed_sequence(tok, 0)
    idx = torch.tensor([ids])
    codes = (image_grid_index(idx, tok.image_offset, N_IMAGE)[0] >= 0).nonzero().flatten().tolist()
    rgb, depth = codes[:N_IMAGE], codes[N_IMAGE:]
    for prior, lowest, highest in ((6.0, 0.5, 1.0), (0.0, 0.0, 0.5)):
        seen.clear()
        tiny_model(tok, grid_prior=prior)(idx)
        aligned = [(seen[0][0, depth[k], rgb[k + 1]] / seen[0][0, depth[k], rgb].sum()).item() for k in range(N_IMAGE - 1)]
        assert all(lowest < a < highest for a in aligned), (prior, aligned)


def test_grid_embedding_reaches_only_image_codes(tok):
    """Changing the grid table changes the logits from the first image code on, never before."""
    model = tiny_model(tok)
    ids, _ = mixed_sequence(tok, 0)
    idx = torch.tensor([ids])
    first = ids.index(next(t for t in ids if t >= tok.image_offset))
    before, _ = model(idx)
    with torch.no_grad():
        model.wpe_image.weight.add_(1.0)
    after, _ = model(idx)
    torch.testing.assert_close(after[:, :first], before[:, :first], atol=0, rtol=0)
    assert (after[:, first] - before[:, first]).abs().max() > 1e-3


def test_code_patches_reach_only_image_codes_and_travel_with_the_weights(tok):
    """The code table changes the logits from the first image code on, never before, and a
    model loaded from the state dict computes the same logits."""
    model = tiny_model(tok, code_patch_dim=6)
    ids, _ = mixed_sequence(tok, 0)
    idx = torch.tensor([ids])
    first = ids.index(next(t for t in ids if t >= tok.image_offset))
    before, _ = model(idx)
    with torch.no_grad():
        model.code_patches.copy_(torch.randn_like(model.code_patches))
    after, _ = model(idx)
    torch.testing.assert_close(after[:, :first], before[:, :first], atol=0, rtol=0)
    assert (after[:, first] - before[:, first]).abs().max() > 1e-3
    loaded = tiny_model(tok, seed=1, code_patch_dim=6)
    loaded.load_state_dict(model.state_dict())
    torch.testing.assert_close(loaded(idx)[0], after, atol=0, rtol=0)


@pytest.mark.parametrize("grid_prior,n_kv_head", [(0.0, 0), (6.0, 0), (6.0, 1)])
def test_kv_cache_prefill_and_decode_equal_full_forward(tok, grid_prior, n_kv_head):
    model = tiny_model(tok, grid_prior=grid_prior, n_kv_head=n_kv_head)
    ids, _ = mixed_sequence(tok, 0, n_codes=12)
    idx = torch.tensor([ids])
    T = idx.size(1)
    full, _ = model(idx)
    # split points: inside the user image span, in text, inside the generated map
    image_positions = [i for i, t in enumerate(ids) if t >= tok.image_offset]
    for split in (image_positions[5], image_positions[12] - 3, image_positions[-4]):
        cache = KVCache(model.config, 1, T)
        pieces = [model(idx[:, :split], kv_cache=cache)[0]]
        cache.lengths += split
        for t in range(split, T):  # token by token
            pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
            cache.lengths += 1
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    # pure token-by-token decode from an empty cache
    cache = KVCache(model.config, 1, T)
    pieces = []
    for t in range(T):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
        cache.lengths += 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_rows_of_different_lengths(tok):
    """Right-padded prefill, then per-row positions: each row matches its own full forward."""
    model = tiny_model(tok)
    seqs = [mixed_sequence(tok, s)[0] for s in (1, 2)]
    seqs[1] = seqs[1][:len(seqs[1]) - 9]
    prompt_lens = [len(s) - 6 for s in seqs]
    x = torch.full((2, max(prompt_lens)), tok.pad)
    for b, s in enumerate(seqs):
        x[b, :prompt_lens[b]] = torch.tensor(s[:prompt_lens[b]])
    cache = KVCache(model.config, 2, max(len(s) for s in seqs))
    prefill, _ = model(x, kv_cache=cache)
    cache.lengths = torch.tensor(prompt_lens)
    decoded = [[] for _ in seqs]
    for step in range(6):
        column = torch.tensor([[s[n + step]] for s, n in zip(seqs, prompt_lens)])
        logits, _ = model(column, kv_cache=cache)
        cache.lengths += 1
        for b in range(2):
            decoded[b].append(logits[b, 0])
    for b, s in enumerate(seqs):
        full, _ = model(torch.tensor([s]))
        n = prompt_lens[b]
        torch.testing.assert_close(prefill[b, :n], full[0, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.stack(decoded[b]), full[0, n:], atol=1e-5, rtol=0)


def test_kv_cache_select_rows_drops_in_place_and_fans_out(tok):
    """Dropping rows compacts the buffers in place (no new allocation); fanning out copies rows.
    Either way every kept row's filled positions, ids and length are those of its source row."""
    model = tiny_model(tok)
    x = torch.stack([torch.tensor(mixed_sequence(tok, s)[0][:30]) for s in range(4)])
    cache = KVCache(model.config, 4, 40)
    model(x, kv_cache=cache)
    cache.lengths = torch.tensor([30, 28, 25, 30])
    k, v, ids = cache.k.clone(), cache.v.clone(), cache.ids.clone()
    storage = cache.k.untyped_storage().data_ptr()
    cache.select_rows(torch.tensor([0, 2, 3]))
    assert cache.k.untyped_storage().data_ptr() == storage and cache.k.shape[1] == 3
    for j, r in enumerate([0, 2, 3]):
        assert torch.equal(cache.k[:, j, :, :30], k[:, r, :, :30]) and torch.equal(cache.v[:, j, :, :30], v[:, r, :, :30])
        assert torch.equal(cache.ids[j, :30], ids[r, :30])
    assert cache.lengths.tolist() == [30, 25, 30]
    cache.select_rows(torch.tensor([1, 1, 0, 2, 1]))
    for j, r in enumerate([2, 2, 0, 3, 2]):
        assert torch.equal(cache.k[:, j, :, :30], k[:, r, :, :30]) and torch.equal(cache.ids[j, :30], ids[r, :30])
    assert cache.lengths.tolist() == [25, 25, 30, 30, 25] and cache.k.shape[1] == 5


def test_loss_is_mean_over_supervised_positions_and_logprobs_match(tok):
    model = tiny_model(tok)
    ids, mask = mixed_sequence(tok, 3)
    idx, targets = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    loss_mask = torch.tensor([mask[1:]])
    logprobs = model.token_logprobs(idx, targets)
    masked_logits, loss = model(idx, targets, loss_mask)
    _, loss_all = model(idx, targets)
    assert 0 < loss_mask.sum() < loss_mask.numel()
    torch.testing.assert_close(loss, -(logprobs * loss_mask).sum() / loss_mask.sum())
    torch.testing.assert_close(loss_all, -logprobs.mean())
    assert not torch.isclose(loss, loss_all)
    # with a mask the head runs only where the loss is, and gives there what the full forward gives
    torch.testing.assert_close(masked_logits, model(idx)[0][loss_mask.bool()])
    torch.testing.assert_close(model(idx, loss_mask=loss_mask)[0], masked_logits)  # a mask without targets: no loss


TINY_VQ = dict(image_size=8, downsample=4, channels=16, n_res_blocks=1, codebook_size=16, code_dim=4)  # a 2×2 grid


def test_image_reader_reads_the_first_image_through_the_vq_decoder(tok):
    """The reader's pixels are the VQ's own decode; its features reach the logits from the first
    image's codes on, never before, travel with the weights, and a cache prefilled past the first
    image then decoding token by token gives the full forward's logits."""
    import vqgan
    vq = vqgan.VQModel(vqgan.VQConfig(**TINY_VQ)).eval()
    model = tiny_model(tok, reader_vq=TINY_VQ)
    model.reader.load_vq(vq)
    codes = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    z = model.reader.codebook[codes].view(2, 2, 2, -1).permute(0, 3, 1, 2)
    pixels = vqgan.tensor_to_images(model.reader.decoder(z))
    assert torch.equal(pixels, vq.decode(codes))
    ids, _ = mixed_sequence(tok, 0)
    idx = torch.tensor([ids])
    codes_at = [i for i, t in enumerate(ids) if t >= tok.image_offset]
    before, _ = model(idx)
    with torch.no_grad():
        model.reader.stem[-1].bias.add_(1.0)
    after, _ = model(idx)
    torch.testing.assert_close(after[:, :codes_at[0]], before[:, :codes_at[0]], atol=0, rtol=0)
    assert (after[:, codes_at[0]] - before[:, codes_at[0]]).abs().max() > 1e-3
    loaded = tiny_model(tok, seed=1, reader_vq=TINY_VQ)
    loaded.load_state_dict(model.state_dict())
    torch.testing.assert_close(loaded(idx)[0], after, atol=0, rtol=0)
    split = codes_at[N_IMAGE] + 1  # inside the generated map
    cache = KVCache(model.config, 1, idx.size(1))
    pieces = [model(idx[:, :split], kv_cache=cache)[0]]
    cache.lengths += split
    for t in range(split, idx.size(1)):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
        cache.lengths += 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), after, atol=1e-5, rtol=0)


def test_pixel_reader_reads_the_images_it_is_given_in_place_of_the_decoded_codes(tok):
    """With reader_pixels the stem reads each row's given picture: the VQ's own decode of the codes
    gives the decoding reader's logits (to uint8 rounding), another picture changes the logits from
    the first code on, a row without an image ignores its picture, a cache's prefill reads them as
    the full forward does, and a missing rgb= stops."""
    import vqgan
    vq = vqgan.VQModel(vqgan.VQConfig(**TINY_VQ)).eval()
    decoding = tiny_model(tok, reader_vq=TINY_VQ)
    decoding.reader.load_vq(vq)
    model = tiny_model(tok, reader_vq=TINY_VQ, reader_pixels=True)
    model.load_state_dict(decoding.state_dict())
    ids, _ = mixed_sequence(tok, 0)
    text_only = [t for t in ids if t < tok.image_offset]
    idx = torch.tensor([ids, text_only + [tok.pad] * (len(ids) - len(text_only))])
    codes_at = [i for i, t in enumerate(ids) if t >= tok.image_offset]
    codes = torch.tensor([ids[i] - tok.image_offset for i in codes_at[:N_IMAGE]])[None]
    decoded = vq.decode(codes)  # uint8 (1, H, W, 3)
    images = torch.cat([decoded, torch.zeros_like(decoded)])
    want, _ = decoding(idx)
    got, _ = model(idx, rgb=images)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    other, _ = model(idx, rgb=255 - images)
    torch.testing.assert_close(other[0, :codes_at[0]], got[0, :codes_at[0]], atol=0, rtol=0)
    assert (other[0, codes_at[0]:] - got[0, codes_at[0]:]).abs().max() > 1e-3
    torch.testing.assert_close(other[1], got[1], atol=0, rtol=0)  # no image in the row: its picture unread
    cache = KVCache(model.config, 2, idx.size(1))
    split = codes_at[N_IMAGE] + 1
    pieces = [model(idx[:, :split], kv_cache=cache, rgb=images)[0]]
    cache.lengths += split
    for t in range(split, idx.size(1)):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])  # the image was read at the prefill
        cache.lengths += 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), got, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="reader_pixels"):
        model(idx)
    assert torch.equal(decoding(idx, rgb=255 - images)[0], want)  # a decoding reader ignores pictures


def test_too_long_fails_clearly(tok):
    model = tiny_model(tok, seed=1, block_size=32)  # seed 1: greedy does not stop at once
    with pytest.raises(ValueError, match=r"length 33.*block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"length 40.*block_size 32"):
        generate(model, tok, [[tok.bos] * 40], 5, N_IMAGE)
    # a row that fills the block stops there and leaves the batch; the rows beside it carry on
    # unharmed, each as it would alone (two rows leave, at different steps)
    full, mid, short = [tok.bos] * 29, [tok.bos] * 25, [tok.bos, tok.user, tok.assistant]
    out = generate(model, tok, [full, short, mid], 10, N_IMAGE, temperature=0)
    assert out.lengths.tolist() == [3, 10, 7]
    for b, p in enumerate([full, short, mid]):
        alone = generate(model, tok, [p], 10, N_IMAGE, temperature=0)
        assert out.row(b) == alone.row(0)
        torch.testing.assert_close(out.logprobs[b, :out.lengths[b]], alone.logprobs[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_head", [0, 1])  # 1: grouped-query attention, one K/V head for both query heads
def test_sdpa_and_math_agree_on_outputs_and_gradients(tok, n_kv_head):
    _backends_agree(tok, "sdpa", "math", n_kv_head=n_kv_head)


@pytest.mark.parametrize("n_kv_head", [0, 1])
def test_triton_matches_sdpa(tok, n_kv_head):
    pytest.importorskip("triton")  # on CPU the kernels run under TRITON_INTERPRET (conftest.py)
    _backends_agree(tok, "sdpa", "triton", n_kv_head=n_kv_head)


def test_grouped_query_attention_is_shared_heads():
    """A model with one K/V head for its two query heads computes what a full-head model computes
    whose two K/V heads are copies of that one: GQA is head sharing, nothing else. And the K/V
    heads must divide the query heads."""
    torch.manual_seed(0)
    config = dict(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    gqa, full = GPT(GPTConfig(**config, n_kv_head=1)).eval(), GPT(GPTConfig(**config)).eval()
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith("c_attn.weight"):  # rows: q (2 heads of 16), k (1 head), v (1 head)
            q, k, v = w.split((32, 16, 16))
            state[name] = torch.cat([q, k, k, v, v])
    full.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(gqa(idx)[0], full(idx)[0], atol=1e-5, rtol=0)
    assert gqa.get_num_params() < full.get_num_params()
    with pytest.raises(ValueError, match="n_kv_head=3"):
        GPT(GPTConfig(**dict(config, n_head=4), n_kv_head=3))


def _backends_agree(tok, impl_a, impl_b, **kw):
    results = []
    for impl in (impl_a, impl_b):
        model = tiny_model(tok, attn_impl=impl, **kw).train()
        ids = [mixed_sequence(tok, s)[0][:30] for s in (4, 5)]
        idx = torch.tensor(ids)
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (la, lossa, ga), (lb, lossb, gb) = results
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lossa, lossb, atol=1e-6, rtol=1e-6)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_overfits_one_batch_of_text_and_images(tok, optimizer):
    """Loss on a fixed batch of 4 mixed sequences falls below 0.05 nats within 150 steps."""
    model = tiny_model(tok, n_embd=64, n_head=4).train()
    rendered = [mixed_sequence(tok, s, n_codes=8) for s in range(4)]
    T = min(len(ids) for ids, _ in rendered)
    idx = torch.tensor([ids[:T] for ids, _ in rendered])
    loss_mask = torch.tensor([mask[1:T] for _, mask in rendered])
    assert (idx[:, 1:][loss_mask.bool()] >= tok.image_offset).any()  # supervised image codes too
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), optimizer=optimizer)
    first = None
    for step in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:], loss_mask)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert first > 3.0 and loss.item() < 0.05, (first, loss.item(), step)


def test_optimizer_groups(tok):
    model = tiny_model(tok)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_groups_cover_every_parameter_once(tok):
    model = tiny_model(tok)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), optimizer="muon", muon_lr=0.02)
    muon, decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon["muon"] and muon["lr_scale"] == pytest.approx(20.0)
    assert {names[id(p)].split(".")[-2] for p in muon["params"]} == {"c_attn", "c_proj", "c_fc"}
    assert {names[id(p)] for p in decay["params"]} == {"wte.weight", "wpe_image.weight", "lm_head.weight"}
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(map(id, model.parameters()))


def test_muon_optimizer_without_muon_groups_is_adamw(tok):
    """Muon's AdamW half, written out, takes the same steps as torch's AdamW."""
    a, b = tiny_model(tok), tiny_model(tok)
    b.load_state_dict(a.state_dict())
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                        {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opts = [torch.optim.AdamW(groups(a), lr=1e-2, betas=(0.9, 0.95)), optim.Muon(groups(b), lr=1e-2, betas=(0.9, 0.95))]
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    for _ in range(3):
        for model, opt in zip((a, b), opts):
            model(idx[:, :-1], idx[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_flops_per_token_by_hand():
    """2 layers, 32 wide, 2 heads, vocab 100, counted by hand. A block has 2·32 (its RMSNorms) +
    2·16 (q/k norms) + 32·96 + 32·32 (attention) + 32·128 + 128·32 (MLP) = 12,384 weights; with
    ln_f (32) and the head (100·32) that is 28,000 (embedding tables are lookups, not counted).
    At T = 64: 6·28,000 for the matmuls + 6·L·C·T = 6·2·32·64 for causal attention = 192,576."""
    model = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=32, n_image_tokens=16))
    assert model.get_num_params() == 28_000
    assert model.flops_per_token(64) == 192_576


# ---------------------------------------------------------------------------------------------
# the sampler on a real (random) model

def test_batched_generation_equals_per_row_greedy(tok):
    model = tiny_model(tok, seed=1)
    prompts = [user_prompt(tok, "How far?", 0), user_prompt(tok, "How far apart are the red cube and the sphere?", 1),
               [tok.bos, tok.user, tok.assistant]]
    assert len({len(p) for p in prompts}) == 3
    kw = dict(max_new_tokens=40, n_image_tokens=N_IMAGE, temperature=0)
    batched = generate(model, tok, prompts + [prompts[0]], **kw)  # a repeated prompt is prefilled once
    for b, p in enumerate(prompts):
        alone = generate(model, tok, [p], **kw)
        assert batched.row(b) == alone.row(0)
        n = alone.lengths[0]
        assert torch.equal(batched.sampled_mask[b, :n], alone.sampled_mask[0, :n])
        torch.testing.assert_close(batched.logprobs[b, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)
    assert batched.row(3) == batched.row(0)
    assert len(set(map(tuple, (batched.row(b) for b in range(3))))) == 3


def test_shared_prefill_equals_per_row_prefill_when_sampling(tok):
    """An RL batch: groups of rows continuing one prompt. Prefilling each prompt once and fanning it
    out gives the same samples, token for token and log-prob for log-prob, as prefilling every row."""
    model = tiny_model(tok, seed=4)
    prompts = [user_prompt(tok, "How far?", 0)] * 4 + [user_prompt(tok, "Which is closer, the cube or the sphere?", 1)] * 4
    kw = dict(max_new_tokens=40, n_image_tokens=N_IMAGE, temperature=1.0, seed=7)
    shared, per_row = generate(model, tok, prompts, **kw), generate(model, tok, prompts, share_prefill=False, **kw)
    assert torch.equal(shared.tokens, per_row.tokens)
    assert torch.equal(shared.sampled_mask, per_row.sampled_mask) and torch.equal(shared.lengths, per_row.lengths)
    torch.testing.assert_close(shared.logprobs, per_row.logprobs, atol=1e-5, rtol=0)
    assert len({tuple(shared.row(b)) for b in range(4)}) > 1  # a group's replies differ: the rows really sample


def test_generation_reads_each_prompts_own_pixels(tok):
    """For a model that reads the question image's pixels, each row's sample depends on its own
    picture: batched rows equal their generations alone, a shared prefill equals per-row prefills,
    and another picture for one row changes that row only."""
    import vqgan
    model = tiny_model(tok, seed=1, reader_vq=TINY_VQ, reader_pixels=True)
    model.reader.load_vq(vqgan.VQModel(vqgan.VQConfig(**TINY_VQ)).eval())
    prompts = [user_prompt(tok, "How far?", 0), user_prompt(tok, "Which is closer, the cube or the sphere?", 1)] * 2
    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)).repeat(2, 1, 1, 1)
    kw = dict(max_new_tokens=30, n_image_tokens=N_IMAGE)
    batched = generate(model, tok, prompts, temperature=0, rgb=rgb, **kw)
    for b in range(2):
        assert batched.row(b) == generate(model, tok, prompts[b:b + 1], temperature=0, rgb=rgb[b:b + 1], **kw).row(0)
    shared = generate(model, tok, prompts, temperature=1.0, seed=7, rgb=rgb, **kw)
    per_row = generate(model, tok, prompts, temperature=1.0, seed=7, rgb=rgb, share_prefill=False, **kw)
    assert torch.equal(shared.tokens, per_row.tokens)
    torch.testing.assert_close(shared.logprobs, per_row.logprobs, atol=1e-5, rtol=0)
    other = rgb.clone()
    other[1] = 255 - other[1]
    changed = generate(model, tok, prompts[:2], temperature=0, rgb=other[:2], **kw)
    assert changed.row(0) == batched.row(0)
    n = int(min(changed.lengths[1], batched.lengths[1]))
    assert (changed.logprobs[1, :n] - batched.logprobs[1, :n]).abs().max() > 1e-3


def test_returned_logprobs_are_the_models(tok):
    model = tiny_model(tok, seed=2)
    prompts = [user_prompt(tok, "How far?"), [tok.bos, tok.user, tok.assistant]]
    out = generate(model, tok, prompts, 30, N_IMAGE, temperature=1.0, seed=0)
    for b, p in enumerate(prompts):
        seq = torch.tensor([p + out.row(b)])
        ref = model.token_logprobs(seq[:, :-1], seq[:, 1:])[0, len(p) - 1:]
        n = out.lengths[b]
        sampled = out.sampled_mask[b, :n].bool()
        assert sampled.sum() > 10
        torch.testing.assert_close(out.logprobs[b, :n][sampled], ref[sampled], atol=1e-5, rtol=0)
        assert (out.logprobs[b, :n][~sampled] == 0).all()


# ---------------------------------------------------------------------------------------------
# the sampler's grammar on mock models

class BigramMock(nn.Module):
    """Logits depend only on the last token: table[last]. The test writes the table."""

    def __init__(self, tok, block_size=512):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=16)
        self.table = nn.Parameter(torch.zeros(tok.vocab_size, tok.vocab_size), requires_grad=False)

    def prefer(self, after, *ids):
        """After token `after`, prefer ids in the order given."""
        for rank, i in enumerate(ids):
            self.table.data[after, i] = 100.0 - rank

    def forward(self, idx, kv_cache=None, rgb=None):
        return self.table[idx], None


def tool_loop_mock(tok):
    m = BigramMock(tok)
    d_open, d_close, s_close = tok.tool_open["depth"], tok.tool_close["depth"], tok.tool_close["seg"]
    m.prefer(tok.assistant, tok.think)
    m.prefer(tok.think, A)
    m.prefer(A, tok.end_think)
    m.prefer(tok.end_think, d_open, tok.answer)  # always wants another tool call
    m.prefer(d_open, s_close, d_close)  # the wrong close tag first: must be masked
    m.prefer(tok.image_start, A, tok.image_offset + 3)  # text inside an image: must be masked
    m.prefer(tok.image_offset + 3, tok.eos, tok.image_end, tok.image_offset + 5)
    m.prefer(tok.image_offset + 5, tok.image_offset + 3)
    m.prefer(tok.reflection_ids[-1], tok.think)
    m.prefer(tok.answer, B_)
    m.prefer(B_, tok.end_answer)
    m.prefer(tok.end_answer, tok.eos)
    return m


def test_tool_loop_and_turn_budget(tok):
    m = tool_loop_mock(tok)
    d_open, d_close = tok.tool_open["depth"], tok.tool_close["depth"]
    code3, code5 = tok.image_offset + 3, tok.image_offset + 5
    call = [tok.think, A, tok.end_think, d_open, d_close, tok.image_start, code3, code5, code3, code5,
            tok.image_end] + tok.reflection_ids
    call_mask = [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0] + [0] * len(tok.reflection_ids)
    answer = [tok.think, A, tok.end_think, tok.answer, B_, tok.end_answer, tok.eos]
    prompt = user_prompt(tok, "How far?")
    out = generate(m, tok, [prompt], 200, N_IMAGE, temperature=0)
    # MAX_TURNS = 3: two tool calls, then the open tag is masked and the row answers
    assert tokenizer.MAX_TURNS == 3
    assert out.row(0) == call * 2 + answer
    assert out.sampled_mask[0, :out.lengths[0]].tolist() == call_mask * 2 + [1] * len(answer)
    assert out.tokens.shape[1] == out.lengths[0]  # stopped at <|eos|>
    # tools=False (the RE arm) and a smaller budget answer straight away
    for kw in (dict(tools=False), dict(max_turns=1)):
        assert generate(m, tok, [prompt], 200, N_IMAGE, temperature=0, **kw).row(0) == answer
    assert generate(m, tok, [prompt], 200, N_IMAGE, temperature=0, max_turns=2).row(0) == call + answer


def test_prompt_ending_mid_grammar_carries_on(tok):
    m = tool_loop_mock(tok)
    d_open, d_close = tok.tool_open["depth"], tok.tool_close["depth"]
    code3, code5 = tok.image_offset + 3, tok.image_offset + 5
    prompt = user_prompt(tok, "How far?") + [tok.think, A, tok.end_think, d_open] + tok.encode("go") + [d_close]
    out = generate(m, tok, [prompt], 5, N_IMAGE, temperature=0)
    assert out.row(0) == [tok.image_start, code3, code5, code3, code5]  # the map is forced to start
    assert out.sampled_mask[0].tolist() == [0, 1, 1, 1, 1]
    # a prompt that already holds two of the map's codes: two more, then the forced close and reflection
    out = generate(m, tok, [prompt + [tok.image_start, code3, code5]], 60, N_IMAGE, temperature=0)
    assert out.row(0)[:3 + len(tok.reflection_ids)] == [code3, code5, tok.image_end] + tok.reflection_ids
    # one earlier tool call in the reply counts towards the budget: one more, then the answer
    out = generate(m, tok, [prompt], 200, N_IMAGE, temperature=0)
    assert out.row(0).count(d_open) == 1 and out.row(0)[-1] == tok.eos


def check_grammar(tok, tokens, sampled, tools=True, max_turns=tokenizer.MAX_TURNS):
    """An independent reading of the grammar: every image has exactly N sampled codes and a forced
    close; image ids appear nowhere else; forced tokens are exactly the ones the grammar forces;
    tool calls respect the budget. Returns the number of tool calls."""
    opens, closes = set(tok.tool_open.values()), set(tok.tool_close.values())
    refl = tok.reflection_ids
    i, calls, in_tool = 0, 0, None
    while i < len(tokens):
        t, s = tokens[i], sampled[i]
        assert t != tok.pad
        if t == tok.image_start:
            after_close = i > 0 and tokens[i - 1] in closes
            assert s == (0 if after_close else 1)
            span = tokens[i + 1:i + 1 + N_IMAGE]
            assert all(c >= tok.image_offset for c in span) and all(sampled[i + 1:i + 1 + len(span)])
            rest = tokens[i + 1 + N_IMAGE:]
            if rest:
                assert len(span) == N_IMAGE and rest[0] == tok.image_end and sampled[i + 1 + N_IMAGE] == 0
                if after_close:
                    n = min(len(refl), len(rest) - 1)
                    assert rest[1:1 + n] == refl[:n] and not any(sampled[i + 2 + N_IMAGE:i + 2 + N_IMAGE + n])
                    i += 2 + N_IMAGE + n
                else:
                    i += 2 + N_IMAGE
            else:
                i = len(tokens)
            continue
        assert t < tok.image_offset and t not in (tok.image_end, tok.bos) and s == 1
        if t in opens:
            assert tools and in_tool is None and calls < max_turns - 1
            calls, in_tool = calls + 1, t
        elif t in closes:
            assert in_tool is not None and t == tok.tool_close[{v: k for k, v in tok.tool_open.items()}[in_tool]]
            in_tool = None
            assert i + 1 == len(tokens) or tokens[i + 1] == tok.image_start
        i += 1
    return calls


def random_mock(tok, seed):
    """Random bigram logits biased towards specials and image codes, so a few hundred tokens
    visit every part of the grammar; <|eos|> is rare so rows run long."""
    g = torch.Generator().manual_seed(seed)
    m = BigramMock(tok)
    m.table.data = torch.randn(tok.vocab_size, tok.vocab_size, generator=g)
    m.table.data[:, tok.n_text:] += 3.0
    m.table.data[:, tok.eos] -= 4.0
    return m


def test_grammar_holds_under_random_sampling(tok):
    prompts = [user_prompt(tok, "How far?", s) for s in range(8)]
    n_calls, n_images = [], 0
    for seed in range(3):
        out = generate(random_mock(tok, seed), tok, prompts, 150, N_IMAGE, temperature=1.0, seed=seed)
        for b in range(len(prompts)):
            row, sampled = out.row(b), out.sampled_mask[b, :out.lengths[b]].tolist()
            n_calls.append(check_grammar(tok, row, sampled))
            n_images += row.count(tok.image_start)
            assert out.lengths[b] <= 150 and all(t == tok.pad for t in out.tokens[b, out.lengths[b]:].tolist())
        no_tools = generate(random_mock(tok, seed), tok, prompts, 150, N_IMAGE, seed=seed, tools=False)
        for b in range(len(prompts)):
            row = no_tools.row(b)
            assert check_grammar(tok, row, no_tools.sampled_mask[b, :len(row)].tolist(), tools=False) == 0
    # the walk reached the budget and drew images, so the checks above had something to check
    assert max(n_calls) == tokenizer.MAX_TURNS - 1 and n_images > 10


def test_seeds_temperature_and_max_tokens(tok):
    m = random_mock(tok, 0)
    m.table.data[:, tok.eos] = -1e9  # never stops early
    prompts = [user_prompt(tok, "How far?"), [tok.bos, tok.user, tok.assistant]]

    def run(**kw):
        return generate(m, tok, prompts, **{"max_new_tokens": 25, "n_image_tokens": N_IMAGE, **kw})

    a, b = run(seed=7), run(seed=7)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens, run(generator=torch.Generator().manual_seed(7)).tokens)
    assert not torch.equal(a.tokens, run(seed=8).tokens)
    greedy = run(temperature=0, seed=1)
    assert torch.equal(greedy.tokens, run(temperature=0, seed=2).tokens)
    assert not torch.equal(greedy.tokens, a.tokens)
    assert torch.equal(run(temperature=1e-4, seed=3).tokens, greedy.tokens)  # temperature sharpens
    # top_k=1 and a tiny top_p leave only the argmax
    assert torch.equal(run(top_k=1, seed=3).tokens, greedy.tokens)
    assert torch.equal(run(top_p=1e-6, seed=3).tokens, greedy.tokens)
    for n in (1, 4, 25):
        out = run(max_new_tokens=n, seed=0)
        assert out.lengths.tolist() == [n, n] and out.tokens.shape == (2, n)


def test_image_temperature_samples_codes_and_keeps_text_greedy(tok):
    """Text greedy, codes sampled: the reply's text is the greedy one, its map is not."""
    m = tool_loop_mock(tok)
    m.table.data[tok.image_start, tok.image_offset:] = 0.0  # every code equally likely at the map's start
    m.table.data[tok.image_offset:, tok.image_offset:] = 0.0  # … and after each code
    prompt = [tok.bos, tok.user, tok.assistant]
    greedy = generate(m, tok, [prompt], 200, 12, temperature=0.0).row(0)
    mixed = generate(m, tok, [prompt], 200, 12, temperature=0.0, image_temperature=1.0, seed=0).row(0)
    is_code = [t >= tok.image_offset for t in greedy]
    assert is_code == [t >= tok.image_offset for t in mixed] and sum(is_code) == 24  # the same path: two maps
    assert [t for t in mixed if t < tok.image_offset] == [t for t in greedy if t < tok.image_offset]
    assert len({t for t in greedy if t >= tok.image_offset}) == 1  # greedy: one code over both maps
    assert len({t for t in mixed if t >= tok.image_offset}) > 8  # 24 draws from 16 equally likely codes


def test_inside_a_tool_call_only_text_and_its_own_close_tag():
    import sampler
    from tokenizer import Tokenizer, train_bpe
    tok = Tokenizer(train_bpe(["estimate the depth map"], 270), 8)
    masks = sampler.vocab_masks(tok, tok.vocab_size)
    for name, mode in sampler.IN_TOOL.items():
        allowed = masks[mode].nonzero().flatten().tolist()
        assert allowed == list(range(tok.n_text)) + [tok.tool_close[name]]


def map_prompt(tok, tool, seed=0):
    """Stage 1's map request on a random photo, ending in <|image|>: the reply is the map."""
    import conversations
    codes = np.random.default_rng(seed).integers(0, tok.codebook_size, N_IMAGE)
    return tok.render_prompt(conversations.map_request(tool)[:1], {"rgb": codes}) + [tok.image_start]


def test_a_row_knows_which_tools_map_it_draws(tok):
    import sampler
    row = sampler.RowState(tok, N_IMAGE)
    row.replay(map_prompt(tok, "seg"))  # the request is in the user turn, the image opens the reply
    assert row.mode(True, 3) == sampler.IMAGE and row.drawing == "seg"
    row = sampler.RowState(tok, N_IMAGE)
    row.replay(user_prompt(tok, "How far?"))
    assert row.drawing is None
    for t in [tok.tool_open["depth"], tok.tool_close["depth"]]:  # a tool called in the reply
        row.feed(t)
    row.feed(row.forced[0])  # the forced <|image|>
    assert row.mode(True, 3) == sampler.IMAGE and row.drawing == "depth"


def test_seg_guidance_draws_seg_maps_with_the_seg_heads_reading_of_the_photo(tok):
    """The cache keeps the seg head's log-probabilities at the photo's places; a strongly guided
    greedy seg map is the head's likeliest code at each place, a depth map is drawn as without
    guidance, and a shared prefill (fanned out, rows dropped) equals per-row prefills."""
    model = tiny_model(tok, seed=2, seg_codes=tok.codebook_size)
    seg, depth = map_prompt(tok, "seg", 0), map_prompt(tok, "depth", 0)
    hidden = {}
    hook = model.ln_f.register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
    cache = KVCache(model.config, 1, 64, keep_seg=True)
    model(torch.tensor([seg]), kv_cache=cache)
    hook.remove()
    photo = [i for i, t in enumerate(seg) if t >= tok.image_offset]
    head = torch.log_softmax(model.seg_head(hidden["h"][0, photo]), -1)
    torch.testing.assert_close(cache.seg[0], head)
    kw = dict(max_new_tokens=N_IMAGE + 1, n_image_tokens=N_IMAGE, temperature=0, tools=False)
    guided = generate(model, tok, [seg, depth], seg_guidance=1e4, **kw)
    plain = generate(model, tok, [seg, depth], **kw)
    assert [t - tok.image_offset for t in guided.row(0)[:N_IMAGE]] == head.argmax(-1).tolist()
    assert guided.row(0)[:N_IMAGE] != plain.row(0)[:N_IMAGE]  # the head and the LM disagree here
    assert guided.row(1) == plain.row(1)
    model.config.seg_guidance = 1e4  # a model's own setting is the default
    assert generate(model, tok, [seg, depth], **kw).row(0) == guided.row(0)
    model.config.seg_guidance = 0.0
    torch.testing.assert_close(guided.logprobs[1], plain.logprobs[1])
    prompts = [seg] * 3 + [depth] * 2 + [user_prompt(tok, "How far?", 1)] * 2
    kw = dict(max_new_tokens=30, n_image_tokens=N_IMAGE, temperature=1.0, seed=7, seg_guidance=50.0)
    shared, per_row = generate(model, tok, prompts, **kw), generate(model, tok, prompts, share_prefill=False, **kw)
    assert torch.equal(shared.tokens, per_row.tokens) and torch.equal(shared.lengths, per_row.lengths)
    torch.testing.assert_close(shared.logprobs, per_row.logprobs, atol=1e-5, rtol=0)
    assert len(set(shared.lengths.tolist())) > 1  # rows finished at different steps: some were dropped
    with pytest.raises(ValueError, match="seg head"):
        generate(tiny_model(tok), tok, [seg], **kw)
