"""losses.py through GPT.forward: each grounding loss added to the next token's equals the same
quantity computed by hand from the hidden states, or from the q, k and v that attention receives."""
import math

import pytest
import torch

import model as model_module
from tests import test_model
from tests.test_model import N_IMAGE, mixed_sequence, tiny_model

tok, one_thread = test_model.tok, test_model.one_thread  # its fixtures: a tiny tokenizer, one thread


@pytest.mark.parametrize("seg_head_hidden", [0, 16])  # 16: the seg head is an MLP
def test_place_loss_is_the_heads_cross_entropies_at_the_first_image_places(tok, seg_head_hidden):
    """Each place head adds the cross entropy of its logits at the first image's places (the mixed
    sequence's second image, a generated map, is not read); labels of -1 and rows without an image
    add nothing, places=None leaves the loss as it was, and a label count that is not the model's
    number of heads stops. The seg head's labels come after the object's and depth's, the anchor
    head's after those."""
    model = tiny_model(tok, object_classes=5, depth_bins=3, seg_codes=6, seg_head_hidden=seg_head_hidden)
    assert isinstance(model.seg_head, torch.nn.Sequential) == bool(seg_head_hidden)
    ids, mask = mixed_sequence(tok, 3)
    text_only = [t for t in ids if t < tok.image_offset]
    rows = [ids, text_only + [tok.pad] * (len(ids) - len(text_only))]
    idx, targets = torch.tensor([r[:-1] for r in rows]), torch.tensor([r[1:] for r in rows])
    loss_mask = torch.tensor([mask[1:], [1] * (len(ids) - 1)])
    places = torch.tensor([[[0, 2, 5], [3, -1, 1], [-1, 0, -1], [4, 1, 2]], [[1, 1, 1]] * 4])
    _, plain = model(idx, targets, loss_mask)
    _, with_places = model(idx, targets, loss_mask, places=places)
    first = [i for i, t in enumerate(ids[:-1]) if t >= tok.image_offset][:N_IMAGE]
    hidden = {}
    hook = model.ln_f.register_forward_hook(lambda m, i, o: hidden.update(h=o))  # records only (returns None)
    model(idx)
    hook.remove()
    h = hidden["h"][0, first]
    object_ce = torch.nn.functional.cross_entropy(model.object_head(h)[[0, 1, 3]], torch.tensor([0, 3, 4]))
    depth_ce = torch.nn.functional.cross_entropy(model.depth_head(h)[[0, 2, 3]], torch.tensor([2, 0, 1]))
    seg_ce = torch.nn.functional.cross_entropy(model.seg_head(h)[[0, 1, 3]], torch.tensor([5, 1, 2]))
    torch.testing.assert_close(with_places - plain, object_ce + depth_ce + seg_ce)
    model.config.depth_head_weight = 0.25  # the depth head's share of the loss, and only its share, scales
    _, quarter = model(idx, targets, loss_mask, places=places)
    torch.testing.assert_close(quarter - plain, object_ce + 0.25 * depth_ce + seg_ce)
    model.config.seg_head_weight = 0.5
    _, half = model(idx, targets, loss_mask, places=places)
    torch.testing.assert_close(half - plain, object_ce + 0.25 * depth_ce + 0.5 * seg_ce)
    model.config.object_head_weight = 2.0
    _, double = model(idx, targets, loss_mask, places=places)
    torch.testing.assert_close(double - plain, 2.0 * object_ce + 0.25 * depth_ce + 0.5 * seg_ce)
    model.config.object_head_weight = model.config.depth_head_weight = model.config.seg_head_weight = 1.0
    anchored = tiny_model(tok, object_classes=5, depth_bins=3, seg_codes=6, anchor_classes=5, anchor_head_weight=0.5)
    with pytest.raises(ValueError, match="3 labels a place, the model 4"):
        anchored(idx, targets, loss_mask, places=places)
    anchors = torch.tensor([[[0], [2], [-1], [0]], [[1]] * 4])  # the fourth label, the anchor head's
    _, unplaced = anchored(idx, targets, loss_mask)
    _, with_anchor = anchored(idx, targets, loss_mask, places=torch.cat([places, anchors], -1))
    hook = anchored.ln_f.register_forward_hook(lambda m, i, o: hidden.update(h=o))
    anchored(idx)
    hook.remove()
    h = hidden["h"][0, first]
    ces = [torch.nn.functional.cross_entropy(head(h)[rows], torch.tensor(labels)) for head, rows, labels in
           [(anchored.object_head, [0, 1, 3], [0, 3, 4]), (anchored.depth_head, [0, 2, 3], [2, 0, 1]),
            (anchored.seg_head, [0, 1, 3], [5, 1, 2]), (anchored.anchor_head, [0, 1, 3], [0, 2, 0])]]
    torch.testing.assert_close(with_anchor - unplaced, ces[0] + ces[1] + ces[2] + 0.5 * ces[3])
    with pytest.raises(ValueError, match="object_head_weight"):
        tiny_model(tok, object_classes=3, object_head_weight=-1.0)
    with pytest.raises(ValueError, match="depth_head_weight"):
        tiny_model(tok, depth_bins=3, depth_head_weight=-1.0)
    with pytest.raises(ValueError, match="seg_head_weight"):
        tiny_model(tok, seg_codes=3, seg_head_weight=-1.0)
    with pytest.raises(ValueError, match="seg_guidance"):
        tiny_model(tok, seg_guidance=1.0)  # guidance without a seg head
    _, ignored = model(idx, targets, loss_mask, places=torch.full_like(places, -1))
    torch.testing.assert_close(ignored, plain)
    with pytest.raises(ValueError, match="place heads"):
        model(idx, targets, loss_mask, places=places[..., :2])


