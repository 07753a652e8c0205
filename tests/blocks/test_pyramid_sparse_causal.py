"""Causal PSA's planner (`plan_levels(..., causal=True)`, the official Qwen2.5-VL example's rules) and op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.blocks.pyramid_sparse import (
    PSAConfig,
    assign_levels,
    attention_density,
    block_importance,
    causal_block_masks,
    plan_levels,
    pyramid_sparse_attention,
)


def test_causal_block_masks():
    # Query blocks of 4 over key blocks of 3 (10 tokens): block j is visible from the query block holding its
    # first token on, whole once the query block starts at or after its last token.
    visible, whole = causal_block_masks(10, 10, 4, 3)
    assert visible.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert whole.int().tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]  # query 8 sees keys 6-8


def test_causal_importance_ignores_the_future():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 70, 8), torch.randn(1, 2, 70, 8)
    importance = block_importance(q, k, 16, 16, causal=True)
    visible, _ = causal_block_masks(70, 70, 16, 16)
    assert (importance[..., ~visible] == 0).all() and (importance[..., visible] > 0).all()
    torch.testing.assert_close(importance.sum(-1), torch.ones(1, 2, 5))


def test_quota_is_a_share_of_the_visible_blocks():
    # Quotas of 40% full, 20% more at 2x: a row that sees n blocks keeps max(1, floor(0.4 n)) full and
    # floor(0.6 n) - that at 2x, in importance order; nothing past its visible blocks.
    config = PSAConfig(block_q=8, block_k=8, assignment="quota", level_bounds=(0.4, 0.6, 0.6, 0.6), reorder="none")
    visible, _ = causal_block_masks(80, 80, 8, 8)
    importance = torch.rand(1, 1, 10, 10).masked_fill(~visible, 0)
    levels = assign_levels(importance / importance.sum(-1, keepdim=True), config, visible)
    for i, row in enumerate(levels[0, 0]):
        n = i + 1
        full, half = max(1, int(0.4 * n)), int(0.6 * n) - max(1, int(0.4 * n))
        assert (row == 1).sum() == full and (row == 2).sum() == max(0, half), (i, row)
        assert (row[n:] == 0).all()
        ranked = importance[0, 0, i, :n].argsort(descending=True)
        assert (row[ranked[:full]] == 1).all()


def test_plan_skips_above_the_diagonal_and_keeps_diagonal_sink_and_tail_full():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    config = PSAConfig(
        block_q=16, block_k=16, assignment="quota", level_bounds=(0.1, 0.2, 0.3, 0.4), reorder="none", warmup_steps=0
    )
    levels = plan_levels(q, k, config, causal=True, full_query_from=176)
    visible, whole = causal_block_masks(200, 200, 16, 16)
    assert (levels[..., ~visible] == 0).all()
    assert (levels[..., visible & ~whole] == 1).all()  # the diagonal
    assert (levels[..., 0] == 1).all()  # the first key block (attention sink)
    assert (levels[..., 11:, :][..., visible[11:]] == 1).all()  # query blocks from token 176 on: dense
    middle = levels[..., 5:11, :]
    assert (middle == 0).any() and ((middle == 2) | (middle == 4) | (middle == 8)).any()  # sparse elsewhere


@pytest.mark.parametrize(("length", "block"), [(200, 16), (97, 32), (64, 64)])
def test_full_density_causal_is_dense_causal_attention(length, block):
    q, k, v = (torch.randn(2, 3, length, 16) for _ in range(3))
    config = PSAConfig.full_density(block_q=block, block_k=block, reorder="none")
    levels = plan_levels(q, k, config, causal=True)
    visible, _ = causal_block_masks(length, length, block, block)
    assert torch.equal(levels.bool(), visible.expand_as(levels))
    assert float(attention_density(levels, visible)) == 1.0
    out = pyramid_sparse_attention(q, k, v, levels, block, block, causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_causal_density_counts_the_pairs_causal_attention_computes():
    visible, _ = causal_block_masks(64, 64, 16, 16)  # 10 of 16 pairs
    levels = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    levels[..., 0] = 1  # 4 full pairs
    levels[0, 0, 3, 1] = 2  # one half pair
    assert float(attention_density(levels, visible)) == pytest.approx(4.5 / 10)
    assert float(attention_density(levels)) == pytest.approx(4.5 / 16)
