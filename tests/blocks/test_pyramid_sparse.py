"""The PSA block: config checks, token orders, level planning, full density equal to dense attention,
the default config's measured error, dense warm-up, text tokens, and the video self-attention mixer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from zoo.blocks.pyramid_sparse import (
    PSAConfig,
    PyramidSparseAttention,
    VideoSelfAttention,
    assign_levels,
    attention_density,
    block_importance,
    plan_levels,
    similarity_cap,
)

SMALL = dict(block_q=32, block_k=16, tile_size=(2, 4, 4))


def _local_field(grid, heads=2, dim=32, sigma=2.0, seed=0):
    """Queries = keys = random Fourier features of the token positions: attention is local in space-time,
    as in video transformers, and known exactly."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in grid], indexing="ij"), -1)
    angles = pos.view(-1, 3) @ (torch.randn(3, dim // 2, generator=g) / sigma)
    feats = torch.cat([angles.cos(), angles.sin()], -1) * dim**0.25
    qk = feats.expand(1, heads, -1, -1).contiguous()
    return qk, qk, torch.randn(1, heads, math.prod(grid), dim, generator=g)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_k=12), "block_k"),
        (dict(block_q=0), "block_q"),
        (dict(assignment="topk"), "assignment"),
        (dict(level_bounds=(0.2, 0.1, 0.3, 0.4)), "level_bounds"),
        (dict(level_bounds=(0.1, 0.2, 0.3)), "level_bounds"),
        (dict(level_bounds=(0.1, 0.2, 0.3, 1.5)), "level_bounds"),
        (dict(reorder="hilbert"), "reorder"),
        (dict(tile_size=(2, 0, 8)), "tile_size"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(sample_stride=0), "sample_stride"),
        (dict(similarity_thresholds=(0.7, 0.6)), "similarity_thresholds"),
    ],
)
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PSAConfig(**kwargs)


def test_defaults_are_the_official_ones():
    cfg = PSAConfig()
    assert (cfg.block_q, cfg.block_k, cfg.assignment, cfg.reorder) == (128, 64, "quota", "gilbert")
    assert cfg.level_bounds == (0.10, 0.15, 0.15, 0.35)  # 10% full, 5% 2x, 0% 4x, 20% 8x, 65% skipped
    assert PSAConfig(**cfg.to_dict()) == cfg  # JSON round trip (tuples as lists)


# ------------------------------------------------------------------------------------------------ planning


def test_importance_finds_the_planted_block():
    q, k = torch.randn(1, 1, 64, 16) * 0.1, torch.randn(1, 1, 96, 16) * 0.1
    topic = torch.randn(16)
    q[:, :, :32] += topic  # query block 0 is about `topic`, and so is key block 3
    k[:, :, 48:64] += 2 * topic
    importance = block_importance(q, k, 32, 16)
    assert importance.shape == (1, 1, 2, 6)
    torch.testing.assert_close(importance.sum(-1), torch.ones(1, 1, 2))
    assert importance[0, 0, 0].argmax() == 3


def test_quota_assignment_counts():
    importance = torch.rand(2, 3, 4, 40).softmax(-1)
    levels = assign_levels(importance, PSAConfig())
    counts = {f: int((levels[0, 0, 0] == f).sum()) for f in (1, 2, 4, 8, 0)}
    assert counts == {1: 4, 2: 2, 4: 0, 8: 8, 0: 26}
    # the full blocks are the most important ones, the skipped the least
    order = importance.argsort(-1, descending=True)
    assert torch.equal(levels.gather(-1, order[..., :4]), torch.ones(2, 3, 4, 4, dtype=torch.uint8))
    assert torch.equal(levels.gather(-1, order[..., 14:]), torch.zeros(2, 3, 4, 26, dtype=torch.uint8))


def test_quota_keeps_one_full_block_on_short_rows():
    levels = assign_levels(torch.rand(1, 1, 2, 5).softmax(-1), PSAConfig())
    assert ((levels == 1).sum(-1) == 1).all()


def test_threshold_assignment_reaches_the_bounds():
    importance = torch.rand(1, 2, 3, 50).pow(4)
    importance = importance / importance.sum(-1, keepdim=True)
    cfg = PSAConfig(assignment="threshold", level_bounds=(0.6, 0.7, 0.7, 0.8))
    levels = assign_levels(importance, cfg)
    full = (importance * (levels == 1)).sum(-1)
    kept = (importance * (levels > 0)).sum(-1)
    assert (full >= 0.6 - 1e-6).all() and (kept >= 0.8 - 1e-6).all()
    assert ((levels == 4).sum(-1) == 0).all()  # 4x gets the empty interval (0.7, 0.7]
    assert ((levels == 1).sum(-1) >= int(50 * cfg.min_full_fraction) + 1).all()