def test_number_loss_is_its_weight_times_the_squared_error_where_numbers_are_marked(tok):
    """With number_weight, the number head adds weight × the mean squared error between its output
    at the marked positions (final hidden state) and their targets; NaN marks nothing, all-NaN
    and numbers=None leave the loss as it was, and a model without the head ignores them."""
    model = tiny_model(tok, number_weight=0.5)
    ids, mask = mixed_sequence(tok, 3)
    idx, targets, loss_mask = torch.tensor([ids[:-1]] * 2), torch.tensor([ids[1:]] * 2), torch.tensor([mask[1:]] * 2)
    numbers = torch.full(idx.shape, float("nan"))
    numbers[0, 5], numbers[1, 9], numbers[1, 20] = 0.7, -1.2, 2.0
    _, plain = model(idx, targets, loss_mask)
    _, with_numbers = model(idx, targets, loss_mask, numbers=numbers)
    hidden = {}
    hook = model.ln_f.register_forward_hook(lambda m, i, o: hidden.update(h=o))  # records only (returns None)
    model(idx)
    hook.remove()
    h = hidden["h"]
    guess = model.number_head(torch.stack([h[0, 5], h[1, 9], h[1, 20]])).squeeze(-1)
    torch.testing.assert_close(with_numbers - plain, 0.5 * ((guess - torch.tensor([0.7, -1.2, 2.0])) ** 2).mean())
    torch.testing.assert_close(model(idx, targets, loss_mask, numbers=torch.full_like(numbers, float("nan")))[1], plain)
    without = tiny_model(tok)
    torch.testing.assert_close(without(idx, targets, loss_mask, numbers=numbers)[1], without(idx, targets, loss_mask)[1])
    with pytest.raises(ValueError, match="number_weight"):
        tiny_model(tok, number_weight=-1.0)


def attention_seen(monkeypatch):
    """A list that every attention call appends its (q, k, v) to, in layer order."""
    seen, real_attend = [], model_module.attend
    monkeypatch.setattr(model_module, "attend", lambda q, k, v, impl, mask=None: seen.append((q, k, v)) or real_attend(q, k, v, impl, mask))
    return seen


def causal_probs(q, k):
    """Attention weights (B, H, T, T) from q and k as attention receives them, causal."""
    T = q.size(2)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1)) + torch.full((T, T), float("-inf")).triu(1)).softmax(-1)


