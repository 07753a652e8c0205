"""torch.compile of block-sparse attention: one graph (no break) on every backend (and causal on gather and
Triton), same values (and gradients, where the backend has a backward on the CPU) as eager; the Triton path's
custom op passes torch.library's own checks of its fake and autograd."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from zoo.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from zoo.kernels.block_sparse_attention.triton_impl import _bsa_forward_op, build_pyramid  # noqa: E402


def _compiled_matches_eager(fn, inputs, backward=True):
    torch._dynamo.reset()  # the backend is chosen while tracing: never reuse a graph traced under another
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with torch.set_grad_enabled(backward):
        got = compiled(*inputs)
        want = fn(*inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if not backward:
        return
    grad_out = torch.randn_like(want)
    leaves = [t for t in inputs if t.requires_grad]
    for g, w in zip(
        torch.autograd.grad(got, leaves, grad_out), torch.autograd.grad(want, leaves, grad_out), strict=True
    ):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("backend", "causal"),
    [("reference", False), ("gather", False), ("triton", False), ("flex", False), ("gather", True), ("triton", True)],
)
def test_block_sparse_attention_compiles_to_one_graph(backend, causal, monkeypatch):
    monkeypatch.setenv("ZOO_KERNELS", backend)
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for n in (11, 13, 13))
    bias = torch.randn(2, 6, 5, requires_grad=True)
    index = torch.tensor([[[[0, 2, -1], [1, 1, 0]]]])
    level = torch.tensor([[[[0, 2, 0], [1, 0, 2]]]])

    def fn(q, k, v, bias):
        return block_sparse_attention(q, k, v, index, level, bias, block_q=6, block_k=5, num_levels=3, causal=causal)

    _compiled_matches_eager(fn, (q, k, v, bias), backward=backend != "flex")


@pytest.mark.parametrize("causal", [False, True])
def test_custom_op_registration(causal):
    q, k, v = (torch.randn(1, 1, n, 8) for n in (6, 9, 9))
    k_pyr, v_pyr, bias_pyr = build_pyramid(k, v, torch.randn(1, 3, 4), block_k=4, num_levels=2)
    index, level = torch.tensor([[[[0, 2], [1, -1]]]]), torch.tensor([[[[1, 0], [0, 0]]]])
    args = (q, k_pyr, v_pyr, bias_pyr)
    args = tuple(t.requires_grad_() for t in args) + (index, level, 3, 4, 9, 2, 0.5, causal)
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch.
    torch.library.opcheck(_bsa_forward_op, args)
