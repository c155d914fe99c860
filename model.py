"""
The unified transformer: one decoder-only GPT over one shared vocabulary.

    [text BPE ids][special ids][image code ids]      image code c has id tok.image_offset + c

The model knows one fact of that layout: ids from image_offset up are image codes, and an image is a
run of n_image_tokens of them in raster order. Two things tell a code where in the grid it is. A
learned embedding of its place is added to its token embedding: "near the bottom" means "near the
camera". And the grid RoPE (see rope_angles) rotates the code at place k, which predicts place k+1,
so that it lines up with every earlier image's code at place k+1: drawing a depth map from an RGB
image is mostly copying by place. RoPE over sequence positions alone tells a token only how far back
another token is, so a map code could find "where in the picture am I drawing" only by counting back
to the <|image|> tag; a 200-step model never managed it (its depth maps lacked even the ground's
gradient). The first code of a map is predicted by <|image|> itself, which sits at place 0 of the
grid RoPE. Which ids are text, specials or tool tags the model does not know. It reads an RGB image
as N code ids, writes a depth map as N code ids, and reasons about both in text, all with one
softmax and one next-token loss. (BAGEL, COOPER's base, generates images with a rectified-flow head
over VAE latents; with VQ codes the ordinary LM head does it, as in LlamaGen, and vqgan.py's decoder
turns codes back into pixels.)
The grammar of images and tool calls is enforced at sampling time, in sampler.py.

A modern small GPT, in nanoGPT's reading order: GPTConfig, then the pieces (RoPE and grid RoPE,
attention with three interchangeable backends, MLP, Block), the KV cache, and GPT itself with its
loss (the next token's; the grounding losses beside it are losses.py), per-token log-probs (for
RL), optimizer groups (Muon is optim.py) and FLOP count.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
from optim import Muon


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model sees: prompt + images + reply
    vocab_size: int = 1551  # tok.vocab_size: text + special + image codes
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # key/value heads; 0: n_head. Fewer: grouped-query attention (see "Attention")
    n_embd: int = 256
    dropout: float = 0.0
    attn_impl: str = "auto"  # "sdpa" | "triton" (kernels.py) | "math" | "auto": triton on CUDA, sdpa otherwise
    qk_norm: bool = True  # RMSNorm on queries and keys: bounds attention logits, steadier at high LR
    rope_base: float = 10000.0
    grid_rope: bool = True  # half of each head's rotations follow an image code's (row, col): see rope_angles
    grid_prior: float = 0.0  # > 0: map codes' attention starts on the aligned place (see "Grid prior" below)
    image_offset: int = 0  # tok.image_offset: ids >= this are image codes
    n_image_tokens: int = 0  # codes per image (grid²); 0: no grid embedding (a text-only model)
    code_patch_dim: int = 0  # > 0: each code's mean pixel patch (vqgan.code_patches) joins its embedding
    object_classes: int = 0  # > 0: a head names the object at each place of a row's first image (losses.py, "Place heads")
    object_head_weight: float = 1.0  # the object head's cross entropy is scaled by this in the loss (losses.py, "Place heads")
    depth_bins: int = 0  # > 0: a head gives each such place's depth, binned (losses.py, "Place heads")
    depth_head_weight: float = 1.0  # the depth head's cross entropy is scaled by this in the loss (losses.py, "Place heads")
    reader_vq: dict = None  # a VQConfig as a dict: read each row's first image through its decoder (see "Image reader")
    reader_pixels: bool = False  # the reader reads the first image's true pixels, passed as rgb= (see "Image reader")
    pointer: bool = False  # with the referring loss: what each referring head brings back must say where it looked (losses.py, "Referring")
    refer_layer: int = -1  # the block whose first heads the referring loss teaches (-1: the last; losses.py, "Referring")
    number_weight: float = 0.0  # > 0: a head regresses each number answer's log value, its loss scaled so (losses.py, "Numbers")
    seg_codes: int = 0  # > 0: a head names the segmentation map's code at each such place, of this many (losses.py, "Place heads")
    seg_head_weight: float = 1.0  # the seg head's cross entropy is scaled by this in the loss (losses.py, "Place heads")
    anchor_classes: int = 0  # > 0: a head names, at the one place each object covers most, its class (losses.py, "Place heads")
    anchor_head_weight: float = 1.0  # the anchor head's cross entropy is scaled by this in the loss (losses.py, "Place heads")
    seg_head_hidden: int = 0  # > 0: the seg head is an MLP of this width, not one linear map (losses.py, "Place heads")
    seg_guidance: float = 0.0  # > 0: the sampler draws seg maps with the seg head's help, this strong (sampler.generate)


# ---------------------------------------------------------------------------------------------
# Image reader. A code id says nothing about its colour until its embedding has been trained, and
# one colour's patches spread over hundreds of ids seen a few times each; even with the object head,
# a model reading code ids names a place's colour right 68% of the time where one reading pixels
# does 95%. With reader_vq, the first image of each row (the RGB question image in every layout
# here) is read the way Janus reads: decoded back to pixels by a frozen copy of the VQ decoder, then
# a small conv stem (3×3 over pixels, one conv a patch, 3×3 over the grid, so each place also sees
# its neighbours both ways) gives one vector a place, added to the codes' embeddings. Images the
# model writes are still codes, and read as codes: a code is fed before the ones after it exist.
# With a KV cache, a row's first image is read when the call that starts the row holds it whole.
# With reader_pixels the stem reads the question image's own pixels instead (forward's rgb=),
# as Janus's reader reads the photo and not its generation tokens: the VQ loses small objects'
# shapes (a crop classifier names 80% of shapes through it, 95% from the pixels), and a model
# reading the true pixels counts and names shapes better (docs/experiments.md). The question image
# is always one the model was given, so its pixels exist wherever it is asked.
#
# The place heads (object, depth, seg, anchor), the number head and the referring and choosing
# losses teach the model to find what a question names. GPT holds the heads' weights; losses.py
# says what each loss is, and why, and computes it from forward's hidden states and attention.

# ---------------------------------------------------------------------------------------------
# Rotary position embedding: position enters as a rotation of q and k, so attention scores depend
# only on the difference of the two tokens' positions. It also lets the sampler give every row its
# own positions.
#
# Grid RoPE. Drawing a depth map from an RGB image is mostly copying by place: the code predicting
# place j should look at the RGB code at place j. With sequence positions alone that key sits a
# different distance back for every image layout, and the learned grid table (GPT.wpe_image) has to
# learn "k lines up with k+1" for each of the N places separately. So with grid_rope, half of each
# head's rotation pairs follow the (row, col) of a grid place instead (a quarter each): a key is
# rotated by its own place, a query by the place its token *predicts* (k+1 for the code at place k;
# place 0 for text, which is what <|image|> predicts). The code predicting place j and every
# earlier image's code at place j are then at relative grid offset 0, for any image and any layout,
# with nothing to learn (RandAR and ARPG rotate queries by the predicted position the same way;
# LlamaGen and Qwen2-VL use 2-D RoPE). Text keys sit at place 0, so text-to-text attention sees only
# the sequence half. The KV cache stores keys, whose rotation is their own place, so decoding
# needs nothing new.
#
# Grid prior. Grid RoPE makes lining up possible, not used: stage-1 models trained 300 and 600
# iterations gave the aligned RGB code no more than its 1/256 share of a map code's attention, in
# every head, with or without grid RoPE. With grid_prior > 0, each image code's query and key also
# get a fixed direction u on the grid pairs (the query's scaled by a learned per-head gain, from
# grid_prior in head 0 down to 0 in the last head). Rotated, u.u = sum of cos(f * row offset) +
# cos(f * column offset), largest at offset 0: attention to the aligned place is there at step 0,
# and training keeps as much of it as helps. Text carries no u.
def rope_frequencies(head_dim, base, grid_rope, side=16):
    """(sequence, grid) inverse frequencies: the head's D/2 rotation pairs, all following the
    sequence position, or with grid_rope a half for it and a quarter each for row and column."""
    n = head_dim // 2
    n_seq = n // 2 if grid_rope else n
    seq = 1.0 / base ** (torch.arange(n_seq).float() / n_seq)
    if not grid_rope:
        return seq, None
    assert n % 4 == 0, "grid RoPE needs a head dimension divisible by 8"
    n_axis = (n - n_seq) // 2
    # from pi (neighbouring places in antiphase) down to about pi/side: sharp alignment, no wrap-around
    return seq, math.pi * float(side) ** (-torch.arange(n_axis).float() / n_axis)


def grid_prior_on(config):
    """The grid prior rides on the grid RoPE, which needs images."""
    return bool(config.grid_prior and config.grid_rope and config.n_image_tokens)


def rope_angles(pos, seq_freq, place=None, grid_freq=None, side=1):
    """(cos, sin) of shape (..., T, D/2) for sequence positions pos (..., T) and, with grid_freq,
    grid places (..., T) on a side x side grid."""
    angles = pos.unsqueeze(-1).float() * seq_freq
    if grid_freq is not None:
        row, col = (place // side).unsqueeze(-1).float(), (place % side).unsqueeze(-1).float()
        angles = torch.cat((angles.expand(*place.shape, -1), row * grid_freq, col * grid_freq), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, H, T, D); cos, sin broadcastable to (B, 1, T, D/2). Rotates the pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def image_grid_index(idx, image_offset, n_image_tokens):
    """(B, T) place of each image code in its image (0 … n-1, raster order), -1 for other ids.
    An image's codes are one unbroken run between <|image|> and <|/image|>, so the place is the
    length of the run so far."""
    is_code = idx >= image_offset
    count = is_code.long().cumsum(dim=1)
    run_start = torch.where(is_code, 0, count).cummax(dim=1).values  # codes before the current run
    return torch.where(is_code, (count - run_start - 1) % n_image_tokens, -1)


def first_image(idx, image_offset, n_image_tokens):
    """(B, T) True at the codes of each row's first image, for rows that hold all n of its codes."""
    is_code = idx >= image_offset
    first = is_code & (is_code.long().cumsum(dim=1) <= n_image_tokens)
    return first & (first.sum(dim=1, keepdim=True) == n_image_tokens)


