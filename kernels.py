"""
Flash attention in Triton: forward and backward, causal or not, any sequence length.

Attention is softmax(Q K^T / sqrt(D)) V. Written naively it materialises the T x T score matrix
in memory, so its cost is dominated by moving T^2 numbers through HBM. Flash attention never
stores that matrix: each program holds one block of queries in registers, streams the keys and
values past it block by block, and keeps a running ("online") softmax: the row maximum m, the row
sum l, and the unnormalised output acc, rescaled whenever a new block raises the maximum. HBM
traffic drops to reading Q, K, V and writing O, so the kernel becomes compute-bound.

The backward does not store the probabilities either. The forward saves one number per query
row, the log-sum-exp of its scores, from which any block of P can be recomputed exactly:
P = exp(S - lse). With dO the gradient of the output and Delta = rowsum(dO * O),

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   dQ = scale dS K,   dK = scale dS^T Q.

Three kernels do it: a small one for Delta, one that owns a block of keys and sweeps the queries
(accumulating dK and dV, so each is written once, with no atomics), and one that owns a block of
queries and sweeps the keys (accumulating dQ). Both sweeps recompute S and dP, the price of not
storing them.

Two tricks from the Triton fused-attention tutorial: exponentials are base 2 (exp2 is the
hardware instruction; exp would cost a multiply more) with the softmax scale folded into the same
constant, log2(e)/sqrt(D); and masks are only applied to the blocks that need them (those that
cross the causal diagonal or the ragged end of the sequence), so the bulk of the work runs
without them. Unlike that tutorial's backward, ours handles non-causal attention and lengths
that are not a multiple of the block size.

Supported: (B, H, T, D) tensors, fp32, fp16 or bf16 (all three the same dtype; fp32
accumulation inside; fp32 inputs multiply in full fp32, not TF32), any head dim D in 16..128, any
lengths T_q and T_k (causal: T_q <= T_k). With T_q == T_k (training) the result is exactly
`F.scaled_dot_product_attention(q, k, v, is_causal=causal)`. With T_q < T_k (decoding against a
KV cache) causal means the queries are the *last* T_q positions: query i sees keys up to
i + (T_k - T_q). (SDPA's is_causal aligns them to the first positions instead; the two agree when
T_q == T_k.) Runs on CUDA, or on CPU under TRITON_INTERPRET=1, which is how the tests run it.

What "good" is, on an H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s HBM; the ridge where compute and
memory time are equal is 989 / 3.35 = 295 FLOP per byte). N = B*H heads, e = 2 bytes per
element, matmul FLOPs only (the exp2s run on a separate unit); causal does half the FLOPs, same
bytes. Times are the roofline floor for N = 64, T = 4096, D = 128 (bench.py's T = 4096, D = 128
shape), non-causal:

    kernel    FLOPs        HBM bytes, each tensor once                     FLOP/byte   floor
    forward   4 N T^2 D    4 N T D e + 4 N T  (Q K V O; lse)               ~ T / 2     0.56 ms
    Delta     2 N T D      2 N T D e + 4 N T  (O dO; Delta)                ~ 0.5       0.04 ms
    dK, dV    8 N T^2 D    6 N T D e + 8 N T  (Q K V dO dK dV; lse Delta)  ~ T / 1.5   1.11 ms
    dQ        6 N T^2 D    5 N T D e + 8 N T  (Q K V dO dQ; lse Delta)     ~ T / 1.7   0.83 ms

So everything but Delta is compute-bound once T is above ~600 (causal: ~1200): the target is
tensor-core throughput, not bandwidth. The table counts each tensor read once; in fact every
query block re-reads all of K and V (T / BLOCK_M times), which would be ~BLOCK_M FLOP per byte,
under the ridge, if it came from HBM. It comes from the 50 MB L2, because the query blocks of one
head run at the same time. The backward does 14 N T^2 D FLOPs (7 matmuls) where the textbook
counts 10 (2.5x the forward); bench.py uses the textbook count, as the tutorial does, so its
forward+backward figure tops out at 989 * 14/18 = 769 TFLOP/s, not 989. For scale (published
numbers, rough): FlashAttention-2, which SDPA's flash backend runs, gets about a third of peak
on H100; FlashAttention-3, with warp specialisation and TMA, about three quarters. A plain Triton
kernel like this one should land near FlashAttention-2 (~300+ TFLOP/s forward at T >= 2048,
D = 128); well under that means spills or bad tile sizes, and tile sizes are the first knob.
"""
import math

import torch
import triton
import triton.language as tl
from triton import knobs

