"""
The losses besides the next token's: what teaches the model to find the object a question names.
GPT (model.py) holds the heads' weights and calls these from its forward; each reads what the
forward computed (the final hidden states, or the queries and keys of the layer it teaches), and
its labels come from grounding.py.

Place heads. A question's answer is one token, so "which object is the red cube?" is learned from
one bit per question, through a lookup that forms late (the grounding plateau). With
object_classes > 0, a linear head on the final hidden state of each place of a row's first image
(the RGB in every training layout) predicts the class of the object covering it (grounding.place_objects:
colour and shape, 0 for none), and its cross entropy joins the loss: a label at every place, read
from the image alone. With depth_bins > 0 a second head does the same for the place's depth
(grounding.place_depths), so "how far is the red cube?" becomes the same one-hop lookup as "what colour
is the cube?". Its loss has a weight of its own, depth_head_weight: at full weight the depth head
costs relative distance (which object is closest to another) three times what it gives size,
and a quarter keeps most of the size at a third of that cost (docs/experiments.md). A map the
model draws is no substitute: teacher-forced, each map code can be copied from the codes before
it, so little of its signal reaches the image's places. The same holds for drawing: with
seg_codes > 0 a third head names the code the segmentation map has at each place (the VQ's code
for that patch of the seg pseudo-image), so the place a drawn seg code attends to already holds
the code's answer, as the depth head's places hold theirs for the depth map. Measured at full
weight, it lifted the drawn seg maps and cost every answer; at a quarter it kept the answers and
half the lift (docs/experiments.md, "A seg head at the photo's places …"): off by default.
Drawing alone, the model copies its own earlier codes, and one wrong code travels; with
seg_guidance > 0 the sampler draws each seg code from the logits plus that many times the
head's log-probabilities at the place (sampler.generate), so the photo has a say at every code.
Guidance helps as much as the head reads: at half weight (answers kept) the drawn maps gained
0.01, at full weight 0.04 (docs/experiments.md, "Seg maps drawn with the seg head's help …").
The object head labels every place an object covers, so "how many red objects?" can be read as
how much red there is, and a small second object beside a large one is little of it (the 2s a
maps-arm model misses are mostly such pairs, docs/experiments.md). With anchor_classes > 0 a
fourth head names an object's class at the one place it covers most and "none" everywhere
else (grounding.place_anchors): each object is marked once, whatever its size, and a count is the
number of marks of the named kind. Measured in the maps arm: counting + 0.008 and + 0.023 on two
seeds, its 2s most (docs/experiments.md); off by default until measured with a deeper model.
seg_head_hidden > 0 makes the head an MLP, meant to read the segmentation out of the trunk
without bending the trunk to it; measured, it drew no better than the linear head.

Referring. The place heads teach each place what it shows; the answer still has to find, among
144 places, the ones the question names, and it learns that lookup from the one answer token.
The referring loss teaches it directly, as supervised attention, with no new weights: at the
position where an answer begins, head h of the last layer is trained to put its attention on the
places covered by the question's h-th object ("the red cube"; for a count, every object counted),
-log of the attention mass there (batches.stage1_batch builds the targets from the segmentation).
The other heads, and every other position, stay free.
Pointing. A comparison needs more than the two objects found: which is lower, which further left.
The place embedding holds that, but a linear probe reads it at chance from what the referring
heads bring back (runs/what_it_reads.py): their values carry what an object is, not where, and
the comparison's one answer token has not taught them otherwise. With pointer, a linear map of
what head h brings back (its attention-weighted values) is trained to give the (row, col) of
the centre of the places it is taught to look at, squared error on a [-1, 1] grid.

Choosing. A multiple-choice question offers objects by name and is answered with one ("Which is
closer to the camera, the red cube or the blue sphere?" -> "blue sphere"). The referring heads
find the answer's object, and its colour comes out right; its shape then has to be copied from
the question's option, the word after that colour, and a model that has not learned to copy
picks either option's shape. With choose targets, at each position that predicts a later word of
such an answer (" sphere" after "blue"), the last head of the last layer is trained to put its
attention on that word in the answer's option (-log of the mass there, as for referring;
batches.refer_targets): the copy, taught directly. With refer_options, each option's name is
also a place the first referring head learns to look from (at its object; with pointer,
bringing back where it is). (Asked with letters, "(A) the red cube (B) the blue sphere" -> "B",
the heads found the nearer object and the answer still stayed at chance: nothing taught the
lookup from the object found back to its letter. docs/experiments.md.)

Numbers. A number answer is learned from its digits' cross entropy, which scores "1.9 m" as wrong
for 2.0 m as for 9.0 m: nothing says how near a guess was, and a distance between two objects
stays at its prior. With number_weight > 0, a linear head on the final hidden state where a number
answer begins (the position predicting its first digit) regresses the answer's log value in
metres, squared error, so the state that writes the digits is taught the magnitude smoothly.
It pays from ~5M tokens on; before that it holds the comparisons back (docs/experiments.md).
"""
import math

import torch
import torch.nn.functional as F