def branch_layout(branches):
    """Questions packed after one image as branches (batches.branched_row): branch 0 is the shared
    beginning, branch k > 0 the k-th question and its answer. -> (pos (B, T), additive mask
    (B, 1, T, T)): a branch's token sees the beginning and its own branch so far, at the positions
    it had in a row of its own. So every answer is predicted exactly as if asked alone, and none
    can be read off another question ("What shape is the red object?" before "What color is the
    cube?"), while the image's tokens are paid for once."""
    T = branches.size(1)
    i = torch.arange(T, device=branches.device)
    new = torch.ones_like(branches, dtype=torch.bool)
    new[:, 1:] = branches[:, 1:] != branches[:, :-1]
    start = torch.where(new, i, 0).cummax(dim=1).values  # where each token's branch begins
    shared = (branches == 0).sum(dim=1, keepdim=True)
    pos = torch.where(branches == 0, i, shared + i - start)
    visible = (i[None, :] <= i[:, None]) & ((branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None]))
    return pos, additive_mask(visible)


def additive_mask(visible):
    """(B, Tq, Tk) bool -> (B, 1, Tq, Tk) float: 0 where a query may see a key, -inf elsewhere.
    Made once a forward: sdpa would turn a bool mask into one in every layer."""
    return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf")).unsqueeze(1)