# Tiles, per kernel: (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages). For 16-bit inputs, the
# largest that compile without register spills for H100 (sm_90) at every D, checked with cuobjdump
# but not yet timed on one: tune them with `python bench.py kernels`. (For A100, sm_80, the
# forward's spill a little at D >= 48.) fp32 products run on plain FMA units, not tensor cores,
# with twice the registers and shared memory per element, so fp32 gets small tiles. The
# interpreter runs the same tiles, so the tests cover these.
TILES = {"fwd": (128, 128, 8, 3), "dkdv": (32, 64, 8, 3), "dq": (64, 64, 8, 3)}
TILES_FP32 = {"fwd": (32, 32, 8, 2), "dkdv": (32, 32, 8, 2), "dq": (32, 32, 8, 2)}
LOG2_E = 1.4426950408889634


def attention_reference(q, k, v, causal=True):
    """Plain torch attention with the same semantics as `flash_attention`, for the tests."""
    T_q, T_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        # bottom-right aligned: query i is position i + T_k - T_q of the key sequence
        visible = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(T_k - T_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ----------------------------------------------------------------------------------------------
# Triton kernels. Every program works on one head: program_id(1) = b * H + h. Tensors come with
# their strides (batch, head, time; the head dim is contiguous), so transposed views cost no copy.
# lse and Delta are (B, H, T_q) fp32 and contiguous.


@triton.jit
def _head(X, stride_b, stride_h, bh, H):
    """Pointer to head bh's (T, D) matrix. int64, because B*H*T*D can pass 2^31 elements."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return X + b * stride_b + h * stride_h


@triton.jit
def _rows(X, offs_t, stride_t, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers to rows offs_t of a (T, HEAD_DIM) matrix, as a (len(offs_t), BLOCK_D) tile, and the
    mask of the real elements: rows past T and the columns that pad HEAD_DIM up to a power of two
    (tl.arange needs one) are not."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_t[:, None] < T
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return X + offs_t[:, None] * stride_t + offs_d[None, :], mask


@triton.jit
def _load_rows(X, offs_t, stride_t, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile of rows; what is not real reads as 0, which adds nothing to any dot product."""
    ptrs, mask = _rows(X, offs_t, stride_t, T, HEAD_DIM, BLOCK_D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(X, tile, offs_t, stride_t, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs, mask = _rows(X, offs_t, stride_t, T, HEAD_DIM, BLOCK_D)
    tl.store(ptrs, tile.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _query_block_key_range(start_m, T_k, offset,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Split the keys for the queries [start_m, start_m + BLOCK_M) in two: [0, full) are whole key
    blocks that every one of these queries sees (no mask needed), [full, hi) the rest that any of
    them sees (masked)."""
    if CAUSAL:
        hi = tl.minimum(T_k, start_m + BLOCK_M + offset)
        full = tl.minimum(T_k, start_m + 1 + offset) // BLOCK_N * BLOCK_N
    else:
        hi = T_k
        full = T_k // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _masked_scores(q, k, offs_m, offs_n, T_k, offset, qk_scale, CAUSAL: tl.constexpr,
                   MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores of a query block against a key block, in log2 units: s = (q.k / sqrt(D)) * log2(e),
    so exp2(s) = exp(q.k / sqrt(D)). With MASKED, keys past T_k and (causal) keys after a query's
    diagonal are -inf. Queries past T_q need no mask: their rows are never stored."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = offs_n[None, :] < T_k
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, lo, hi, T_k, offset,
                    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the keys [lo, hi), one BLOCK_N block at a time."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kt, T_k, HEAD_DIM, BLOCK_D)
        v = _load_rows(V, offs_n, stride_vt, T_k, HEAD_DIM, BLOCK_D)
        s = _masked_scores(q, k, offs_m, offs_n, T_k, offset, qk_scale, CAUSAL, MASKED,
                           DOT_PRECISION)
        # The first block holds key 0, which every row sees, so m_new is finite from then on and
        # exp2(-inf - m_new) = 0 drops the masked scores.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              H, T_q, T_k, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (query blocks, B*H). One block of queries against all the keys it sees."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    Q = _head(Q, stride_qb, stride_qh, bh, H)
    K = _head(K, stride_kb, stride_kh, bh, H)
    V = _head(V, stride_vb, stride_vh, bh, H)
    O = _head(O, stride_ob, stride_oh, bh, H)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offset = T_k - T_q

    q = _load_rows(Q, offs_m, stride_qt, T_q, HEAD_DIM, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _query_block_key_range(start_m, T_k, offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, 0, full,
                                    T_k, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                    False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, full, hi,
                                    T_k, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                    True, DOT_PRECISION)

    _store_rows(O, acc / l_i[:, None], offs_m, stride_ot, T_q, HEAD_DIM, BLOCK_D)
    # log-sum-exp in log2 units, which is what the backward's exp2 wants
    tl.store(LSE + bh * T_q + offs_m, m_i + tl.log2(l_i), mask=offs_m < T_q)


@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
               H, T_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (query blocks, B*H). Delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the term the softmax
    Jacobian subtracts; computed once here instead of in every block of the sweeps."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(_head(O, stride_ob, stride_oh, bh, H), offs_m, stride_ot, T_q, HEAD_DIM, BLOCK_D)
    do = _load_rows(_head(DO, stride_dob, stride_doh, bh, H), offs_m, stride_dot, T_q, HEAD_DIM,
                    BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * T_q + offs_m, delta, mask=offs_m < T_q)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n, lo, hi,
                       T_q, offset, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Accumulate dK and dV of one key block over the queries [lo, hi). Everything is transposed
    (keys down, queries across), so the products land in dK and dV's layout with no transposes
    of the accumulators."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, offs_m, stride_qt, T_q, HEAD_DIM, BLOCK_D)
        do = _load_rows(DO, offs_m, stride_dot, T_q, HEAD_DIM, BLOCK_D)
        lse = tl.load(LSE + offs_m, mask=offs_m < T_q, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=offs_m < T_q, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            # keys past T_k need no mask: their rows of dK and dV are never stored
            visible = offs_m[None, :] < T_q
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + offset)
            s_t = tl.where(visible, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                   H, T_q, T_k, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (key blocks, B*H). One block of keys against all the queries that see it."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    Q = _head(Q, stride_qb, stride_qh, bh, H)
    DO = _head(DO, stride_dob, stride_doh, bh, H)
    LSE += bh * T_q
    DELTA += bh * T_q
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offset = T_k - T_q

    k = _load_rows(_head(K, stride_kb, stride_kh, bh, H), offs_n, stride_kt, T_k, HEAD_DIM, BLOCK_D)
    v = _load_rows(_head(V, stride_vb, stride_vh, bh, H), offs_n, stride_vt, T_k, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query blocks, in up to three runs: [lo, diag_hi) cross the causal diagonal (masked),
    # [diag_hi, full_hi) see every key of this block (no mask), [full_hi, T_q) is the ragged end.
    if CAUSAL:
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M  # first to see key start_n
        all_see = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(all_see, T_q)
        full_hi = tl.maximum(diag_hi, T_q // BLOCK_M * BLOCK_M)
    else:
        lo = 0
        diag_hi = 0
        full_hi = T_q // BLOCK_M * BLOCK_M
    dk, dv = _dkdv_query_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                lo, diag_hi, T_q, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                CAUSAL, True, DOT_PRECISION)
    dk, dv = _dkdv_query_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                diag_hi, full_hi, T_q, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                CAUSAL, False, DOT_PRECISION)
    dk, dv = _dkdv_query_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                full_hi, T_q, T_q, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                CAUSAL, True, DOT_PRECISION)

    _store_rows(_head(DK, stride_dkb, stride_dkh, bh, H), dk * sm_scale, offs_n, stride_dkt, T_k,
                HEAD_DIM, BLOCK_D)
    _store_rows(_head(DV, stride_dvb, stride_dvh, bh, H), dv, offs_n, stride_dvt, T_k, HEAD_DIM,
                BLOCK_D)


@triton.jit
def _dq_key_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, lo, hi, T_k, offset,
                   qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over the keys [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kt, T_k, HEAD_DIM, BLOCK_D)
        v = _load_rows(V, offs_n, stride_vt, T_k, HEAD_DIM, BLOCK_D)
        s = _masked_scores(q, k, offs_m, offs_n, T_k, offset, qk_scale, CAUSAL, MASKED,
                           DOT_PRECISION)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 H, T_q, T_k, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (query blocks, B*H). One block of queries against all the keys it sees, like the
    forward."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    K = _head(K, stride_kb, stride_kh, bh, H)
    V = _head(V, stride_vb, stride_vh, bh, H)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offset = T_k - T_q

    q = _load_rows(_head(Q, stride_qb, stride_qh, bh, H), offs_m, stride_qt, T_q, HEAD_DIM, BLOCK_D)
    do = _load_rows(_head(DO, stride_dob, stride_doh, bh, H), offs_m, stride_dot, T_q, HEAD_DIM,
                    BLOCK_D)
    lse = tl.load(LSE + bh * T_q + offs_m, mask=offs_m < T_q, other=0.0)
    delta = tl.load(DELTA + bh * T_q + offs_m, mask=offs_m < T_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _query_block_key_range(start_m, T_k, offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_key_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, 0, full, T_k,
                        offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, DOT_PRECISION)
    dq = _dq_key_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, full, hi, T_k,
                        offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, DOT_PRECISION)

    _store_rows(_head(DQ, stride_dqb, stride_dqh, bh, H), dq * sm_scale, offs_m, stride_dqt, T_q,
                HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Launchers. They take their output buffers, so the tests can hand in NaN-filled ones and see
# that every element gets written.


def _check_inputs(q, k, v, causal):
    tensors = {"q": q, "k": k, "v": v}
    for name, x in tensors.items():
        if x.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be (B, H, T, D), got shape "
                             f"{tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    B, H, T_q, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree "
                         f"in B, H and D")
    if not 16 <= D <= 128:
        raise ValueError(f"flash_attention: head dim must be in 16..128, got {D}")
    if causal and T_q > k.shape[2]:
        raise ValueError(f"flash_attention: causal needs T_q <= T_k (the queries are the last T_q "
                         f"positions), got T_q={T_q}, T_k={k.shape[2]}")
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise ValueError(f"flash_attention: empty input, q {tuple(q.shape)} k {tuple(k.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention: dtype must be float32, float16 or bfloat16, got "
                         f"{q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v on different devices: {q.device}, {k.device}, "
                         f"{v.device}")
    if not q.is_cuda and not knobs.runtime.interpret:
        raise ValueError("flash_attention: needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "triton is imported, to run on CPU)")


def _unit_stride(x):
    """The kernels assume the head dim is contiguous; anything else is copied once."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernel_args(q, kernel):
    """Compile-time arguments and launch options of one kernel for inputs like q."""
    D = q.shape[-1]
    fp32 = q.dtype == torch.float32
    block_m, block_n, num_warps, num_stages = (TILES_FP32 if fp32 else TILES)[kernel]
    return dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=block_m, BLOCK_N=block_n,
                # fp32 inputs get fp32 products: TF32, the default, keeps 10 mantissa bits (~1e-3
                # relative error). For 16-bit inputs the setting has no effect.
                DOT_PRECISION="ieee" if fp32 else "tf32",
                num_warps=num_warps, num_stages=num_stages)


def flash_attention_forward(q, k, v, causal, out, lse):
    """Write attention(q, k, v) into out (shaped like q) and the rows' log2-sum-exp into lse
    (B, H, T_q), fp32 contiguous."""
    B, H, T_q, D = q.shape
    args = _kernel_args(q, "fwd")
    _attn_fwd[(triton.cdiv(T_q, args["BLOCK_M"]), B * H)](
        q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, T_q, k.shape[2], LOG2_E / math.sqrt(D), CAUSAL=causal, **args)


def flash_attention_backward(do, q, k, v, out, lse, causal, dq, dk, dv):
    """Write the gradients of attention(q, k, v) for output gradient do into dq, dk, dv, given the
    forward's out and lse."""
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D)
    dkdv_args, dq_args = _kernel_args(q, "dkdv"), _kernel_args(q, "dq")
    delta = torch.empty_like(lse)
    _bwd_delta[(triton.cdiv(T_q, dq_args["BLOCK_M"]), B * H)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], H, T_q,
        HEAD_DIM=D, BLOCK_D=dq_args["BLOCK_D"], BLOCK_M=dq_args["BLOCK_M"])
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    _attn_bwd_dkdv[(triton.cdiv(T_k, dkdv_args["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, *strides, *dk.stride()[:3], *dv.stride()[:3],
        H, T_q, T_k, sm_scale * LOG2_E, sm_scale, CAUSAL=causal, **dkdv_args)
    _attn_bwd_dq[(triton.cdiv(T_q, dq_args["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, *strides, *dq.stride()[:3],
        H, T_q, T_k, sm_scale * LOG2_E, sm_scale, CAUSAL=causal, **dq_args)


class FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal):
        _check_inputs(q, k, v, causal)
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        B, H, T_q, _ = q.shape
        out = torch.empty_like(q)  # keeps q's layout, so a transposed q gives a transposed out
        lse = torch.empty((B, H, T_q), device=q.device, dtype=torch.float32)
        flash_attention_forward(q, k, v, causal, out, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flash_attention_backward(_unit_stride(do), q, k, v, out, lse, ctx.causal, dq, dk, dv)
        return dq, dk, dv, None


def flash_attention(q, k, v, causal=True):
    """softmax(q k^T / sqrt(D)) v on (B, H, T, D) tensors, differentiable; see the module docstring
    for what is supported."""
    if torch.is_autocast_enabled(q.device.type):
        # as SDPA does under autocast: run in the autocast dtype, whatever mix of dtypes comes in
        # (e.g. q and k out of an fp32 norm, v straight out of a bf16 matmul)
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return FlashAttention.apply(q, k, v, causal)
