"""Triton routed attention (interpreted on CPU, fp32) against the PyTorch reference, forward and backward.

Shapes are small and ragged on purpose: lengths that end inside a tile or cross one (the
interpreter tile is 16), head dims that are not powers of two, Dv != D, empty and full routing,
repeated indices, Rk != R and strided inputs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels.routed_attention import routed_attention, routed_attention_reference  # noqa: E402
from kernels.routed_attention.triton_impl import routed_attention_triton  # noqa: E402

ATOL = RTOL = 1e-4


def _inputs(b, h, r, rk, lq, lk, d, dv, index):
    q = torch.randn(b, h, r, lq, d, requires_grad=True)
    k = torch.randn(b, h, rk, lk, d, requires_grad=True)
    v = torch.randn(b, h, rk, lk, dv, requires_grad=True)
    return q, k, v, torch.as_tensor(index, dtype=torch.long).reshape(b, r, -1)


def _grads(out, inputs, grad_out):
    # The reference returns a constant for topk == 0: its gradients are zero, not undefined.
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


def _check(q, k, v, index, scale, fn=routed_attention_triton):
    out = fn(q, k, v, index, scale)
    expected = routed_attention_reference(q, k, v, index.long(), scale)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    grad_out = torch.randn_like(expected)
    got, want = _grads(out, (q, k, v), grad_out), _grads(expected, (q, k, v), grad_out)
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")
    return out, got


# (B, H, R, Rk, Lq, Lk, D, Dv, index as nested lists of shape (B, R, topk))
CASES = {
    "ragged-tails": (1, 2, 3, 4, 17, 5, 12, 8, [[[0, 3], [2, 1], [3, 0]]]),
    "short-q-long-k": (1, 1, 2, 3, 3, 17, 8, 20, [[[2, 0, 1], [1, 1, 0]]]),
    "empty-topk": (1, 2, 2, 3, 5, 16, 8, 12, [[[], []]]),
    "full-topk": (1, 1, 3, 3, 16, 16, 32, 8, [[[0, 1, 2], [2, 0, 1], [1, 2, 0]]]),
    "repeated": (1, 2, 2, 2, 5, 3, 12, 32, [[[1, 1, 1], [0, 1, 0]]]),
    "more-q-regions": (2, 1, 4, 2, 16, 17, 8, 12, [[[0], [0], [1], [0]], [[1], [1], [1], [0]]]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case):
    b, h, r, rk, lq, lk, d, dv, index = CASES[case]
    q, k, v, index = _inputs(b, h, r, rk, lq, lk, d, dv, index)
    _check(q, k, v, index, d**-0.5)


def test_strided_inputs_and_int32_index():
    # q, k, v as views of one packed tensor (as after a fused qkv projection): no unit strides but the last.
    b, h, r, length, d = 1, 2, 3, 17, 12
    packed = torch.randn(b, r, length, 3, h, d, requires_grad=True)
    q, k, v = packed.permute(3, 0, 4, 1, 2, 5).unbind(0)
    index = torch.tensor([[[2, 0], [0, 0], [1, 2]]], dtype=torch.int32)
    out = routed_attention_triton(q, k, v, index, 0.3)
    torch.testing.assert_close(out, routed_attention_reference(q, k, v, index.long(), 0.3), atol=ATOL, rtol=RTOL)
    (grad,) = torch.autograd.grad(out, packed, torch.ones_like(out))
    q0, k0, v0 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(routed_attention_reference(q0, k0, v0, index.long(), 0.3).sum(), (q0, k0, v0))
    torch.testing.assert_close(grad, torch.stack(want).permute(1, 3, 4, 0, 2, 5), atol=ATOL, rtol=RTOL)


def _autograd_nodes_named(out, name):
    """Nodes of out's autograd graph whose type name contains `name` (the custom op's backward node)."""
    found, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            found.append(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def test_dispatch_forced_triton(monkeypatch):
    monkeypatch.setenv("ZOO_KERNELS", "triton")
    q, k, v, index = _inputs(1, 2, 2, 3, 5, 17, 12, 8, [[[2, 0], [1, 2]]])
    out, grads = _check(q, k, v, index, 12**-0.5, fn=routed_attention)
    assert _autograd_nodes_named(out, "block_sparse_attention"), "the Triton path did not run"
    # dk/dv are summed in registers, not with atomics: a second backward is bit-identical.
    again = torch.autograd.grad(routed_attention(q, k, v, index).sum(), (q, k, v))
    first = torch.autograd.grad(routed_attention(q, k, v, index).sum(), (q, k, v))
    for a, b in zip(again, first, strict=True):
        assert torch.equal(a, b)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    dims=st.tuples(
        st.integers(1, 2),  # B
        st.integers(1, 2),  # H
        st.integers(1, 3),  # R
        st.integers(1, 3),  # Rk
        st.sampled_from([1, 3, 5, 16, 17]),  # Lq
        st.sampled_from([1, 3, 5, 16, 17]),  # Lk
        st.sampled_from([8, 12, 32]),  # D
        st.sampled_from([4, 8, 12, 20]),  # Dv
        st.integers(0, 4),  # topk
    ),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(dims, seed):
    b, h, r, rk, lq, lk, d, dv, topk = dims
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, rk, (b, r, topk), generator=gen)  # with replacement: repeats happen
    q, k, v, index = _inputs(b, h, r, rk, lq, lk, d, dv, index)
    _check(q, k, v, index, d**-0.5)
