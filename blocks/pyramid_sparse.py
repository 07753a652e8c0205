"""Pyramid Sparse Attention (PSA) for video transformers.

Li et al., "PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation"
(arXiv:2512.04025); official code: github.com/ziplab/Pyramid-Sparse-Attention.

Queries are split into blocks of `block_q` tokens, keys and values into blocks of `block_k` tokens.
For every (query block, key block) pair PSA estimates an importance from a few sampled queries and keys
of the two blocks, then gives each query block's most important key blocks their full resolution, the
next ones 2x, 4x or 8x average-pooled keys and values, and skips the rest: by fixed quotas per level
(`assignment="quota"`, the official `topk` mask mode) or by the cumulative importance each level must
reach (`assignment="threshold"`, the official `thresholdbound`). An optional similarity constraint
pools a key block only as far as its keys are alike. The op itself (`zoo.kernels.block_sparse_attention`, its
levels 0..3 for the factors 1..8) adds
log(pool factor) to a pooled key's logit, so that it weighs as the tokens it stands for, under one
softmax.

Video tokens are reordered before blocking so that a block is a compact space-time neighbourhood: along
a 3-D generalized Hilbert ("Gilbert") curve, as the official code does, or tile by tile
(`zoo.blocks.video_order`); the output is put back in the input order.

Causal PSA (video understanding: a language model's prefill over text and video tokens, as the official
Qwen2.5-VL example does): `plan_levels(..., causal=True)` estimates importance over past keys only, shares each
level's quota or energy among the key blocks a query block can see, keeps the blocks on the diagonal (which a
query block sees only in part) and the first key block at full resolution and skips the blocks above it;
`pyramid_sparse_attention(..., causal=True)` hides every key, and every pooled group, that ends after a query.

`PyramidSparseAttention` is the parameter-free core on (B, heads, L, head_dim) tensors (what a
diffusers attention processor calls); `VideoSelfAttention` is a self-attention mixer on channels-last
video (B, T, H, W, C) whose attention is dense SDPA or PSA, switchable without touching its weights.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.kernels import block_sparse_attention, tables_from_level_map

from .video_order import REORDERS, video_token_order

__all__ = [
    "POOL_FACTORS",
    "PSA_PRESETS",
    "PSAConfig",
    "PyramidSparseAttention",
    "VideoSelfAttention",
    "apply_rotary_interleaved",
    "assign_levels",
    "attention_density",
    "block_importance",
    "causal_block_masks",
    "plan_levels",
    "pyramid_sparse_attention",
    "similarity_cap",
]

ASSIGNMENTS = ("quota", "threshold")
# PSA's levels: a key block at full resolution (1), pooled in groups of 2, 4 or 8 tokens, or skipped (0).
POOL_FACTORS = (1, 2, 4, 8)


def _sequence(name: str, values: object) -> tuple:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence, got {values!r}")
    return tuple(values)


def _numbers(name: str, values: object) -> tuple[float, ...]:
    values = _sequence(name, values)
    if any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in values):
        raise TypeError(f"{name} must hold numbers, got {values!r}")
    return tuple(float(x) for x in values)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


@dataclasses.dataclass
class PSAConfig:
    """Everything PSA can be told. Defaults are the official plug-and-play ones (`psa_triton.PSAConfig`).

    Attributes:
        block_q: query tokens per block (official `block_m`, 128).
        block_k: key/value tokens per block (official `block_n`, 64); a multiple of 8.
        assignment: "quota" gives each level a fixed share of every query block's key blocks, ranked by
            importance (official `mask_mode="topk"`); "threshold" gives each level the blocks that bring the
            cumulative importance up to its bound (official `"thresholdbound"`).
        level_bounds: cumulative upper bounds for the levels 1 (full), 2, 4 and 8 (pooled); blocks past the
            last bound are skipped. Under "quota" they are fractions of the key blocks: the default
            (0.10, 0.15, 0.15, 0.35) keeps 10% full, 5% at 2x, none at 4x, 20% at 8x and skips 65% (the
            official `mask_ratios`). Under "threshold" they are cumulative importance, e.g. the official
            Wan2.1-1.3B preset (0.6, 0.7, 0.7, 0.8).
        min_full_fraction: under "threshold", the least fraction of key blocks kept at full resolution
            (official 0.08); under "quota" at least one block is always kept full.
        sample_stride: the importance estimate uses every `sample_stride`-th query and key of each block
            (official: block // 4 tokens per block, at random positions).
        use_similarity: pool a key block at 2x/4x/8x only where its keys are alike (official `use_sim_mask`).
        similarity_thresholds: cosine similarity a block's token pairs 1, 3 and 7 apart must exceed on
            average to allow 2x, 4x and 8x pooling (official presets: 0.7, 0.65, 0.6).
        reorder: order of video tokens before blocking: "gilbert" (3-D generalized Hilbert curve, official),
            "tiles" (tile by tile, `tile_size` (t, h, w) tokens each) or "none".
        tile_size: tile extent for `reorder="tiles"` (official presets: (2, 8, 8)).
        warmup_steps: the first denoising steps run dense attention (official Wan2.1 presets: 15 of 50).
            Only applies where the caller passes the step (the diffusers integration and the zoo's pipeline).
    """

    block_q: int = 128
    block_k: int = 64
    assignment: str = "quota"
    level_bounds: tuple[float, float, float, float] = (0.10, 0.15, 0.15, 0.35)
    min_full_fraction: float = 0.08
    sample_stride: int = 4
    use_similarity: bool = False
    similarity_thresholds: tuple[float, float, float] = (0.7, 0.65, 0.6)
    reorder: str = "gilbert"
    tile_size: tuple[int, int, int] = (2, 8, 8)
    warmup_steps: int = 15

    def __post_init__(self) -> None:
        # Every field is checked for type as well as range: a float tile size or `block_q=True` used to pass as
        # an int, NaN similarity thresholds disabled pooling without a word.
        self.level_bounds = _numbers("level_bounds", self.level_bounds)
        self.similarity_thresholds = _numbers("similarity_thresholds", self.similarity_thresholds)
        self.tile_size = tuple(_integer("tile_size", x) for x in _sequence("tile_size", self.tile_size))
        _integer("block_q", self.block_q)
        if _integer("block_k", self.block_k) <= 0 or self.block_k % max(POOL_FACTORS):
            raise ValueError(f"block_k must be a positive multiple of {max(POOL_FACTORS)}, got {self.block_k!r}")
        _integer("sample_stride", self.sample_stride)
        _integer("warmup_steps", self.warmup_steps)
        if not isinstance(self.use_similarity, bool):
            raise TypeError(f"use_similarity must be a bool, got {self.use_similarity!r}")
        if isinstance(self.min_full_fraction, bool) or not isinstance(self.min_full_fraction, numbers.Real):
            raise TypeError(f"min_full_fraction must be a number in [0, 1], got {self.min_full_fraction!r}")
        if not (isinstance(self.block_q, int) and self.block_q > 0):
            raise ValueError(f"block_q must be a positive int, got {self.block_q!r}")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        bounds = self.level_bounds
        if len(bounds) != 4 or any(not 0.0 <= x <= 1.0 for x in bounds) or list(bounds) != sorted(bounds):
            raise ValueError(f"level_bounds must be 4 non-decreasing numbers in [0, 1], got {bounds}")
        if not 0.0 <= self.min_full_fraction <= 1.0:
            raise ValueError(f"min_full_fraction must lie in [0, 1], got {self.min_full_fraction}")
        if not (isinstance(self.sample_stride, int) and self.sample_stride > 0):
            raise ValueError(f"sample_stride must be a positive int, got {self.sample_stride!r}")
        if len(self.similarity_thresholds) != 3 or any(not -1.0 <= x <= 1.0 for x in self.similarity_thresholds):
            raise ValueError(
                f"similarity_thresholds must be 3 cosine similarities in [-1, 1] (2x, 4x, 8x), got "
                f"{self.similarity_thresholds}"
            )
        if self.reorder not in REORDERS:
            raise ValueError(f"reorder must be one of {REORDERS}, got {self.reorder!r}")
        if len(self.tile_size) != 3 or min(self.tile_size) < 1:
            raise ValueError(f"tile_size must be 3 positive ints (t, h, w), got {self.tile_size}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be a non-negative int, got {self.warmup_steps!r}")

    @classmethod
    def full_density(cls, **overrides) -> PSAConfig:
        """A config that keeps every key block at full resolution: PSA then equals dense attention."""
        return cls(**{"assignment": "quota", "level_bounds": (1.0, 1.0, 1.0, 1.0), "warmup_steps": 0, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> PSAConfig:
        """The official repository's configuration for a model, by name (`PSA_PRESETS` lists them).

        Args:
            name: e.g. "wan2.1-1.3b", "wan2.1-14b", "wan2.2-a14b", "wan2.2-ti2v-5b", "cogvideox-5b",
                "cogvideox1.5-5b", "qwen2.5-vl" (case-insensitive).
            overrides: fields to change, e.g. `warmup_steps=0`.
        """
        key = str(name).lower()
        if key not in PSA_PRESETS:
            raise ValueError(f"unknown PSA preset {name!r}; presets: {', '.join(sorted(PSA_PRESETS))}")
        return cls(**{**PSA_PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        """JSON-friendly fields (tuples as lists), e.g. for a diffusers model config."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }


# The official repository's per-model settings (github.com/ziplab/Pyramid-Sparse-Attention, configs/
# attention_config.yaml: each model's default "psa_balanced" entry unless named otherwise; the Qwen2.5-VL example's
# default for "qwen2.5-vl"), in this config's terms: block_size m/n -> block_q/block_k, mask_mode topk -> "quota"
# and thresholdbound/energybound -> "threshold", the upper ends of mask_ratios for levels 1/2/4/8 -> level_bounds,
# use_sim_mask and sim_thresholds -> use_similarity and similarity_thresholds, use_rearrange (Gilbert) -> reorder.
PSA_PRESETS: dict[str, dict] = {
    "wan2.1-1.3b": dict(
        block_q=128, block_k=128, assignment="threshold", level_bounds=(0.5, 0.6, 0.7, 0.8), use_similarity=True,
        similarity_thresholds=(0.7, 0.65, 0.6), reorder="gilbert", tile_size=(2, 8, 8), warmup_steps=15,
    ),
    # The same model's "psa_topk" entry: fixed quotas, 5% of key blocks full, 25% kept in all.
    "wan2.1-1.3b-topk": dict(
        block_q=128, block_k=32, assignment="quota", level_bounds=(0.05, 0.1, 0.15, 0.25), use_similarity=False,
        similarity_thresholds=(0.7, 0.65, 0.65), reorder="gilbert", tile_size=(2, 8, 8), warmup_steps=15,
    ),
    "wan2.1-14b": dict(
        block_q=128, block_k=128, assignment="threshold", level_bounds=(0.4, 0.5, 0.6, 0.8), use_similarity=False,
        similarity_thresholds=(0.7, 0.65, 0.6), reorder="gilbert", tile_size=(2, 8, 8), warmup_steps=15,
    ),
    "wan2.2-a14b": dict(
        block_q=128, block_k=32, assignment="threshold", level_bounds=(0.5, 0.6, 0.6, 0.8), use_similarity=False,
        similarity_thresholds=(0.7, 0.65, 0.6), reorder="gilbert", tile_size=(2, 8, 8), warmup_steps=12,
    ),
    "wan2.2-ti2v-5b": dict(
        block_q=128, block_k=32, assignment="threshold", level_bounds=(0.6, 0.7, 0.7, 0.8), use_similarity=False,
        similarity_thresholds=(0.7, 0.65, 0.6), reorder="gilbert", tile_size=(2, 8, 8), warmup_steps=15,
    ),
    "cogvideox-5b": dict(
        block_q=128, block_k=128, assignment="quota", level_bounds=(0.1, 0.15, 0.15, 0.35), use_similarity=False,
        similarity_thresholds=(0.7, 0.65, 0.6), reorder="none", tile_size=(2, 8, 8), warmup_steps=15,
    ),
    # CogVideoX-5B's 4-step LoRA entry ("psa_4steps"): no warm-up in four steps.
    "cogvideox-5b-4steps": dict(
        block_q=128, block_k=128, assignment="quota", level_bounds=(0.05, 0.15, 0.25, 0.5), use_similarity=False,
        similarity_thresholds=(0.7, 0.65, 0.6), reorder="none", tile_size=(2, 8, 8), warmup_steps=0,
    ),
    "cogvideox1.5-5b": dict(
        block_q=128, block_k=32, assignment="quota", level_bounds=(0.1, 0.15, 0.15, 0.35), use_similarity=False,
        similarity_thresholds=(0.7, 0.65, 0.6), reorder="gilbert", tile_size=(2, 8, 8), warmup_steps=15,
    ),
    # Video understanding (causal, text and vision tokens in one sequence): the Qwen2.5-VL example's default,
    # energy-bounded with blocks of 128 queries and keys, no token reordering; that example always caps pooling
    # by key similarity (`calc_k_similarity_triton` at 0.75/0.7/0.7), hence use_similarity. Plan it with
    # `plan_levels(..., causal=True)` (zoo.vlm does).
    "qwen2.5-vl": dict(
        block_q=128, block_k=128, assignment="threshold", level_bounds=(0.7, 0.8, 0.9, 0.9), use_similarity=True,
        similarity_thresholds=(0.75, 0.7, 0.7), reorder="none", warmup_steps=0,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- planning


def _sample_index(length: int, block: int, stride: int, device: torch.device) -> torch.Tensor:
    """(M, n) positions of the sampled tokens of each block; the last block repeats its last real token."""
    blocks, per_block = -(-length // block), max(1, block // stride)
    pos = torch.arange(blocks, device=device).unsqueeze(1) * block + torch.arange(per_block, device=device) * stride
    return pos.clamp_(max=length - 1)


@torch.no_grad()
def block_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int,
    block_k: int,
    sample_stride: int = 4,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Importance of every key block to every query block, from sampled queries and keys.

    As in the official pooling kernel: for each sampled query, the largest logit within each key block,
    turned into weights relative to its largest (exp(l - max)); a query block takes the largest weight
    of its sampled queries; each query block's row is normalised to sum to one.

    Args:
        q: (B, H, Lq, D), k: (B, H, Lk, D).
        block_q, block_k: block sizes.
        sample_stride: keep every `sample_stride`-th token of a block (block // sample_stride tokens).
        scale: logit scale; defaults to D ** -0.5.
        causal: a sampled query weighs only the sampled keys at or before it (q and k aligned at their first
            token): key blocks in a query block's future get importance 0.

    Returns:
        (B, H, ceil(Lq / block_q), ceil(Lk / block_k)) float32, rows summing to 1.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, h, lq, d = q.shape
    qi = _sample_index(lq, block_q, sample_stride, q.device)
    ki = _sample_index(k.shape[2], block_k, sample_stride, q.device)
    mq, nq = qi.shape
    mk, nk = ki.shape
    qs = q[:, :, qi.flatten()].view(b, h, mq, nq, d)
    ks_t = k[:, :, ki.flatten()].transpose(-1, -2)
    key_pos = ki.flatten()
    # Bound the (sampled queries x sampled keys) logits held at once to ~64 Mi elements. Smaller slabs measured
    # 1.2x faster on one thread but up to 2x slower on two threads of a loaded machine.
    chunk = max(1, min(mq, 2**26 // max(1, b * h * nq * mk * nk)))
    importance = torch.empty(b, h, mq, mk, dtype=torch.float32, device=q.device)
    for s in range(0, mq, chunk):
        part = qs[:, :, s : s + chunk]
        logits = torch.matmul(part.flatten(2, 3), ks_t)
        if causal:  # every sampled query sees the first key, so each row keeps a finite maximum
            query_pos = qi[s : s + chunk].flatten()
            logits.masked_fill_(key_pos > query_pos.unsqueeze(-1), float("-inf"))
        # The scale is applied after the block maximum (the same value: rounding is monotonic), to a 1/nk as
        # many elements.
        peak = logits.view(b, h, -1, mk, nk).amax(dim=-1).float().mul_(scale)  # (B, H, c * nq, Mk)
        weight = peak.sub_(peak.amax(dim=-1, keepdim=True)).exp_()
        importance[:, :, s : s + chunk] = weight.view(b, h, -1, nq, mk).amax(dim=3)
    return importance / importance.sum(dim=-1, keepdim=True)


@torch.no_grad()
def assign_levels(importance: torch.Tensor, config: PSAConfig, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Levels in {0, 1, 2, 4, 8} for every (query block, key block) pair from its importance.

    Args:
        importance: (B, H, Mq, Mk), rows summing to 1.
        config: `assignment`, `level_bounds`, `min_full_fraction` are read.
        visible: (Mq, Mk) bool, causal: the key blocks each query block can see. Quotas and the least full
            fraction are then shares of a row's visible blocks (the official causal `valid_lengths`), and the
            other blocks get 0.

    Returns:
        (B, H, Mq, Mk) uint8. The most important blocks get level 1, then 2, 4, 8; the rest 0.
    """
    mk = importance.shape[-1]
    if visible is not None:
        return _assign_levels_causal(importance, config, visible)
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    ranks = torch.arange(mk, device=importance.device)
    if config.assignment == "quota":
        rank_level = torch.zeros(mk, dtype=torch.uint8, device=importance.device)
        start = 0
        for i, (factor, bound) in enumerate(zip(POOL_FACTORS, config.level_bounds, strict=True)):
            end = max(start, min(mk, int(mk * bound + 1e-9)), 1 if i == 0 else 0)
            rank_level[start:end] = factor
            start = end
        ranked = rank_level.expand_as(order)
    else:
        energy = torch.cumsum(torch.gather(importance, -1, order), dim=-1)
        energy = energy / energy[..., -1:]
        ranked = torch.zeros_like(order, dtype=torch.uint8)
        start = torch.zeros(order.shape[:-1], dtype=torch.long, device=importance.device)
        for factor, bound in zip(POOL_FACTORS, config.level_bounds, strict=True):
            # The blocks whose cumulative importance stays within the bound, and the one that crosses it.
            within = (energy <= bound + 1e-6).sum(dim=-1)
            end = torch.where(within > 0, within + 1, start).clamp(max=mk)
            end = torch.maximum(end, start)
            if factor == 1:
                end = end.clamp(min=min(mk, int(mk * config.min_full_fraction) + 1))
            span = (ranks >= start.unsqueeze(-1)) & (ranks < end.unsqueeze(-1))
            ranked = torch.where(span, torch.full_like(ranked, factor), ranked)
            start = end
    return torch.empty_like(ranked).scatter_(-1, order, ranked)


def _assign_levels_causal(importance: torch.Tensor, config: PSAConfig, visible: torch.Tensor) -> torch.Tensor:
    """`assign_levels` over each row's visible key blocks (a count per row instead of Mk)."""
    mk = importance.shape[-1]
    # Hidden blocks rank last whatever their importance; ties keep the block order (stable).
    order = torch.argsort(importance.masked_fill(~visible, -1.0), dim=-1, descending=True, stable=True)
    ranks = torch.arange(mk, device=importance.device)
    count = visible.sum(-1, keepdim=True).double()  # (Mq, 1) visible blocks per row
    ranked = torch.zeros(order.shape, dtype=torch.uint8, device=importance.device)
    start = torch.zeros_like(count)
    if config.assignment == "quota":
        for i, (factor, bound) in enumerate(zip(POOL_FACTORS, config.level_bounds, strict=True)):
            end = torch.maximum(start, torch.minimum(count, (count * bound + 1e-9).floor()))
            if i == 0:
                end = end.clamp(min=1)
            span = (ranks >= start) & (ranks < end)
            ranked = torch.where(span, torch.full_like(ranked, factor), ranked)
            start = end
    else:
        sorted_importance = torch.gather(importance.masked_fill(~visible, 0.0), -1, order)
        energy = torch.cumsum(sorted_importance, dim=-1)
        energy = energy / energy[..., -1:].clamp_min(1e-30)
        start = start.long().squeeze(-1).expand(order.shape[:-1])
        count = count.long().squeeze(-1)
        for factor, bound in zip(POOL_FACTORS, config.level_bounds, strict=True):
            within = (energy <= bound + 1e-6).sum(dim=-1)
            end = torch.where(within > 0, within + 1, start)
            end = torch.minimum(torch.maximum(end, start), count)
            if factor == 1:
                least = (count.double() * config.min_full_fraction).long() + 1
                end = torch.maximum(end, torch.minimum(least, count))
            span = (ranks >= start.unsqueeze(-1)) & (ranks < end.unsqueeze(-1))
            ranked = torch.where(span, torch.full_like(ranked, factor), ranked)
            start = end
    levels = torch.empty_like(ranked).scatter_(-1, order, ranked)
    return levels.masked_fill(~visible, 0)


def causal_block_masks(
    lq: int, lk: int, block_q: int, block_k: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which key blocks each query block sees under causal attention (q and k aligned at their first token).

    Returns:
        visible: (Mq, Mk) bool, the key block's first token is at or before the query block's last query;
        whole: (Mq, Mk) bool, its last token is at or before the query block's first query (every query sees
            all of it). Visible but not whole: the blocks on the diagonal.
    """
    first_q = torch.arange(-(-lq // block_q), device=device).unsqueeze(1) * block_q
    last_q = (first_q + block_q).clamp(max=lq) - 1
    first_k = torch.arange(-(-lk // block_k), device=device) * block_k
    last_k = (first_k + block_k).clamp(max=lk) - 1
    return first_k <= last_q, last_k <= first_q


@torch.no_grad()
def similarity_cap(k: torch.Tensor, block_k: int, thresholds: tuple[float, float, float]) -> torch.Tensor:
    """The largest pooling factor each key block's similarity allows (official `calc_k_similarity`).

    A block may be pooled 2x / 4x / 8x where the mean cosine similarity of its keys 1 / 3 / 7 positions
    apart (pairs (0, 1), (2, 3), ...; (0, 3), (4, 7), ...; (0, 7), (8, 15), ...) exceeds the threshold.

    Args:
        k: (B, H, Lk, D).
        block_k: key block size (multiple of 8).
        thresholds: (2x, 4x, 8x) cosine thresholds.

    Returns:
        (B, H, ceil(Lk / block_k)) uint8 in {1, 2, 4, 8}.
    """
    b, h, lk, d = k.shape
    mk = -(-lk // block_k)
    blocks = k[:, :, torch.arange(mk * block_k, device=k.device).clamp(max=lk - 1)].view(b, h, mk, block_k, d).float()
    cap = torch.ones(b, h, mk, dtype=torch.uint8, device=k.device)
    for factor, threshold in zip(POOL_FACTORS[1:], thresholds, strict=True):
        sim = F.cosine_similarity(blocks[..., 0::factor, :], blocks[..., factor - 1 :: factor, :], dim=-1).mean(-1)
        cap = torch.where(sim > threshold, torch.full_like(cap, factor), cap)
    return cap


@torch.no_grad()
def plan_levels(
    q: torch.Tensor,
    k: torch.Tensor,
    config: PSAConfig,
    full_key_from: int | None = None,
    scale: float | None = None,
    causal: bool = False,
    full_query_from: int | None = None,
) -> torch.Tensor:
    """Importance, level assignment and the optional similarity constraint, in one call.

    Args:
        q: (B, H, Lq, D), k: (B, H, Lk, D), already in block order.
        config: the PSA config.
        full_key_from: key blocks holding tokens at or past this index are kept full for every query
            (text tokens placed after the video, as the official code does for CogVideoX).
        scale: logit scale of the importance estimate.
        causal: plan for causal attention (q and k aligned at their first token), as the official Qwen2.5-VL
            example does: importance from past keys only, quotas and energy shared among each query block's
            visible key blocks, the blocks above the diagonal skipped (0), the blocks on it (seen only in part)
            and the first key block (the attention sink) kept full (1).
        full_query_from: query blocks holding queries at or past this index attend to every key block they
            see at full resolution (the official causal code's dense tail of text tokens).

    Returns:
        (B, H, ceil(Lq / block_q), ceil(Lk / block_k)) uint8 levels.
    """
    importance = block_importance(q, k, config.block_q, config.block_k, config.sample_stride, scale, causal)
    visible = whole = None
    if causal:
        visible, whole = causal_block_masks(q.shape[2], k.shape[2], config.block_q, config.block_k, q.device)
    levels = assign_levels(importance, config, visible)
    if config.use_similarity:
        cap = similarity_cap(k, config.block_k, config.similarity_thresholds).unsqueeze(2)
        levels = torch.where(levels > 0, torch.minimum(levels, cap), levels)
    if full_key_from is not None and full_key_from < k.shape[2]:
        levels[..., full_key_from // config.block_k :] = 1
    if full_query_from is not None and full_query_from < q.shape[2]:
        levels[..., full_query_from // config.block_q :, :] = 1
    if causal:
        levels[..., 0] = 1
        levels = levels.masked_fill(visible & ~whole, 1).masked_fill(~visible, 0)
    return levels


# PSA's level (0 skip, pooling factor 1/2/4/8) -> the block-sparse op's (-1 skip, pyramid level log2(factor)).
_OP_LEVEL = (-1, 0, 1, -1, 2, -1, -1, -1, 3)


def pyramid_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Each query block attends to every key block at the level `levels` gives the pair (one softmax).

    PSA is block-sparse attention whose index table lists the kept key blocks and whose level table gives
    each one's pooling (factor 2**p at the op's level p): this translates the levels and calls the op.

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, Dv) values.
        levels: (B, H, ceil(Lq / block_q), ceil(Lk / block_k)) integers: 1 full keys, 2/4/8 keys and values
            average-pooled in groups of that many tokens (their logits raised by log of the group size),
            0 skipped.
        block_q: query tokens per block.
        block_k: key tokens per block.
        scale: logit scale; defaults to D ** -0.5.
        causal: query i sees key j only if j <= i, a pooled group only once its last token is at or before i.

    Returns:
        (B, H, Lq, Dv); zero rows for query blocks that skip every key block.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            "pyramid_sparse_attention expects q (B, H, Lq, D) and k (B, H, Lk, D), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not (isinstance(size, int) and size > 0):
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    expected = (q.shape[0], q.shape[1], -(-q.shape[2] // block_q), -(-k.shape[2] // block_k))
    if tuple(levels.shape) != expected:
        raise ValueError(
            f"pyramid_sparse_attention expects levels (B, H, ceil(Lq / block_q), ceil(Lk / block_k)) = {expected} "
            f"for q {tuple(q.shape)} and k {tuple(k.shape)}, got {tuple(levels.shape)}"
        )
    if levels.dtype.is_floating_point or levels.dtype.is_complex or levels.dtype == torch.bool:
        raise ValueError(f"levels must be an integer tensor, got {levels.dtype}")
    if levels.device.type == "cpu" and levels.numel():  # a value check on CUDA would be a device sync
        bad = ~torch.isin(levels, torch.tensor((0, *POOL_FACTORS), dtype=levels.dtype))
        if bad.any():
            raise ValueError(
                f"levels must take values in {(0, *POOL_FACTORS)}, got {sorted(set(levels[bad].tolist()))[:8]}"
            )
    op_level = torch.tensor(_OP_LEVEL, device=levels.device)[levels.long()]
    # Eagerly, the table is as wide as the longest row of kept blocks and only the levels in use are passed on
    # (without pooled entries the op can take its unpooled paths); compiled (or on meta), every key block.
    width, num_levels = None, len(POOL_FACTORS)
    if not torch.compiler.is_compiling() and op_level.device.type != "meta" and op_level.numel():
        width = max(1, int((op_level >= 0).sum(-1).max()))
        num_levels = max(1, int(op_level.max()) + 1)
    kv_index, kv_level = tables_from_level_map(op_level, width)
    return block_sparse_attention(
        q, k, v, kv_index, kv_level, block_q=block_q, block_k=block_k, scale=scale, num_levels=num_levels,
        causal=causal,
    )  # fmt: skip


def attention_density(levels: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of dense attention's arithmetic the levels cost: mean of 1/level over pairs, 0 for skipped.

    Args:
        levels: (..., Mq, Mk).
        visible: (Mq, Mk) bool, causal: the mean runs over the pairs dense causal attention computes (the official
            causal density, by blocks).
    """
    lv = levels.float()
    cost = torch.where(lv > 0, 1.0 / lv.clamp_min(1), torch.zeros_like(lv))
    if visible is None:
        return cost.mean()
    return (cost * visible).sum() / (visible.sum() * (cost.numel() // visible.numel())).clamp_min(1)


# ----------------------------------------------------------------------------------------------- modules


class PyramidSparseAttention(nn.Module):
    """PSA on heads: reorder video tokens, plan levels, run the pyramid sparse op, restore the order.

    Parameter-free; one instance can serve every layer of a model. `last_density` holds the fraction of
    dense attention arithmetic the last call cost (a 0-dim tensor; 1.0 for a dense call).

    Args:
        config: the PSA config; `PSAConfig()` (official defaults) when None.
    """

    def __init__(self, config: PSAConfig | None = None):
        super().__init__()
        if config is not None and not isinstance(config, PSAConfig):
            raise ValueError(f"config must be a PSAConfig, got {type(config).__name__}")
        self.config = config or PSAConfig()
        self.last_density: torch.Tensor | None = None

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"block=({c.block_q}, {c.block_k}), assignment={c.assignment}, bounds={c.level_bounds}, reorder={c.reorder}"
        )

    def _order(self, grid, num_text_tokens: int, length: int, device) -> torch.Tensor | None:
        if grid is None or self.config.reorder == "none":
            if num_text_tokens == 0:
                return None
            video = torch.arange(length - num_text_tokens)
        else:
            video = video_token_order(grid, self.config.reorder, self.config.tile_size)
        # The text goes after the reordered video, as in the official code, so that its key blocks sit
        # together at the end and can be kept full.
        order = torch.cat([video + num_text_tokens, torch.arange(num_text_tokens)])
        return order.to(device)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grid: tuple[int, int, int] | None = None,
        num_text_tokens: int = 0,
        step: int | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Self-attention of a video token sequence (optionally preceded by text tokens).

        Args:
            q, k: (B, H, L, D); v: (B, H, L, Dv). L = num_text_tokens + T*H*W when `grid` is given.
            grid: (T, H, W) of the video tokens, in row-major order; None leaves the order as it is.
            num_text_tokens: text tokens at the start of the sequence (CogVideoX's joint attention); their
                key blocks are kept at full resolution for every query.
            step: the denoising step; steps below `config.warmup_steps` run dense attention.
            scale: logit scale; defaults to D ** -0.5.

        Returns:
            (B, H, L, Dv).
        """
        if q.dim() != 4 or q.shape[:3] != k.shape[:3] or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"PyramidSparseAttention expects q, k (B, H, L, D) and v (B, H, L, Dv) of one length; "
                f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        length = q.shape[2]
        if not 0 <= num_text_tokens <= length:
            raise ValueError(f"num_text_tokens must lie in [0, {length}], got {num_text_tokens}")
        if grid is not None and math.prod(grid) != length - num_text_tokens:
            raise ValueError(
                f"grid {tuple(grid)} holds {math.prod(grid)} tokens, but the sequence has "
                f"{length - num_text_tokens} video tokens ({length} minus {num_text_tokens} text)"
            )
        if step is not None and step < self.config.warmup_steps:
            self.last_density = q.new_ones((), dtype=torch.float32)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        order = self._order(grid, num_text_tokens, length, q.device)
        if order is not None:
            q, k, v = (x.index_select(2, order) for x in (q, k, v))
        full_from = length - num_text_tokens if num_text_tokens else None
        levels = plan_levels(q, k, self.config, full_key_from=full_from, scale=scale)
        self.last_density = attention_density(levels)
        out = pyramid_sparse_attention(q, k, v, levels, self.config.block_q, self.config.block_k, scale)
        if order is not None:
            out = out.index_select(2, torch.argsort(order))
        return out


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x0, x1), (x2, x3), ... by the angles whose cos/sin are given.

    Args:
        x: (..., L, D).
        cos, sin: (L, D) with each angle repeated for the two channels of its pair (diffusers' Wan and
            `get_1d_rotary_pos_embed(..., use_real=True, repeat_interleave_real=True)` layout).

    Returns:
        (..., L, D) in x's dtype; the rotation runs in the wider of x's and cos's dtypes, as diffusers' Wan does.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class VideoSelfAttention(nn.Module):
    """Multi-head self-attention on channels-last video, dense (SDPA) or pyramid sparse.

    q/k/v projection, per-head RMSNorm on queries and keys (optional), optional rotary positions,
    attention, output projection. Dense and PSA share every weight: `attention` only picks the op.

    Args:
        dim: channels C.
        num_heads: heads; `dim` must be divisible by it.
        qkv_bias: bias of the q/k/v projection.
        qk_norm: RMSNorm on each head's queries and keys.
        attention: "dense" or "psa".
        psa_config: PSA config (official defaults when None).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = True,
        attention: str = "dense",
        psa_config: PSAConfig | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6, **dd) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.psa = PyramidSparseAttention(psa_config)
        self.attention = "dense"
        self.set_attention(attention)

    def set_attention(self, attention: str) -> None:
        """Switch between "dense" and "psa" (weights untouched)."""
        if attention not in ("dense", "psa"):
            raise ValueError(f"attention must be 'dense' or 'psa', got {attention!r}")
        self.attention = attention

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, step: int | None = None
    ) -> torch.Tensor:
        """Args:
            x: (B, T, H, W, C).
            rope: (cos, sin), each (T*H*W, head_dim), rotary angles of the row-major tokens.
            step: denoising step, for PSA's dense warm-up.

        Returns:
            (B, T, H, W, C).
        """
        if x.dim() != 5 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"VideoSelfAttention expects (B, T, H, W, {self.qkv.in_features}), got {tuple(x.shape)}")
        b, t, h, w, c = x.shape
        q, k, v = self.qkv(x.reshape(b, t * h * w, c)).view(b, -1, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary_interleaved(q, *rope), apply_rotary_interleaved(k, *rope)
        if self.attention == "psa":
            out = self.psa(q, k, v, grid=(t, h, w), step=step)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, h, w, c))
