"""Block-sparse attention on a GPU, every backend (Triton through the autotuned launch, FlexAttention,
gather): fp32/fp16/bf16, head dims 32/64/128, causal or not, forward and backward against the fp32 reference.
The interpreter cannot cover these (its bf16 arithmetic is unreliable, triton-lang/triton#11584, and autotuning
benchmarks on a device), so they need CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (fp16/bf16 and autotuned Triton launches)", allow_module_level=True)

from zoo.kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention_flex,
    block_sparse_attention_gather,
    block_sparse_attention_reference,
)
from zoo.kernels.block_sparse_attention.triton_impl import block_sparse_attention_triton  # noqa: E402

BACKENDS = {
    "triton": block_sparse_attention_triton,
    "flex": block_sparse_attention_flex,
    "gather": block_sparse_attention_gather,
}

# Tolerances relative to the largest magnitude of the fp32 result: inputs are rounded to the dtype.
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("pooled", [False, True], ids=["level0", "levels"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matches_reference_on_gpu(backend, causal, dtype, head_dim, pooled):
    torch.manual_seed(0)
    # Ragged lengths; FlexAttention's CUDA kernel tiles blocks of 128 queries by 64 keys.
    b, h, lq, lk = 2, 3, 300, 333
    bq, bk = (128, 64) if backend == "flex" else (64, 48)
    mq, mk = -(-lq // bq), -(-lk // bk)
    q, k, v = (torch.randn(b, h, n, head_dim, device="cuda") for n in (lq, lk, lk))
    bias = torch.randn(h, bq, bk, device="cuda")
    index = torch.randint(-1, mk, (b, 1, mq, 5), device="cuda")
    level = torch.randint(0, 4, index.shape, device="cuda") if pooled else None
    num_levels = 4 if pooled else 1
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]
    out = BACKENDS[backend](*inputs[:3], index, level, inputs[3], bq, bk, head_dim**-0.5, num_levels, causal)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    expected = block_sparse_attention_reference(
        *ref_inputs[:3], index, level, ref_inputs[3], bq, bk, head_dim**-0.5, num_levels, causal
    )
    assert out.dtype == dtype
    assert _rel(out, expected) < TOL[dtype]
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(expected, ref_inputs, grad)
    for name, g, w in zip(("q", "k", "v", "bias"), got, want, strict=True):
        assert _rel(g, w) < 2 * TOL[dtype], f"d{name}"