@pytest.mark.parametrize("refer_layer,n_kv_head", [(-1, 0), (0, 0), (-1, 1)])
def test_refer_loss_is_minus_log_the_attention_mass_on_the_named_places(tok, monkeypatch, refer_layer, n_kv_head):
    """The referring loss: at each position refer_at marks, -log of the attention that head h of
    layer refer_layer (the last by default) puts on the first image's places refer names for its
    question's h-th group, averaged over the (position, head) pairs whose group names a place;
    computed here from that layer's q and k as attention itself receives them. Too many groups for
    the heads stops. With fewer K/V heads than query heads, each query head reads its group's."""
    model = tiny_model(tok, refer_layer=refer_layer, n_kv_head=n_kv_head)
    ids, mask = mixed_sequence(tok, 3)
    idx, targets, loss_mask = torch.tensor([ids[:-1]] * 2), torch.tensor([ids[1:]] * 2), torch.tensor([mask[1:]] * 2)
    T = idx.size(1)
    refer_at = torch.full((2, T), -1)
    refer_at[0, T - 1], refer_at[1, T - 5], refer_at[1, T - 2] = 0, 0, 1
    refer = torch.tensor([[[[1, 0, 0, 1], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]],
                          [[[0, 1, 0, 0], [1, 1, 1, 0]], [[0, 0, 1, 0], [0, 1, 0, 0]]]], dtype=torch.bool)
    seen = attention_seen(monkeypatch)
    _, plain = model(idx, targets, loss_mask)
    seen.clear()
    _, with_refer = model(idx, targets, loss_mask, refer_at=refer_at, refer=refer)
    q, k, _ = seen[refer_layer]  # the referring layer's
    probs = causal_probs(q, model_module.repeat_kv(k, q.size(1)))
    first = [i for i, t in enumerate(ids[:-1]) if t >= tok.image_offset][:N_IMAGE]
    want = [-torch.log(probs[b, h, t, [first[p] for p in range(N_IMAGE) if refer[b, qn, h, p]]].sum())
            for b, t, qn, h in [(0, T - 1, 0, 0), (1, T - 5, 0, 0), (1, T - 5, 0, 1), (1, T - 2, 1, 0), (1, T - 2, 1, 1)]]
    torch.testing.assert_close(with_refer - plain, torch.stack(want).mean())
    with pytest.raises(ValueError, match="heads a layer"):
        model(idx, targets, loss_mask, refer_at=refer_at, refer=refer.repeat(1, 1, 2, 1))


def test_pointer_adds_the_squared_error_of_where_each_referring_head_points(tok, monkeypatch):
    """With pointer, each (position, head) pair the referring loss counts also adds the squared
    error between a linear map of that head's attention output and the centre, on a [-1, 1] grid,
    of the places it is taught to look at; computed here from the q, k and v attention receives."""
    model = tiny_model(tok, pointer=True)
    ids, mask = mixed_sequence(tok, 3)
    idx, targets, loss_mask = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), torch.tensor([mask[1:]])
    T = idx.size(1)
    refer_at = torch.full((1, T), -1)
    refer_at[0, T - 3], refer_at[0, T - 1] = 0, 1
    refer = torch.tensor([[[[1, 0, 0, 1], [0, 1, 0, 0]], [[0, 0, 1, 0], [0, 0, 0, 0]]]], dtype=torch.bool)
    seen = attention_seen(monkeypatch)
    _, plain = model(idx, targets, loss_mask)
    _, with_refer = model(idx, targets, loss_mask, refer_at=refer_at, refer=refer)
    q, k, v = seen[-1]
    probs = causal_probs(q, k)
    first = [i for i, t in enumerate(ids[:-1]) if t >= tok.image_offset][:N_IMAGE]
    grid = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])  # places 0..3 of a 2×2 grid: (row, col)
    mass, error = [], []
    for t, qn, h in [(T - 3, 0, 0), (T - 3, 0, 1), (T - 1, 1, 0)]:
        on = [p for p in range(N_IMAGE) if refer[0, qn, h, p]]
        mass.append(-torch.log(probs[0, h, t, [first[p] for p in on]].sum()))
        said = (probs[0, h, t] @ v[0, h]) @ model.pointer[h]
        error.append((said - grid[on].mean(0)).square().sum())
    torch.testing.assert_close(with_refer - plain, torch.stack(mass).mean() + torch.stack(error).mean())


def test_choose_loss_is_minus_log_the_last_heads_attention_on_the_marked_words(tok, monkeypatch):
    """With choose, at each position refer_at marks, -log of the attention that the last head of the
    last layer puts on its question's marked tokens, averaged over the positions whose question
    marks any; computed here from the q and k that layer's attention receives."""
    model = tiny_model(tok, n_head=4, n_embd=64)
    ids, mask = mixed_sequence(tok, 3)
    idx, targets, loss_mask = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), torch.tensor([mask[1:]])
    T = idx.size(1)
    refer_at = torch.full((1, T), -1)
    refer_at[0, T - 6], refer_at[0, T - 4], refer_at[0, T - 1] = 0, 1, 2
    choose = torch.zeros(1, 3, T, dtype=torch.bool)
    choose[0, 0, [1, 2]], choose[0, 2, [3, T - 3]] = True, True  # question 1 offers no options
    seen = attention_seen(monkeypatch)
    _, plain = model(idx, targets, loss_mask)
    seen.clear()
    _, with_choose = model(idx, targets, loss_mask, refer_at=refer_at, choose=choose)
    q, k, _ = seen[-1]
    probs = causal_probs(q, k)
    want = [-torch.log(probs[0, 3, t, choose[0, qn]].sum()) for t, qn in [(T - 6, 0), (T - 1, 2)]]
    torch.testing.assert_close(with_choose - plain, torch.stack(want).mean())