def test_similarity_cap():
    k = torch.randn(1, 1, 48, 16)
    k[:, :, :16] = torch.randn(16)  # block 0: identical keys -> may pool 8x
    k[:, :, 16:32] = torch.randn(8, 16).repeat_interleave(2, 0)  # block 1: pairs alike -> 2x only
    assert similarity_cap(k, 16, (0.7, 0.65, 0.6))[0, 0].tolist() == [8, 2, 1]
    q = torch.randn(1, 1, 48, 16)
    cfg = PSAConfig(block_q=16, block_k=16, level_bounds=(0, 0, 0, 1))  # one full block per row, the rest 8x
    free = plan_levels(q, k, cfg)
    capped = plan_levels(q, k, dataclasses.replace(cfg, use_similarity=True))
    assert free.eq(8).sum() == 6
    assert torch.equal(capped, torch.where(free == 8, torch.tensor([8, 2, 1], dtype=torch.uint8), free))


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("reorder", ["gilbert", "tiles", "none"])
@pytest.mark.parametrize("assignment", ["quota", "threshold"])
def test_full_density_equals_dense_attention(reorder, assignment):
    grid = (3, 6, 10)  # 180 tokens: ragged against both block sizes
    q, k, v = (torch.randn(2, 2, 180, 16) for _ in range(3))
    cfg = PSAConfig.full_density(assignment=assignment, reorder=reorder, **SMALL)
    psa = PyramidSparseAttention(cfg)
    torch.testing.assert_close(psa(q, k, v, grid=grid), F.scaled_dot_product_attention(q, k, v))
    assert float(psa.last_density) == 1.0


def test_default_config_error_against_dense_is_bounded():
    grid = (4, 16, 16)
    q, k, v = _local_field(grid)
    dense = F.scaled_dot_product_attention(q, k, v)
    psa = PyramidSparseAttention(PSAConfig(**SMALL))
    error = float((psa(q, k, v, grid=grid) - dense).norm() / dense.norm())
    density = float(psa.last_density)
    # measured: relative error 0.11 at 14% of dense attention's arithmetic (10% full, 5% 2x, 20% 8x)
    assert 0.12 < density < 0.16
    assert error < 0.2
    # and the threshold assignment of the Wan2.1-1.3B preset (measured: 0.19 at 9%)
    psa = PyramidSparseAttention(PSAConfig(assignment="threshold", level_bounds=(0.6, 0.7, 0.7, 0.8), **SMALL))
    assert float((psa(q, k, v, grid=grid) - dense).norm() / dense.norm()) < 0.25


def test_warmup_steps_run_dense():
    q, k, v = _local_field((2, 8, 8))
    psa = PyramidSparseAttention(PSAConfig(warmup_steps=2, **SMALL))
    dense = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(psa(q, k, v, grid=(2, 8, 8), step=1), dense)
    assert not torch.allclose(psa(q, k, v, grid=(2, 8, 8), step=2), dense, atol=1e-4)
    assert not torch.allclose(psa(q, k, v, grid=(2, 8, 8)), dense, atol=1e-4)  # no step: always sparse


def test_text_tokens_keep_full_key_blocks():
    grid, text = (2, 4, 8), 10
    q, k, v = (torch.randn(1, 2, 64 + text, 16) for _ in range(3))
    cfg = PSAConfig(**SMALL)
    psa = PyramidSparseAttention(cfg)
    out = psa(q, k, v, grid=grid, num_text_tokens=text)
    assert out.shape == q.shape
    # with the text moved last, its key blocks (from token 64 on) are full for every query block
    order = psa._order(grid, text, 64 + text, q.device)
    levels = plan_levels(q[:, :, order], k[:, :, order], cfg, full_key_from=64)
    assert levels[..., 64 // 16 :].eq(1).all()
    full = PyramidSparseAttention(PSAConfig.full_density(**SMALL))
    torch.testing.assert_close(full(q, k, v, grid=grid, num_text_tokens=text), F.scaled_dot_product_attention(q, k, v))


def test_bad_inputs_raise_value_error():
    psa = PyramidSparseAttention(PSAConfig(**SMALL))
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="grid"):
        psa(q, q, q, grid=(2, 4, 4))
    with pytest.raises(ValueError, match="num_text_tokens"):
        psa(q, q, q, num_text_tokens=65)
    with pytest.raises(ValueError, match="one length"):
        psa(q, q[:, :, :32], q)
    with pytest.raises(ValueError, match="PSAConfig"):
        PyramidSparseAttention({"block_q": 32})


def test_density_of_levels():
    levels = torch.tensor([1, 2, 4, 8, 0, 0, 0, 0], dtype=torch.uint8)
    assert float(attention_density(levels)) == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 8)


# ------------------------------------------------------------------------------------------------ mixer


def test_video_self_attention_dense_and_psa_share_weights_and_agree_at_full_density():
    mixer = VideoSelfAttention(32, 4, psa_config=PSAConfig.full_density(**SMALL))
    x = torch.randn(2, 2, 6, 10, 32)
    rope = (torch.randn(120, 8).cos(), torch.randn(120, 8).sin())
    dense = mixer(x, rope=rope)
    mixer.set_attention("psa")
    torch.testing.assert_close(mixer(x, rope=rope), dense)
    assert dense.shape == x.shape
    assert all("psa" not in name for name in mixer.state_dict())  # PSA adds no weights
    mixer.psa.config = PSAConfig(**SMALL)
    assert not torch.allclose(mixer(x, rope=rope), dense, atol=1e-4)


def test_video_self_attention_bad_input():
    mixer = VideoSelfAttention(32, 4)
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 32\)"):
        mixer(torch.randn(2, 60, 32))
    with pytest.raises(ValueError, match="attention"):
        mixer.set_attention("sparse")
    with pytest.raises(ValueError, match="divisible"):
        VideoSelfAttention(30, 4)