def place_loss(model, hidden, first, places):
    """The sum of the model's place heads' cross entropies, each times its weight, over the places
    of each row's first image. hidden (B, T, C) the final hidden states; first (B, T) that image's
    positions (model.first_image); places (B, n_image_tokens, heads) the labels, in the order of
    model.PLACE_HEADS (rows without an image, and labels of -1, count for nothing)."""
    heads = [(getattr(model, name), getattr(model.config, name + "_weight")) for name in model.PLACE_HEADS if hasattr(model, name)]
    if places.shape[-1] != len(heads):
        raise ValueError(f"places has {places.shape[-1]} labels a place, the model {len(heads)} place heads")
    has, loss = first.any(1), hidden.sum() * 0
    for j, (head, w) in enumerate(heads):
        target = torch.full(first.shape, -1, dtype=torch.long, device=first.device)
        target[first] = places[has][..., j].reshape(-1)
        if (target >= 0).any():
            loss = loss + w * F.cross_entropy(head(hidden[target >= 0]).float(), target[target >= 0])
    return loss


def attention_logp(q, k, mask, b, t):
    """(n, heads, T) log attention weights of the query at row b[i], position t[i], in each head of
    q, over its row's keys. q, k (B, heads, T, D) as attention compares them; mask its additive
    mask (None: causal)."""
    scores = torch.einsum("nhd,nhsd->nhs", q[b, :, t], k[b]).float() / math.sqrt(q.size(-1))
    visible = (torch.arange(k.size(2), device=k.device) <= t[:, None]) if mask is None else mask[b, 0, t] == 0
    return scores.masked_fill(~visible[:, None], float("-inf")).log_softmax(-1)


def place_attention(logp, first, target):
    """log of the attention mass, from attention_logp's (n, heads, T), that each query puts on the
    places of its row's first image that target (n, heads, places) marks (-inf where it marks
    none); first (n, T) the positions of that image (model.first_image), whole."""
    at_place = torch.zeros_like(logp, dtype=torch.bool)  # the marked places, at their key positions
    at_place[first.unsqueeze(1).expand_as(at_place)] = target.reshape(-1)
    return logp.masked_fill(~at_place, float("-inf")).logsumexp(-1)


def refer_loss(model, q, k, v, first, mask, refer_at, refer):
    """-log of the attention mass that head h of the referring layer puts, at each position where a
    question's answer begins, on the places of that question's h-th object group, averaged over
    the (position, head) pairs whose group covers a place; with pointer, plus the squared error
    of the (row, col) that head's output points at (see "Referring"). q, k, v (B, H, T, D) as
    that layer computes them; first (B, T) the positions of each row's first image; mask the
    layer's additive mask (None: causal); refer_at and refer as GPT.forward takes them."""
    b, t = (refer_at >= 0).nonzero(as_tuple=True)
    heads = refer.size(2)
    if heads > model.config.n_head:
        raise ValueError(f"{heads} referring heads, but the model has {model.config.n_head} heads a layer")
    keep = first[b].any(1)  # a row cut before its image has no places to look at
    b, t = b[keep], t[keep]
    target = refer[b, refer_at[b, t]]  # (n, heads, places)
    if not target.any():
        return q.sum() * 0
    logp = attention_logp(q[:, :heads], k[:, :heads], mask, b, t)
    mass = place_attention(logp, first[b], target)
    has = target.any(-1)
    loss = -mass[has].mean()
    if model.config.pointer:
        out = torch.einsum("nhs,nhsd->nhd", logp.exp().to(v.dtype), v[b, :heads]).float()  # what each head brings back
        side = model.grid_side
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).view(-1, 2)
        grid = (2 * grid / (side - 1) - 1).to(out.device)  # (places, 2): row, col in [-1, 1]
        centre = target.float() @ grid / target.sum(-1, keepdim=True).clamp(min=1)  # (n, heads, 2)
        said = torch.einsum("nhd,hdc->nhc", out, model.pointer[:heads])
        loss = loss + (said - centre)[has].square().sum(-1).mean()
    return loss


def choose_loss(q, k, mask, refer_at, choose):
    """-log of the attention mass that the last head of the last layer puts, at each position
    that predicts a later word of a multiple-choice answer, on that word in the question's
    answer option, averaged over those positions (see "Choosing"). q, k (B, H, T, D) as the
    last layer computes them; refer_at and choose as GPT.forward takes them."""
    b, t = (refer_at >= 0).nonzero(as_tuple=True)
    target = choose[b, refer_at[b, t]]  # (n, T)
    has = target.any(-1)
    if not has.any():
        return q.sum() * 0
    b, t, target = b[has], t[has], target[has]
    logp = attention_logp(q[:, -1:], k[:, -1:], mask, b, t)[:, 0]
    return -logp.masked_fill(~target, float("-inf")).logsumexp(-1).mean()


def number_loss(model, hidden, numbers):
    """The number head's squared error, times number_weight, in log metres, at each position where
    a number answer begins: hidden (B, T, C) the final hidden states, numbers (B, T) the answers'
    log values (NaN elsewhere; see "Numbers")."""
    has = ~numbers.isnan()
    if not has.any():
        return hidden.sum() * 0
    guess = model.number_head(hidden[has]).squeeze(-1).float()
    return model.config.number_weight * F.mse_loss(guess, numbers[has].float())
