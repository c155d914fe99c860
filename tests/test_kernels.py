"""Flash attention kernels against a float64 reference. Without a GPU they run under Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1 before triton is imported), which executes the
same kernels with numpy but cannot do bf16 arithmetic, so bf16 is tested on CUDA only.

Every output buffer starts as NaN, so an element a kernel forgets to write fails the comparison.
Inputs are fresh each run; the seed is in every failure message. What the interpreter does not
check, Triton's compiler, is checked by compiling the kernels for an H100 (no GPU needed)."""
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
import kernels  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_inputs(B, H, T_q, T_k, D, dtype):
    """q, k, v, and an output gradient; returns them with the seed that made them."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, H, T_q, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, H, T_k, D, generator=gen) for _ in range(2))
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)], seed


def reference(q, k, v, do, causal):
    """Output, row log-sum-exp (natural log) and gradients, in float64 from the same rounded
    inputs."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = kernels.attention_reference(q, k, v, causal)
    out.backward(do.double())
    T_q, T_k = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-2, -1)).detach() / math.sqrt(q.shape[-1])
    if causal:
        visible = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(T_k - T_q)
        scores.masked_fill_(~visible, float("-inf"))
    return out.detach(), torch.logsumexp(scores, -1), q.grad, k.grad, v.grad


def relative_error(got, ref):
    """||got - ref|| / ||ref||; a reference that is exactly zero (the gradient of a softmax over one
    key) is compared by rms instead. NaN anywhere gives NaN, which fails every bound."""
    diff = (got.double() - ref).norm()
    ref_norm = ref.norm()
    return (diff / ref_norm if ref_norm > 0 else diff / math.sqrt(ref.numel())).item()


def run_and_compare(B, H, T_q, T_k, D, dtype, causal):
    (q, k, v, do), seed = random_inputs(B, H, T_q, T_k, D, dtype)
    nan = float("nan")
    out, lse = torch.full_like(q, nan), torch.full((B, H, T_q), nan, device=DEVICE)
    dq, dk, dv = torch.full_like(q, nan), torch.full_like(k, nan), torch.full_like(v, nan)
    kernels.flash_attention_forward(q, k, v, causal, out, lse)
    kernels.flash_attention_backward(do, q, k, v, out, lse, causal, dq, dk, dv)

    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference(q, k, v, do, causal)
    errors = {"out": relative_error(out, ref_out),
              "lse": relative_error(lse * math.log(2), ref_lse),  # the kernel's is in log2 units
              "dq": relative_error(dq, ref_dq), "dk": relative_error(dk, ref_dk),
              "dv": relative_error(dv, ref_dv)}
    print(f"seed {seed} {dtype} causal={causal} T_q={T_q} T_k={T_k} D={D} " +
          " ".join(f"{name}={err:.1e}" for name, err in errors.items()))
    for name, err in errors.items():
        assert err <= TOL[dtype], (f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e} "
                                   f"(seed {seed}, {dtype}, causal={causal}, T_q={T_q}, "
                                   f"T_k={T_k}, D={D})")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 100, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(dtype, T, D, causal):
    """The default tiles (the GPU's) against the reference; 1 and 129 are shorter and longer than a
    tile, 64 is exactly one backward tile, 17 and 100 end mid-tile."""
    run_and_compare(2, 3, T, T, D, dtype, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T_q, T_k", [(1, 100), (3, 65), (17, 129), (64, 65)])
def test_fewer_queries_than_keys(T_q, T_k, causal):
    """KV-cache decoding: causal queries are the last T_q positions of the key sequence."""
    run_and_compare(2, 2, T_q, T_k, 32, torch.float32, causal)


def test_more_queries_than_keys_non_causal():
    run_and_compare(2, 2, 100, 17, 32, torch.float32, False)


@pytest.mark.parametrize("D", [24, 48, 128])
def test_head_dims_off_the_grid(D):
    """Head dims that are not a power of two are padded inside the kernel; 128 is the largest."""
    run_and_compare(1, 2, 100, 100, D, torch.float32, True)


@pytest.mark.parametrize("causal", [True, False])
def test_small_tiles_many_blocks(monkeypatch, causal):
    """Tiles smaller than the sequence, of unequal sizes, so every query block meets a causal
    diagonal, fully visible blocks before it and a ragged end, in all three kernels."""
    monkeypatch.setitem(kernels.TILES_FP32, "fwd", (16, 32, 4, 1))
    monkeypatch.setitem(kernels.TILES_FP32, "dkdv", (32, 16, 4, 1))
    monkeypatch.setitem(kernels.TILES_FP32, "dq", (16, 32, 4, 1))
    run_and_compare(1, 2, 100, 100, 16, torch.float32, causal)
    run_and_compare(1, 2, 37, 100, 16, torch.float32, causal)


def test_autograd_on_strided_views_matches_sdpa():
    """The autograd path on (B, T, H, D) -> (B, H, T, D) transposed views, as a model passes them,
    equals torch's own scaled_dot_product_attention."""
    B, T, H, D = 2, 50, 3, 32
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(DEVICE) for _ in range(4))
    for causal in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ours = kernels.flash_attention(*(x.transpose(1, 2) for x in leaves), causal=causal)
        ours.backward(do.transpose(1, 2))
        ref_leaves = [x.double().clone().requires_grad_() for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in ref_leaves),
                                             is_causal=causal)
        ref.backward(do.double().transpose(1, 2))
        pairs = [(ours, ref.detach())] + [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]
        for name, (got, want) in zip(["out", "dq", "dk", "dv"], pairs):
            err = relative_error(got, want)
            assert err <= TOL[torch.float32], f"{name} causal={causal}: {err:.2e} (seed {seed})"