class ImageReader(nn.Module):
    """Codes of an image -> one vector a place: a frozen VQ decoder (its weights come from the VQ
    checkpoint, trainer.init_model) back to pixels, then a learned conv stem (see "Image reader")."""

    def __init__(self, vq_config, n_embd):
        super().__init__()
        import vqgan  # the VQ tokenizer's own decoder, so the pixels are the ones vqgan.decode gives
        cfg = vqgan.VQConfig(**vq_config)
        self.grid, f = cfg.grid, cfg.downsample
        self.register_buffer("codebook", torch.zeros(cfg.codebook_size, cfg.code_dim))  # unit code vectors
        self.decoder = vqgan.Decoder(cfg).requires_grad_(False)
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, n_embd, f, stride=f),
                                  nn.GELU(), nn.Conv2d(n_embd, n_embd, 3, padding=1))

    def load_vq(self, vq):
        """Copy a trained vqgan.VQModel's decoder and unit code vectors in."""
        self.decoder.load_state_dict(vq.decoder.state_dict())
        self.codebook.copy_(F.normalize(vq.quantizer.codebook.detach(), dim=1))

    def forward(self, codes, rgb=None):
        """(N, grid²) code ids -> (N, grid², n_embd); with rgb, the uint8 (N, H, W, 3) pictures
        those codes encode, the stem reads those instead of the decoded codes."""
        if rgb is not None:
            import vqgan
            pixels = vqgan.images_to_tensor(rgb, device=codes.device).contiguous()  # NCHW, as decoded pixels are
        else:
            with torch.no_grad():
                z = self.codebook[codes].view(len(codes), self.grid, self.grid, -1).permute(0, 3, 1, 2)
                pixels = self.decoder(z).clamp(-1, 1)
        return self.stem(pixels).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Attention. Three backends compute the same function; the tests hold them to it.
