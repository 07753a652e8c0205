"""Causal block-sparse attention (the causal PSA of video understanding) on every backend against the oracle.

Causal: query i sees key j only if j <= i, and a pooled group only once its last real token is at or before i
(the official causal PSA kernel's rule). Checked forward and backward (q, k, v, bias) on ragged lengths, every
pooling level, Lq != Lk, repeats and empty slots; with every block listed at level 0 it is torch's
`scaled_dot_product_attention(is_causal=True)`. Triton runs interpreted on the CPU (fp32, tile 16), FlexAttention
forward only (torch 2.14 has no FlexAttention backward on the CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from zoo.kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
)

from tests.kernels._backends import ATOL, BACKENDS, RTOL, grads, make_inputs  # noqa: E402


def _check(backend, q, k, v, index, level, bias, block_q, block_k, num_levels):
    args = (q, k, v, index, level, bias, block_q, block_k, q.shape[-1] ** -0.5, num_levels, True)
    expected = block_sparse_attention_reference(*args)
    if backend == "flex":
        with torch.no_grad():
            out = BACKENDS[backend](*args)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
        return out
    out = BACKENDS[backend](*args)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    inputs = [t for t in (q, k, v, bias) if t is not None]
    grad_out = torch.randn_like(expected)
    for name, g, w in zip("qkvb", grads(out, inputs, grad_out), grads(expected, inputs, grad_out), strict=False):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")
    return out


# name -> (B, H, Lq, Lk, D, Dv, block_q, block_k, bias heads, index (Bi, Hi, Mq or 1, K), level or None); a
# single row is every query block's.
CASES = {
    # Query blocks of 17 over key blocks of 20 ending in a short block of 3: the diagonal cuts blocks unevenly.
    "ragged-levels-bias": (1, 2, 34, 43, 12, 8, 17, 20, 2, [[[[0, 2, 1], [2, -1, 0]]]], [[[[1, 2, 0], [3, 0, 2]]]]),
    # Every level of every key block in one row, query blocks of 5 (groups of 8 straddle several of them).
    "every-level": (1, 1, 40, 40, 8, 12, 5, 16, None, [[[[0, 1, 2, 0, 1, 2, 0, 1]]]], [[[[0, 1, 2, 3, 3, 3, 1, 2]]]]),
    "more-queries": (2, 1, 30, 19, 8, 8, 10, 8, 1, [[[[0, 1, 2], [2, 1, 0], [1, -1, 2]]]], None),
    "fewer-queries": (1, 2, 9, 33, 8, 8, 4, 11, None, [[[[2, 0], [1, 1], [0, 2]]]], [[[[0, 1], [1, 2], [0, 2]]]]),
    "repeated-and-empty": (1, 1, 16, 16, 8, 8, 8, 8, None, [[[[1, 1, -1], [0, 1, 1]]]], [[[[0, 1, 0], [2, 0, 0]]]]),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_causal_matches_reference(case, backend):
    b, h, lq, lk, d, dv, bq, bk, bias_heads, index, level = CASES[case]
    q, k, v, bias = make_inputs(b, h, lq, lk, d, dv, bias_heads, bq, bk)
    mq = -(-lq // bq)
    index = torch.tensor(index).expand(-1, -1, mq, -1)
    level = None if level is None else torch.tensor(level).expand(index.shape)
    num_levels = 1 if level is None else int(level.max()) + 1
    _check(backend, q, k, v, index, level, bias, bq, bk, num_levels)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("shape", [(23, 23, 8, 5), (40, 40, 16, 16), (21, 13, 5, 7), (9, 26, 4, 6)])
def test_full_density_causal_is_sdpa_is_causal(backend, shape):
    # Every key block listed at level 0: exactly torch's causal attention (aligned at the first token), ragged.
    lq, lk, bq, bk = shape
    q, k, v = torch.randn(1, 2, lq, 8), torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 12)
    mq, mk = -(-lq // bq), -(-lk // bk)
    index = torch.arange(mk).expand(1, 1, mq, mk)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    fn = block_sparse_attention_reference if backend == "reference" else BACKENDS[backend]
    with torch.no_grad():
        out = fn(q, k, v, index, None, None, bq, bk, 8**-0.5, 1, True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pooled_group_is_hidden_until_its_last_token():
    # One key block of 4 at level 1 (groups {0, 1} and {2, 3}): query 0 sees nothing (zeros), queries 1-2 the
    # first group's mean, query 3 both groups, each weighted as its two tokens.
    q, k, v = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 3)
    index, level = torch.tensor([[[[0]]]]), torch.tensor([[[[1]]]])
    out = block_sparse_attention(q, k, v, index, level, block_q=4, block_k=4, num_levels=2, causal=True)
    mean_k, mean_v = k.view(1, 1, 2, 2, 4).mean(3), v.view(1, 1, 2, 2, 3).mean(3)
    assert torch.equal(out[0, 0, 0], torch.zeros(3))
    torch.testing.assert_close(out[:, :, 1:3], mean_v[:, :, :1].expand(1, 1, 2, 3))
    weights = torch.softmax(q[:, :, 3:] @ mean_k.transpose(-1, -2) * 0.5 + torch.tensor(2.0).log(), -1)
    torch.testing.assert_close(out[:, :, 3:], weights @ mean_v)


@pytest.mark.parametrize("name", ["torch", "triton", "reference"])
def test_dispatch_passes_causal(monkeypatch, name):
    monkeypatch.setenv("ZOO_KERNELS", name)
    q, k, v, _ = make_inputs(1, 2, 20, 20, 8, 8)
    index = torch.arange(3).expand(1, 1, 3, 3)
    out = block_sparse_attention(q, k, v, index, block_q=8, block_k=8, causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_causal_must_be_a_bool():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="causal must be a bool"):
        block_sparse_attention(q, q, q, torch.zeros(1, 1, 1, 1, dtype=torch.long), block_q=4, block_k=4, causal=1)


SHAPES = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 2),  # H
    st.integers(1, 33),  # Lq
    st.integers(1, 33),  # Lk
    st.sampled_from([8, 12]),  # D
    st.sampled_from([4, 8]),  # Dv
    st.integers(3, 20),  # block_q
    st.integers(2, 20),  # block_k
    st.integers(0, 4),  # entries per row
    st.integers(1, 4),  # levels
)


def _random_case(backend, dims, bias_heads, seed):
    b, h, lq, lk, d, dv, bq, bk, entries, num_levels = dims
    bias_heads = None if bias_heads is None else min(bias_heads, h)
    gen = torch.Generator().manual_seed(seed)
    mq, mk = -(-lq // bq), -(-lk // bk)
    index = torch.randint(-1, mk, (b, h, mq, entries), generator=gen)
    level = torch.randint(0, num_levels, index.shape, generator=gen)
    q, k, v, bias = make_inputs(b, h, lq, lk, d, dv, bias_heads, bq, bk)
    _check(backend, q, k, v, index, level, bias, bq, bk, num_levels)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(dims=SHAPES, bias_heads=st.sampled_from([None, 1, 2]), seed=st.integers(0, 2**16))
def test_random_shapes_gather_and_masked(dims, bias_heads, seed):
    _random_case("gather", dims, bias_heads, seed)
    _random_case("masked", dims, bias_heads, seed)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(dims=SHAPES, bias_heads=st.sampled_from([None, 1, 2]), seed=st.integers(0, 2**16))
def test_random_shapes_triton(dims, bias_heads, seed):
    _random_case("triton", dims, bias_heads, seed)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(dims=SHAPES, bias_heads=st.sampled_from([None, 1, 2]), seed=st.integers(0, 2**16))
def test_random_shapes_flex(dims, bias_heads, seed):
    _random_case("flex", dims, bias_heads, seed)