def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast, mixed fp32/16-bit inputs run in the autocast dtype, as SDPA does."""
    (q, k, v, do), seed = random_inputs(1, 2, 40, 40, 32, torch.float32)
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), v.half().requires_grad_()]
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = kernels.flash_attention(*leaves)
    assert out.dtype == torch.float16
    out.backward(do.half())
    assert [x.grad.dtype for x in leaves] == [torch.float32, torch.float32, torch.float16]
    ref_out, _, ref_dq, ref_dk, ref_dv = reference(q.half(), k.half(), v.half(), do.half(), True)
    for name, got, want in [("out", out, ref_out), ("dq", leaves[0].grad, ref_dq),
                            ("dk", leaves[1].grad, ref_dk), ("dv", leaves[2].grad, ref_dv)]:
        err = relative_error(got, want)
        assert err <= TOL[torch.float16], f"{name}: {err:.2e} (seed {seed})"


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"must be \(B, H, T, D\)"):
        kernels.flash_attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        kernels.flash_attention(x, x, x[:, :, :4])
    with pytest.raises(ValueError, match="must agree in B, H and D"):
        kernels.flash_attention(x, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    for D in (8, 256):
        y = torch.randn(1, 2, 8, D)
        with pytest.raises(ValueError, match="head dim must be in 16..128"):
            kernels.flash_attention(y, y, y)
    with pytest.raises(ValueError, match="must share a dtype"):
        kernels.flash_attention(x, x.half(), x)
    with pytest.raises(ValueError, match="dtype must be"):
        kernels.flash_attention(x.double(), x.double(), x.double())
    with pytest.raises(ValueError, match="causal needs T_q <= T_k"):
        kernels.flash_attention(x, x[:, :, :4], x[:, :, :4], causal=True)


COMPILE_FOR_H100 = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels

def signature(fn, constants):
    pointers = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
    return {name: "constexpr" if name in constants else "*bf16" if name in pointers
            else "*fp32" if name in ("LSE", "DELTA") else "fp32" if name.endswith("scale")
            else "i32" for name in fn.arg_names}

q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
kernels_and_args = [(kernels._bwd_delta, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64))]
for causal in (True, False):
    for name, fn in (("fwd", kernels._attn_fwd), ("dkdv", kernels._attn_bwd_dkdv),
                     ("dq", kernels._attn_bwd_dq)):
        kernels_and_args.append((fn, dict(kernels._kernel_args(q, name), CAUSAL=causal)))
for fn, args in kernels_and_args:
    options = {k: args.pop(k) for k in ("num_warps", "num_stages") if k in args}
    compiled = triton.compile(ASTSource(fn, signature(fn, args), args),
                              target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.metadata.shared <= 227 * 1024, (fn.__name__, compiled.metadata.shared)
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(kernels.triton.__file__),
                                                    "backends", "nvidia", "bin", "ptxas")),
                    reason="this triton has no NVIDIA compiler")
def test_compiles_for_h100_without_a_gpu():
    """The interpreter runs the kernels as numpy, so it never meets the compiler's rules (types,
    layouts, shared memory). Compile them for an H100 (sm_90, bf16, D = 128), as far as a cubin,
    in a process without TRITON_INTERPRET; no GPU is needed for that."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the interpreter cannot do bf16 arithmetic")
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_on_cuda(causal):
    run_and_compare(2, 3, 129, 129, 64, torch.bfloat16, causal)