#
# Grouped-query attention (GQA; Llama 2, nanochat's n_kv_head). With n_kv_head < n_head each key
# and value head serves n_head // n_kv_head query heads. Decoding a batch of replies on a CPU is
# bound by reading every row's KV cache at every step (a decode step's attention was 38% of an RL
# rollout's time, docs/experiments.md); fewer KV heads mean a smaller cache to read.

def kv_heads(config):
    """The number of key/value heads: n_kv_head, or n_head when it is 0."""
    n = config.n_kv_head or config.n_head
    if n < 1 or config.n_head % n:
        raise ValueError(f"n_kv_head={config.n_kv_head}: it must divide n_head={config.n_head} (0: as many as n_head)")
    return n


def repeat_kv(x, n_head):
    """(B, H_kv, T, D) -> (B, n_head, T, D): each key/value head repeated for the query heads it serves."""
    return x if x.size(1) == n_head else x.repeat_interleave(n_head // x.size(1), dim=1)


def attend(q, k, v, impl, mask=None):
    """softmax(q k^T / sqrt(D)) v on q (B, H, T, D) and k, v (B, H_kv, T, D), H a multiple of
    H_kv. Causal when mask is None; otherwise mask (B, 1, Tq, Tk) is added to the scores: 0 where
    a query may see a key, -inf elsewhere (the KV-cache path, where keys are the cache). There is
    no dropout on attention probabilities, so all backends agree exactly in training too."""
    if impl == "auto":
        impl = "triton" if q.is_cuda else "sdpa"
    if impl != "sdpa":  # sdpa groups the heads itself (enable_gqa)
        k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
    if impl == "math":  # the reference: the T x T score matrix, written out
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if mask is None:
            mask = torch.full((q.size(-2), k.size(-2)), float("-inf"), device=q.device).triu(1)
        return (att + mask).softmax(dim=-1) @ v
    if impl == "triton" and mask is None:
        import kernels  # imported here so the model runs on machines without triton
        return kernels.flash_attention(q, k, v, causal=True)
    if impl not in ("sdpa", "triton"):
        raise ValueError(f"unknown attn_impl {impl!r}: use sdpa, triton, math or auto")
    # sdpa, and triton's cache path: decoding is one query per row against a ragged cache, which
    # the flash kernel has no mask for and which is memory-bound anyway.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                          is_causal=mask is None, enable_gqa=k.size(1) != q.size(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, kv_heads(config), config.n_embd // config.n_head
        self.layer_idx = layer_idx  # which slice of the KV cache is ours
        self.attn_impl = config.attn_impl
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.c_attn.weight.muon_parts = (self.n_head * self.head_dim,) + (self.n_kv_head * self.head_dim,) * 2  # optim.Muon
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        if grid_prior_on(config):  # per head, from grid_prior down to 0
            self.grid_prior = nn.Parameter(torch.linspace(config.grid_prior, 0.0, config.n_head).view(1, -1, 1, 1))

    def project(self, x, rope_q, rope_k, prior=None):
        """(B, T, C) -> q (B, H, T, D) and k, v (B, H_kv, T, D), normed and rotated: what attention compares."""
        B, T, C = x.shape
        heads = (self.n_head, self.n_kv_head, self.n_kv_head)
        q, k, v = self.c_attn(x).view(B, T, sum(heads), self.head_dim).transpose(1, 2).split(heads, dim=1)
        q, k = self.q_norm(q), self.k_norm(k)
        if prior is not None:  # a fixed direction on image codes' grid pairs: after rotation its q.k peaks at offset 0
            q, k = q + self.grid_prior * prior, k + prior
        q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_k)
        # the rotation (fp32 tables) and, under autocast, the norms may promote q and k to fp32;
        # attention kernels and the KV cache want all three in v's dtype
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(self, x, rope_q, rope_k, cache=None, prior=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.project(x, rope_q, rope_k, prior)
        if cache is not None:
            kv_cache, pos = cache
            k, v = kv_cache.update(self.layer_idx, k, v, pos, mask.size(-1))
        y = attend(q, k, v, self.attn_impl, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """ReLU² (Primer; nanochat): as good as SwiGLU at this scale with two matrices instead of
    three and one cheap elementwise op, which matters on a CPU where elementwise work is not free."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope_q, rope_k, cache=None, prior=None, mask=None):
        x = x + self.drop(self.attn(self.ln_1(x), rope_q, rope_k, cache, prior, mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


# ---------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer for B rows, preallocated to max_len positions, and each
    row's length (how many of its positions are filled). A forward pass with the cache writes its
    T new tokens at positions lengths[b] … lengths[b]+T-1 of row b and lets each query see the
    positions up to its own. So rows of different lengths share a batch without left padding, and
    every row's RoPE positions are its own. The caller advances `lengths` after each forward: only
    it knows which rows' tokens were real (sampler.py). Buffers are allocated on the first write,
    in the dtype the model computes in (bf16 under autocast). keep_seg=True asks the model (one
    with a seg head) to keep, from the call that reads each row's first image, the seg head's
    log-probabilities at its places in `seg`: what sampler.generate's seg_guidance draws with."""

    def __init__(self, config, batch_size, max_len, keep_seg=False):
        self.shape = (config.n_layer, batch_size, kv_heads(config), max_len, config.n_embd // config.n_head)
        self.max_len = max_len
        self.k = self.v = None
        self.ids = None  # (B, max_len) the tokens themselves: a code's place in its image needs them
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.keep_seg = keep_seg
        self.seg = None  # (B, n_image_tokens, seg_codes) float, zeros for a row without a whole first image

    def write_ids(self, idx, pos):
        """Store idx (B, T) at positions pos (B, T)."""
        if self.ids is None:
            self.ids = torch.zeros(self.shape[1], self.max_len, dtype=torch.long, device=idx.device)
        self.ids.scatter_(1, pos, idx)

    def update(self, layer, k, v, pos, n_keys):
        """Write k, v (B, H, T, D) of `layer` at positions pos (B, T); return the first n_keys."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros_like(self.k)
        index = pos[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer, :, :, :n_keys], self.v[layer, :, :, :n_keys]

    def select_rows(self, rows):
        """Rebuild the batch from rows of this one. Fan-out (a row may be repeated: prefill a prompt
        once, continue it in several rows) copies the filled positions into new buffers; dropping
        rows (rows increasing) moves only the rows that shift down, in place, and keeps a view."""
        rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
        filled = int(self.lengths.max()) if len(self.lengths) else 0
        if all(a < b for a, b in zip(rows, rows[1:])):  # a subset in order: compact in place
            for j, r in enumerate(rows):
                if r != j:
                    for buf in (self.k, self.v):
                        if buf is not None:
                            buf[:, j, :, :filled].copy_(buf[:, r, :, :filled])
                    if self.ids is not None:
                        self.ids[j, :filled].copy_(self.ids[r, :filled])
            n = len(rows)
            if self.k is not None:
                self.k, self.v = self.k[:, :n], self.v[:, :n]
            if self.ids is not None:
                self.ids = self.ids[:n]
        else:
            def fan_out(buf, row_dim, time_dim):
                new = buf.new_zeros(buf.shape[:row_dim] + (len(rows),) + buf.shape[row_dim + 1:])
                index = torch.tensor(rows, device=buf.device)
                new.narrow(time_dim, 0, filled).copy_(buf.narrow(time_dim, 0, filled).index_select(row_dim, index))
                return new
            if self.k is not None:
                self.k, self.v = fan_out(self.k, 1, 3), fan_out(self.v, 1, 3)
            if self.ids is not None:
                self.ids = fan_out(self.ids, 0, 1)
        self.lengths = self.lengths[torch.tensor(rows, device=self.lengths.device)]
        if self.seg is not None:  # one row's is 144 x 1024 floats: copied, as the lengths are
            self.seg = self.seg[torch.tensor(rows, device=self.seg.device)]
        self.shape = (self.shape[0], len(rows)) + self.shape[2:]


# ---------------------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        for name in ("object_head_weight", "depth_head_weight", "seg_head_weight", "anchor_head_weight"):
            if getattr(config, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
        if config.seg_guidance < 0 or (config.seg_guidance and not config.seg_codes):
            raise ValueError(f"seg_guidance must be >= 0, and > 0 only with a seg head (seg_codes > 0); got {config.seg_guidance}")
        if config.number_weight < 0:
            raise ValueError(f"number_weight must be >= 0, got {config.number_weight}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.RMSNorm(config.n_embd)
        # Untied head. An input embedding says what a token is; a head row says when to produce it.
        # For image codes the two differ (a code's neighbours in the codebook are not the codes
        # that follow it), and at this vocab size untying costs only V x C parameters (nanochat
        # unties too).
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.n_image_tokens:
            self.wpe_image = nn.Embedding(config.n_image_tokens, config.n_embd)  # a code's place in the grid
        if config.code_patch_dim:
            # What a code looks like, as a fixed table (set from data, saved with the weights) and a
            # learned projection: a code id tells the model nothing until its embedding has been
            # trained, and one colour's patches spread over hundreds of ids, each seen a few times.
            # The table is a function of the id alone, so codes the model writes have it too.
            self.register_buffer("code_patches", torch.zeros(config.vocab_size - config.image_offset, config.code_patch_dim))
            self.code_proj = nn.Linear(config.code_patch_dim, config.n_embd, bias=False)
        if config.object_classes:
            self.object_head = nn.Linear(config.n_embd, config.object_classes)
        if config.depth_bins:
            self.depth_head = nn.Linear(config.n_embd, config.depth_bins)
        if config.seg_codes:
            self.seg_head = (nn.Linear(config.n_embd, config.seg_codes) if not config.seg_head_hidden else
                             nn.Sequential(nn.Linear(config.n_embd, config.seg_head_hidden), nn.GELU(),
                                           nn.Linear(config.seg_head_hidden, config.seg_codes)))
        if config.anchor_classes:
            self.anchor_head = nn.Linear(config.n_embd, config.anchor_classes)
        if config.number_weight:
            self.number_head = nn.Linear(config.n_embd, 1)
        if config.reader_vq:
            self.reader = ImageReader(config.reader_vq, config.n_embd)
        if config.pointer:  # per head: its value space -> (row, col)
            self.pointer = nn.Parameter(torch.randn(config.n_head, config.n_embd // config.n_head, 2) * 0.02)
        self.grid_side = math.isqrt(config.n_image_tokens)
        grid_rope = config.grid_rope and config.n_image_tokens > 0
        assert not grid_rope or self.grid_side ** 2 == config.n_image_tokens, "grid RoPE needs a square grid"
        seq_freq, grid_freq = rope_frequencies(config.n_embd // config.n_head, config.rope_base, grid_rope, self.grid_side)
        self.register_buffer("seq_freq", seq_freq, persistent=False)  # rebuilt from the config on load
        self.register_buffer("grid_freq", grid_freq, persistent=False)
        prior_dir = None
        if grid_prior_on(config):  # u: the first coordinate of every grid rotation pair
            prior_dir = torch.zeros(config.n_embd // config.n_head)
            prior_dir[len(seq_freq):len(seq_freq) + len(grid_freq) * 2] = 1.0
        self.register_buffer("grid_prior_dir", prior_dir, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the init of each residual projection by 1/sqrt(number of residual adds)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters; non_embedding leaves out the embedding tables (lookups, no FLOPs) and the image reader."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
            if self.config.reader_vq:  # convolutions run once an image, not a token: no per-token FLOPs
                n -= sum(p.numel() for p in self.reader.parameters())
        return n

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None, places=None, branches=None, refer_at=None, refer=None,
                choose=None, rgb=None, numbers=None):
        """idx (B, T) -> (logits (B, T, V), loss). loss is the mean cross entropy over positions,
        weighted by loss_mask (0: none, 1 as a rule; all positions alike if no mask), or None
        without targets. With a loss_mask, targets or not, logits are (N, V): those of the N
        positions where the mask is set, in row order (a caller with its own loss passes the mask
        alone). With kv_cache,
        idx continues each row of the cache (see KVCache). places (B, n_image_tokens, heads), the
        labels at each place of a row's first image for each place head in turn (object, then depth;
        -1: none asked), adds each head's mean cross entropy to the loss (losses.py, "Place heads").
        branches (B, T) lays out questions packed after one shared image (see branch_layout).
        refer_at (B, T), the question (0, 1, …) whose answer the token at each position begins (-1:
        none), and refer (B, questions, heads, n_image_tokens), the places of the row's first image
        each question's objects cover, one group a head, add the referring loss (losses.py, "Referring");
        with refer_at, choose (B, entries, T), the question's word each position's answer word
        copies, adds the choosing loss (losses.py, "Choosing"). rgb (B, H, W, 3) uint8, each row's question
        image as pixels (rows that start no image in this call: anything), is what a reader_pixels
        model reads (see "Image reader"); other models ignore it. numbers (B, T), the log value in
        metres of the number answer each position begins (NaN: none), adds the number head's loss
        (losses.py, "Numbers"); a model without one ignores it."""
        B, T = idx.shape
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
            pos, cache, mask = torch.arange(T, device=idx.device).unsqueeze(0), None, None
            if branches is not None:
                pos, mask = branch_layout(branches)
        else:
            if branches is not None:
                raise ValueError("branches are a training layout; the KV cache decodes one branch a row")
            pos = kv_cache.lengths.to(idx.device)[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            n_keys = int(pos.max()) + 1
            if n_keys > min(self.config.block_size, kv_cache.max_len):
                raise ValueError(f"sequence of length {n_keys} is longer than block_size "
                                 f"{self.config.block_size} or the KV cache's {kv_cache.max_len}")
            # key j is visible to the query at position p iff j <= p: causal, per row
            cache = (kv_cache, pos)
            mask = additive_mask(torch.arange(n_keys, device=idx.device) <= pos[:, :, None])
        x = self.wte(idx)
        if self.config.code_patch_dim:
            is_code = idx >= self.config.image_offset
            patches = self.code_patches[(idx - self.config.image_offset).clamp(min=0)]
            x = x + self.code_proj(patches) * is_code.unsqueeze(-1).to(x.dtype)
        if self.config.reader_vq:
            first = first_image(idx, self.config.image_offset, self.config.n_image_tokens)
            first &= (pos[:, :1] == 0)  # a row that starts in this call (with a cache, the prefill)
            if first.any():
                codes = (idx[first] - self.config.image_offset).view(-1, self.config.n_image_tokens)
                pixels = None
                if self.config.reader_pixels:
                    if rgb is None:
                        raise ValueError("this model reads its question images as pixels (reader_pixels): pass rgb=")
                    pixels = rgb[first.any(1)]
                x = x.index_put((first,), x[first] + self.reader(codes, pixels).reshape(-1, x.size(-1)).to(x.dtype))
        place = None
        if self.config.n_image_tokens:
            place = self.grid_place(idx, pos, kv_cache)
            x = x + self.wpe_image(place.clamp(min=0)) * (place >= 0).unsqueeze(-1).to(x.dtype)
        rope_q, rope_k = self.rotations(pos, place)
        prior = None if self.grid_prior_dir is None else (place >= 0).to(x.dtype)[:, None, :, None] * self.grid_prior_dir
        x = self.drop(x)
        refer_layer = self.config.refer_layer % self.config.n_layer
        for i, block in enumerate(self.blocks):
            if i == refer_layer:
                refer_in = x  # the referring block's input: what the referring loss reads
            last_in = x  # the last block's input: what the choosing loss reads
            x = block(x, rope_q, rope_k, cache, prior, mask)
        x = self.ln_f(x)
        if kv_cache is not None and kv_cache.keep_seg and kv_cache.seg is None:  # the prefill, not each decode step
            self.photo_seg(x, idx, pos, kv_cache)
        if loss_mask is None:
            logits = self.lm_head(x)
        else:  # the head only where a loss will be: ~1 position in 9 of a VQA row, 1 in 2 of a map's
            at = loss_mask > 0
            logits = self.lm_head(x[at])
        if targets is None:
            return logits, None
        if loss_mask is None:
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(-1))
        else:
            weight = loss_mask[at].float()
            loss = (F.cross_entropy(logits.float(), targets[at], reduction="none") * weight).sum() / weight.sum().clamp(min=1)
        if places is not None or refer is not None:
            first = first_image(idx, self.config.image_offset, self.config.n_image_tokens)
        if places is not None:
            loss = loss + losses.place_loss(self, x, first, places)
        if refer is not None:  # the referring layer's q and k again: attention kernels do not return their weights
            block = self.blocks[refer_layer]
            q, k, v = block.attn.project(block.ln_1(refer_in), rope_q, rope_k, prior)
            k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
            loss = loss + losses.refer_loss(self, q, k, v, first, mask, refer_at, refer)
        if choose is not None:
            last = self.blocks[-1]
            q, k, _ = last.attn.project(last.ln_1(last_in), rope_q, rope_k, prior)
            loss = loss + losses.choose_loss(q, repeat_kv(k, q.size(1)), mask, refer_at, choose)
        if numbers is not None and self.config.number_weight:
            loss = loss + losses.number_loss(self, x, numbers)
        return logits, loss

    PLACE_HEADS = ("object_head", "depth_head", "seg_head", "anchor_head")  # in the order of the labels a place takes

    def place_heads(self):
        return [getattr(self, name) for name in self.PLACE_HEADS if hasattr(self, name)]

    def photo_seg(self, hidden, idx, pos, kv_cache):
        """Put in kv_cache.seg the seg head's log-probabilities at each place of the first image of
        every row that starts in this call (the prefill), zeros for rows without one. A drawn seg
        map's code at a place can then lean on what the head read from the photo there."""
        if not hasattr(self, "seg_head"):
            raise ValueError("seg guidance (a KVCache with keep_seg) needs a model with a seg head (seg_codes > 0)")
        first = first_image(idx, self.config.image_offset, self.config.n_image_tokens) & (pos[:, :1] == 0)
        if not first.any():
            return
        seg = hidden.new_zeros(idx.size(0), self.config.n_image_tokens, self.config.seg_codes, dtype=torch.float)
        seg[first.any(1)] = F.log_softmax(self.seg_head(hidden[first]).float(), -1).view(-1, *seg.shape[1:])
        kv_cache.seg = seg

    def grid_place(self, idx, pos, kv_cache):
        """(B, T) the place of idx's image codes in their image, -1 for other tokens. With a KV
        cache a run of codes may have begun in an earlier call, so the place is read off the cached ids."""
        offset, n = self.config.image_offset, self.config.n_image_tokens
        if kv_cache is None:
            return image_grid_index(idx, offset, n)
        kv_cache.write_ids(idx, pos)
        return image_grid_index(kv_cache.ids[:, :int(pos.max()) + 1], offset, n).gather(1, pos)

    def rotations(self, pos, place):
        """RoPE (cos, sin) of the queries and of the keys, each (B, 1, T, D/2), for sequence
        positions pos and grid places place (-1: not an image code). Keys sit at their own place,
        queries at the place they predict; text at place 0 (see rope_angles)."""
        if self.grid_freq is None:
            rope = [t.unsqueeze(1) for t in rope_angles(pos, self.seq_freq)]
            return rope, rope
        at = lambda grid_place: [t.unsqueeze(1) for t in rope_angles(pos, self.seq_freq, grid_place,
                                                                     self.grid_freq, self.grid_side)]
        return at(torch.where(place >= 0, place + 1, 0)), at(place.clamp(min=0))

    def token_logprobs(self, idx, targets, rgb=None):
        """log p(targets[b, t] | idx[b, :t+1]) as (B, T), with gradients: what a policy-gradient
        loss needs. Same numbers the sampler returns for the tokens it sampled. rgb: as forward's."""
        logits, _ = self(idx, rgb=rgb)
        B, T = targets.shape
        return -F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(-1), reduction="none").view(B, T)

    def configure_optimizers(self, weight_decay, learning_rate, betas, optimizer="adamw", muon_lr=0.02):
        """AdamW (optim.Muon with no Muon group). Weight decay only on matrices (linears, embeddings);
        norm gains stay undecayed. optimizer="muon": the blocks' matrices go to Muon at muon_lr, the
        rest stays with AdamW at learning_rate; the schedule scales both alike (each group's lr_scale)."""
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer {optimizer!r}: use adamw or muon")
        to_muon = lambda name, p: optimizer == "muon" and name.startswith("blocks.") and p.dim() == 2
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        rest = [p for n, p in named if not to_muon(n, p)]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        if optimizer == "adamw":
            return Muon(groups, lr=learning_rate, betas=betas)  # with no Muon group, AdamW
        matrices = {"params": [p for n, p in named if to_muon(n, p)], "muon": True, "lr_scale": muon_lr / learning_rate}
        return Muon([matrices] + groups, lr=learning_rate, betas=betas)

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token at sequence length seq_len. 6 per weight
        for the matmuls (2 forward, 4 backward); attention adds QK^T and AV, 2·2·C FLOPs per
        (query, key) pair per layer, over seq_len/2 keys on average since it is causal, times 3
        for the backward: 6·L·C·T. (PaLM's MFU formula counts 12·L·C·T, ignoring causality.)"""
        c = self.config
        return 6 * self.get_num_params() + 6 * c.n_layer * c.n_embd * seq_len
