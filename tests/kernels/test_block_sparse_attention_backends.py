"""Every backend of block-sparse attention against the reference (the oracle), forward and backward (q, k,
v and bias): `gather` (fused SDPA on gathered slots), `triton` (interpreted on CPU, fp32, fixed tile 16) and
`flex` (FlexAttention, compiled; forward only: torch 2.14 has no FlexAttention backward on the CPU).

Shapes are small and ragged on purpose: block sizes that are not multiples of the tile (or of the
pooling groups), sequences ending in a short block, head dims that are not powers of two, Dv != D,
every pooling level, empty, full and repeated index rows, per-head and shared tables, bias per head or
shared, and strided inputs. fp16/bf16 and the autotuned launch need a GPU (the interpreter's bf16 is
unreliable, triton-lang/triton#11584; autotuning benchmarks on a device).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from zoo.kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
)
from zoo.kernels.block_sparse_attention.triton_impl import invert_index  # noqa: E402

from tests.kernels._backends import ATOL, BACKENDS, RTOL, grads, make_inputs  # noqa: E402


def _check(q, k, v, index, level, bias, block_q, block_k, scale, num_levels, fn=None, backend="triton"):
    args = (q, k, v, index, level, bias, block_q, block_k, scale, num_levels)
    expected = block_sparse_attention_reference(*args)
    if backend == "flex":  # forward only on the CPU
        with torch.no_grad():
            out = BACKENDS[backend](*args)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
        return out, None
    if fn is None:
        out = BACKENDS[backend](*args)
    else:
        out = fn(q, k, v, index, level, bias, block_q=block_q, block_k=block_k, scale=scale, num_levels=num_levels)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    inputs = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    grad_out = torch.randn_like(expected)
    got, want = grads(out, inputs, grad_out), grads(expected, inputs, grad_out)
    for name, g, w in zip("qkvb", got, want, strict=False):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")
    return out, got


# name -> (B, H, Lq, Lk, D, Dv, block_q, block_k, bias heads or None, index (Bi, Hi, Mq, K), level or None)
CASES = {
    # 2 query blocks of 17 (tile 16: a block crosses a tile), keys ending in a short block of 3.
    "ragged-levels-bias": (1, 2, 34, 43, 12, 8, 17, 20, 2, [[[[0, 2, 1], [2, -1, 0]]]], [[[[1, 2, 0], [3, 0, 2]]]]),
    "every-level-shared-bias": (
        2,
        2,
        5,
        40,
        8,
        20,
        5,
        16,
        1,
        [[[[0, 1, 2, 0]]], [[[2, 2, 0, 1]]]],
        [[[[0, 1, 2, 3]]], [[[3, 2, 1, 0]]]],
    ),
    "empty-and-full": (1, 2, 12, 12, 8, 8, 4, 4, 2, [[[[-1, -1, -1], [0, 1, 2], [2, -1, 1]]]], None),
    "repeated": (1, 1, 5, 7, 32, 12, 5, 7, None, [[[[0, 0, 0]]]], [[[[0, 1, 1]]]]),
    "per-head-tables": (1, 2, 16, 33, 20, 8, 8, 11, None, [[[[0, 2], [1, 1]], [[2, -1], [0, 1]]]], None),
    "head-dim-64": (1, 1, 7, 9, 64, 64, 7, 9, 1, [[[[0]]]], None),
    "head-dim-128": (1, 1, 7, 9, 128, 128, 7, 9, None, [[[[0]]]], [[[[1]]]]),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, backend):
    b, h, lq, lk, d, dv, bq, bk, bias_heads, index, level = CASES[case]
    q, k, v, bias = make_inputs(b, h, lq, lk, d, dv, bias_heads, bq, bk)
    index = torch.tensor(index)
    level = None if level is None else torch.tensor(level)
    num_levels = 1 if level is None else int(level.max()) + 1
    _check(q, k, v, index, level, bias, bq, bk, d**-0.5, num_levels, backend=backend)


@pytest.mark.parametrize("backend", ["gather", "masked", "triton"])
def test_masking_bias_rows(backend):
    # A bias of -inf masks keys; a query row that meets only -inf gets zeros and zero gradients.
    q, k, v, bias = make_inputs(1, 2, 8, 8, 8, 8, 2, 4, 4)
    with torch.no_grad():
        bias[:, 0] = float("-inf")  # query offset 0 sees no key in any block
        bias[:, 1, :2] = float("-inf")
    index = torch.tensor([[[[0, 1], [1, -1]]]])
    out, _ = _check(q, k, v, index, None, bias, 4, 4, 0.5, 1, backend=backend)
    assert torch.equal(out[:, :, 0], torch.zeros(1, 2, 8)) and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_strided_inputs_and_int32_tables(backend):
    # q, k, v as views of one packed tensor (as after a fused qkv projection); a transposed bias.
    b, h, length, d = 1, 2, 19, 12
    packed = torch.randn(b, length, 3, h, d, requires_grad=True)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    bias_t = torch.randn(1, 10, 6, requires_grad=True)
    bias = bias_t.transpose(1, 2)
    index = torch.tensor([[[[1, 0], [0, -1], [1, 1], [0, 1]]]], dtype=torch.int32)
    level = torch.tensor([[[[0, 2, 1, 0], [1, 0, 0, 0]]]], dtype=torch.int32).transpose(-1, -2)  # other strides
    _check(q, k, v, index, level, bias, 6, 10, 0.3, 3, backend=backend)


def test_invert_index():
    index = torch.tensor([[[[2, 0, -1], [0, 0, 1]]]])
    level = torch.tensor([[[[0, 1, 0], [1, 1, 0]]]])
    src, bounds = invert_index(index, level, num_kv_blocks=3, num_levels=2)
    # units: level * 3 + block; unit 3 (block 0 at level 1) is listed by query block 0 once, block 1 twice.
    per_unit = [src[0, bounds[0, u] : bounds[0, u + 1]].tolist() for u in range(6)]
    assert per_unit == [[], [1], [0], [0, 1, 1], [], []]


def test_dispatch_forced_triton_and_deterministic(monkeypatch):
    monkeypatch.setenv("ZOO_KERNELS", "triton")
    q, k, v, _ = make_inputs(1, 2, 20, 24, 8, 8)
    index, level = torch.tensor([[[[0, 2, 2], [1, -1, 0]]]]), torch.tensor([[[[0, 1, 2], [1, 0, 0]]]])
    out, _ = _check(q, k, v, index, level, None, 10, 8, 0.4, 3, fn=block_sparse_attention)
    assert "block_sparse_attention" in type(out.grad_fn).__name__, "the Triton path did not run"
    # dk/dv are summed in registers, not with atomics: a second backward is bit-identical.
    run = lambda: torch.autograd.grad(
        block_sparse_attention(q, k, v, index, level, block_q=10, block_k=8).sum(), (k, v)
    )
    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


SHAPES = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 2),  # H
    st.integers(1, 33),  # Lq
    st.integers(1, 33),  # Lk
    st.sampled_from([8, 12, 32]),  # D
    st.sampled_from([4, 8, 20]),  # Dv
    st.integers(3, 20),  # block_q
    st.integers(2, 20),  # block_k
    st.integers(0, 4),  # entries per row
    st.integers(1, 4),  # levels
)
SHARED = st.tuples(st.booleans(), st.booleans())  # table shared across batch, across heads
BIAS_HEADS = st.sampled_from([None, 1, 2])
SEEDS = st.integers(0, 2**16)


def _random_case(backend, dims, shared, bias_heads, seed):
    b, h, lq, lk, d, dv, bq, bk, entries, num_levels = dims
    bias_heads = None if bias_heads is None else min(bias_heads, h)
    gen = torch.Generator().manual_seed(seed)
    mq, mk = -(-lq // bq), -(-lk // bk)
    shape = (1 if shared[0] else b, 1 if shared[1] else h, mq, entries)
    index = torch.randint(-1, mk, shape, generator=gen)  # with replacement: repeats and empties happen
    level = torch.randint(0, num_levels, shape, generator=gen)
    q, k, v, bias = make_inputs(b, h, lq, lk, d, dv, bias_heads, bq, bk)
    _check(q, k, v, index, level, bias, bq, bk, d**-0.5, num_levels, backend=backend)


# Example counts follow each backend's cost per shape: the gather path is cheap, the interpreter slow, and
# FlexAttention compiles every new shape.
@settings(max_examples=40, deadline=None, derandomize=True)
@given(dims=SHAPES, shared=SHARED, bias_heads=BIAS_HEADS, seed=SEEDS)
def test_random_shapes_gather(dims, shared, bias_heads, seed):
    _random_case("gather", dims, shared, bias_heads, seed)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(dims=SHAPES, shared=SHARED, bias_heads=BIAS_HEADS, seed=SEEDS)
def test_random_shapes_masked(dims, shared, bias_heads, seed):
    _random_case("masked", dims, shared, bias_heads, seed)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(dims=SHAPES, shared=SHARED, bias_heads=BIAS_HEADS, seed=SEEDS)
def test_random_shapes_triton(dims, shared, bias_heads, seed):
    _random_case("triton", dims, shared, bias_heads, seed)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(dims=SHAPES, shared=SHARED, bias_heads=BIAS_HEADS, seed=SEEDS)
def test_random_shapes_flex(dims, shared, bias_heads, seed):
    _random_case("flex", dims, shared, bias_heads, seed)


@pytest.mark.parametrize("block", [16, 17], ids=["explicit-matmuls", "fused-sdpa"])
@pytest.mark.parametrize("backend", ["gather", "masked", "flex"])
def test_bfloat16_close_to_the_float64_oracle(backend, block):
    # Softmax and the flex merge's log-sum-exp in fp32: bf16 inputs stay within bf16 rounding of the oracle.
    torch.manual_seed(0)
    length = 8 * block
    q, k, v = (torch.randn(1, 2, length, 32) for _ in range(3))
    index = torch.randint(0, 8, (1, 2, 8, 4))
    level = torch.randint(0, 4, index.shape)
    args = (index, level, None, block, block, 32**-0.5, 4)
    expected = block_sparse_attention_reference(q, k, v, *args)
    with torch.no_grad():
        out = BACKENDS[backend](q.bfloat16(), k.bfloat16(), v.bfloat16(), *args)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 2e-2 * expected.abs().max()


def test_flex_merge_has_finite_gradients_on_rows_without_pooled_entries():
    # The pooled half of FlexAttention's merge (its backward runs on CUDA): a row with no pooled entry has a
    # log-sum-exp of -inf, whose backward must not turn into NaN.
    from zoo.kernels.block_sparse_attention.torch_impl import _attend_lse, _listed_slots

    q, k, v = (torch.randn(1, 1, 8, 4, requires_grad=True) for _ in range(3))
    listed = _listed_slots(q, k, v, torch.tensor([[[[0], [-1]]]]), torch.tensor([[[[1], [0]]]]), None, 4, 2)
    out, lse = _attend_lse(q.view(1, 1, 2, 4, 4), listed, slice(None), 0.5)
    assert torch.isinf(lse[0, 0, 1]).all() and not out[0, 0, 1].any()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
