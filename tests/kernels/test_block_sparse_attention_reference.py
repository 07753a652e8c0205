"""The block-sparse attention reference (the oracle) means what its docstring says: full tables are dense
attention, windows with a bias are window attention, pooled blocks of equal tokens weigh as the tokens,
repeats count twice, routed regions are a gather of regions; it is differentiable (gradcheck in float64);
the dispatch names bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_gather,
    block_sparse_attention_reference,
    tables_from_level_map,
)

F64 = torch.float64


def _qkv(b=2, h=2, lq=23, lk=29, d=5, dv=4, dtype=F64, grad=False):
    q = torch.randn(b, h, lq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, h, lk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, h, lk, dv, dtype=dtype, requires_grad=grad)
    return q, k, v


def _tables(shape, num_blocks, num_levels):
    index = torch.randint(-1, num_blocks, shape)  # -1 (empty) and repeats both occur
    return index, torch.randint(0, num_levels, shape)


@pytest.mark.parametrize("table_heads", [1, 2])
def test_gather_slabs_equal_one_pass(table_heads):
    q, k, v = _qkv()  # 23 queries in blocks of 6, 29 keys in blocks of 7: both end in a short block
    index, level = _tables((2, table_heads, 4, 5), 5, 4)
    index[0, 0, 0] = -1  # an empty row
    index[1, 0, 1] = torch.tensor([3, 3, 3, 4, -1])  # repeats
    bias = torch.randn(2, 6, 7, dtype=F64)
    args = (q, k, v, index, level, bias, 6, 7, 0.4, 4)
    expected = block_sparse_attention_reference(*args)
    for chunk in (None, 1, 3):
        torch.testing.assert_close(block_sparse_attention_gather(*args, query_block_chunk=chunk), expected)
    assert torch.equal(expected[0, 0, :6], torch.zeros(6, 4, dtype=F64))  # the empty row


@pytest.mark.parametrize("fn", [block_sparse_attention_reference, block_sparse_attention_gather])
def test_gradcheck_float64(fn):
    q, k, v = _qkv(b=1, h=2, lq=7, lk=11, d=3, dv=2, grad=True)
    bias = torch.randn(1, 4, 4, dtype=F64, requires_grad=True)
    index = torch.tensor([[[[0, 2, -1], [1, 1, 2]]]])
    level = torch.tensor([[[[0, 2, 0], [1, 0, 2]]]])
    assert torch.autograd.gradcheck(lambda q, k, v, b: fn(q, k, v, index, level, b, 4, 4, 0.7, 3), (q, k, v, bias))


def test_full_table_at_level_zero_is_dense_attention():
    q, k, v = _qkv(lq=13, lk=17)
    index = torch.arange(5).expand(2, 1, 4, 5)  # every key block (blocks of 4) for every query block
    out = block_sparse_attention(q, k, v, index, block_q=4, block_k=4, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_window_attention_with_relative_position_bias():
    # Every query block lists its own block: window attention; the bias is each window's attention mask.
    q, k, v = _qkv(lq=15, lk=15)
    bias = torch.randn(2, 5, 5, dtype=F64)
    index = torch.arange(3).view(1, 1, 3, 1)
    out = block_sparse_attention(q, k, v, index, bias=bias, block_q=5, block_k=5, scale=0.5)
    win = lambda t: t.unflatten(2, (3, 5))
    expected = F.scaled_dot_product_attention(win(q), win(k), win(v), attn_mask=bias[:, None], scale=0.5)
    torch.testing.assert_close(out, expected.flatten(2, 3))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_pooled_block_weighs_as_its_tokens(level):
    # Keys and values equal within each pooling group (and a short last block): pooled == unpooled.
    q = torch.randn(1, 2, 9, 4, dtype=F64)
    group = 1 << level
    lk = 2 * 8 + 5
    k = torch.randn(1, 2, -(-lk // group), 4, dtype=F64)
    v = torch.randn(1, 2, -(-lk // group), 3, dtype=F64)
    # Group boundaries restart at every block of 8, and 8 is a multiple of the group size.
    k, v = (t.repeat_interleave(group, dim=2)[:, :, :lk] for t in (k, v))
    index = torch.tensor([[[[0, 2, 1], [2, -1, 0], [1, 1, 2]]]])
    level_t = torch.full_like(index, level)
    pooled = block_sparse_attention(q, k, v, index, level_t, block_q=3, block_k=8, num_levels=level + 1)
    full = block_sparse_attention(q, k, v, index, block_q=3, block_k=8)
    torch.testing.assert_close(pooled, full)


def test_repeated_block_counts_twice():
    q, k, v = _qkv(b=1, h=1, lq=4, lk=8)
    twice = block_sparse_attention(q, k, v, torch.tensor([[[[0, 1, 1]]]]), block_q=4, block_k=4)
    bias = torch.cat([torch.zeros(4), torch.full((4,), 2.0, dtype=F64).log()])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(4, 8))
    torch.testing.assert_close(twice, expected)


def test_empty_tables_give_zeros():
    q, k, v = _qkv()
    for index in (torch.full((2, 2, 4, 3), -1), torch.zeros(2, 1, 4, 0, dtype=torch.long)):
        out = block_sparse_attention(q, k, v, index, block_q=6, block_k=7)
        assert torch.equal(out, torch.zeros(2, 2, 23, 4, dtype=F64))


@pytest.mark.parametrize("lq, lk", [(3, 4), (20, 24)], ids=["small-regions", "large-regions"])
@pytest.mark.parametrize("backend", ["reference", "gather", "flex", "triton"])
def test_routed_attention_is_a_case(backend, lq, lk, monkeypatch):
    # BiFormer's routed attention as its official code computes it: gather the routed regions' keys and
    # values for every query region, attend with one softmax. Every slot valid: the gather path runs without
    # a mask (explicit matmuls for small query blocks, fused SDPA for large ones).
    monkeypatch.setenv("ZOO_KERNELS", backend)
    q, k, v = _qkv(b=2, h=2, lq=6 * lq, lk=5 * lk, dtype=torch.float32)
    region_index = torch.randint(0, 5, (2, 6, 3))
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, region_index.unsqueeze(1), block_q=lq, block_k=lk, scale=0.4)
    batch, head = torch.arange(2)[:, None, None, None], torch.arange(2)[None, :, None, None]
    ks, vs = (t.unflatten(2, (5, lk))[batch, head, region_index[:, None]].flatten(3, 4) for t in (k, v))
    attn = (q.unflatten(2, (6, lq)) @ ks.transpose(-1, -2) * 0.4).softmax(-1)
    torch.testing.assert_close(out, (attn @ vs).flatten(2, 3), atol=1e-5, rtol=1e-5)


def test_tables_from_level_map():
    level_map = torch.tensor([[[[-1, 2, 0, -1], [-1, -1, -1, -1], [1, 1, 1, 1]]]])
    index, level = tables_from_level_map(level_map)
    assert index.tolist() == [[[[1, 2, -1, -1], [-1, -1, -1, -1], [0, 1, 2, 3]]]]
    assert level.tolist() == [[[[2, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]]]
    q, k, v = _qkv(b=1, h=1, lq=9, lk=15)
    out = block_sparse_attention(q, k, v, index, level, block_q=3, block_k=4, num_levels=3)
    narrow = tables_from_level_map(level_map, max_entries=2)
    assert narrow[0].shape[-1] == 2
    torch.testing.assert_close(out[:, :, :6], block_sparse_attention(q, k, v, *narrow, block_q=3, block_k=4)[:, :, :6])


def test_default_scale_and_num_levels():
    q, k, v = _qkv()
    index, level = _tables((2, 1, 4, 3), 5, 3)
    level[0, 0, 0, 0] = 2
    out = block_sparse_attention(q, k, v, index, level, block_q=6, block_k=7)
    expected = block_sparse_attention_reference(q, k, v, index, level, None, 6, 7, 5**-0.5, num_levels=3)
    torch.testing.assert_close(out, expected)


def _good():
    q, k, v = _qkv()
    index, level = _tables((2, 1, 4, 3), 5, 2)
    return q, k, v, index, level, torch.zeros(1, 6, 7, dtype=F64)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, i, lv, b: (q[0], k, v, i, lv, b), r"expects q \(B, H, Lq, D\)"),
        (lambda q, k, v, i, lv, b: (q, k[..., :3], v, i, lv, b), "incompatible shapes"),
        (lambda q, k, v, i, lv, b: (q, k.float(), v, i, lv, b), "share a floating dtype"),
        (lambda q, k, v, i, lv, b: (q, k, v, i[:, :, :3], lv, b), r"ceil\(Lq / block_q\) = 4; got \(2, 1, 3, 3\)"),
        (lambda q, k, v, i, lv, b: (q, k, v, i.float(), lv, b), "int32 or int64"),
        (lambda q, k, v, i, lv, b: (q, k, v, i + 5, lv, b), r"kv_index values must lie in \[-1, 5\)"),
        (lambda q, k, v, i, lv, b: (q, k, v, i, lv[..., :2], b), "kv_level must have the shape of kv_index"),
        (lambda q, k, v, i, lv, b: (q, k, v, i, lv + 7, b), r"kv_level values must lie in \[0, num_levels = 2\)"),
        (lambda q, k, v, i, lv, b: (q, k, v, i, lv, b[:, :5]), r"bias \(H or 1, block_q, block_k\) = \(2 or 1, 6, 7\)"),
    ],
)
def test_bad_inputs_are_named(change, message):
    q, k, v, index, level, bias = change(*_good())
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, k, v, index, level, bias, block_q=6, block_k=7, num_levels=2)


def test_bad_block_size_is_named():
    q, k, v, index, _, _ = _good()
    with pytest.raises(ValueError, match="block_k must be a positive int, got 0"):
        block_sparse_attention(q, k, v, index, block_q=6, block_k=0)
