"""What the block-sparse backend tests share: the backends under test, the tolerance, input builders and gradient
collection (the reference returns a constant for an empty table, so its gradients are zero, not undefined)."""

from __future__ import annotations

import torch
from zoo.kernels.block_sparse_attention import (
    block_sparse_attention_flex,
    block_sparse_attention_gather,
    block_sparse_attention_masked,
)
from zoo.kernels.block_sparse_attention.triton_impl import block_sparse_attention_triton

BACKENDS = {
    "gather": block_sparse_attention_gather,
    "masked": block_sparse_attention_masked,
    "triton": block_sparse_attention_triton,
    "flex": block_sparse_attention_flex,
}
ATOL = RTOL = 2e-4


def grads(out, inputs, grad_out):
    """d(out . grad_out)/d(inputs), zeros where out does not depend on an input."""
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    found = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs, strict=True)]


def make_inputs(b, h, lq, lk, d, dv, bias_heads=None, block_q=None, block_k=None):
    """q (b, h, lq, d), k (b, h, lk, d), v (b, h, lk, dv) and a bias (bias_heads, block_q, block_k) or None."""
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k = torch.randn(b, h, lk, d, requires_grad=True)
    v = torch.randn(b, h, lk, dv, requires_grad=True)
    bias = None if bias_heads is None else torch.randn(bias_heads, block_q, block_k, requires_grad=True)
    return q, k, v, bias
