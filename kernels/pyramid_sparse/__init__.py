"""Pyramid sparse attention: per (query block, key block) pair, full keys, 2x/4x/8x pooled keys, or none.

The op behind Pyramid Sparse Attention (PSA, arXiv:2512.04025). `pyramid_sparse_attention` checks its
inputs once and picks the backend: the PyTorch reference, or on CUDA tensors (or `ZOO_KERNELS=triton`) the
block-sparse Triton kernel, since PSA is block-sparse attention whose index table lists the kept key blocks
and whose level table gives each one's pooling (factor 2**p at level p).
"""

from __future__ import annotations

import torch

from .._backend import select_backend
from ..block_sparse_attention import block_sparse_attention, tables_from_level_map
from .reference import (
    LEVELS,
    POOL_FACTORS,
    default_query_block_chunk,
    pooled_pyramid,
    pyramid_sparse_attention_masked,
    pyramid_sparse_attention_reference,
)

__all__ = [
    "LEVELS",
    "POOL_FACTORS",
    "default_query_block_chunk",
    "pooled_pyramid",
    "pyramid_sparse_attention",
    "pyramid_sparse_attention_masked",
    "pyramid_sparse_attention_reference",
]


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, block_q: int, block_k: int
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "pyramid_sparse_attention expects q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"pyramid_sparse_attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (isinstance(block_q, int) and block_q > 0):
        raise ValueError(f"block_q must be a positive int, got {block_q!r}")
    if not (isinstance(block_k, int) and block_k > 0 and block_k % max(POOL_FACTORS) == 0):
        raise ValueError(f"block_k must be a positive multiple of {max(POOL_FACTORS)}, got {block_k!r}")
    expected = (q.shape[0], q.shape[1], -(-q.shape[2] // block_q), -(-k.shape[2] // block_k))
    if tuple(levels.shape) != expected:
        raise ValueError(
            f"pyramid_sparse_attention expects levels (B, H, ceil(Lq / block_q), ceil(Lk / block_k)) = {expected}, "
            f"got {tuple(levels.shape)}"
        )
    if levels.dtype.is_floating_point or levels.dtype.is_complex or levels.dtype == torch.bool:
        raise ValueError(f"levels must be an integer tensor, got {levels.dtype}")
    # A value check needs a device sync on CUDA (and values on meta): check on CPU.
    if levels.device.type == "cpu" and levels.numel():
        bad = ~torch.isin(levels, torch.tensor(LEVELS, dtype=levels.dtype))
        if bad.any():
            raise ValueError(f"levels must take values in {LEVELS}, got {sorted(set(levels[bad].tolist()))[:8]}")


def pyramid_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Each query block attends to every key block at the level `levels` gives the pair (one softmax).

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, Dv) values.
        levels: (B, H, ceil(Lq / block_q), ceil(Lk / block_k)) integers: 1 full keys, 2/4/8 keys and values
            average-pooled in groups of that many tokens (their logits raised by log of the group size),
            0 skipped.
        block_q: query tokens per block.
        block_k: key tokens per block, a multiple of 8.
        scale: logit scale; defaults to D ** -0.5.

    Returns:
        (B, H, Lq, Dv); zero rows for query blocks that skip every key block.
    """
    _check_inputs(q, k, v, levels, block_q, block_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if select_backend("pyramid_sparse_attention", q, k, v) == "triton":
        kv_index, kv_level = tables_from_level_map(_LEVEL_OF_FACTOR.to(levels.device)[levels.long()])
        return block_sparse_attention(
            q, k, v, kv_index, kv_level, block_q=block_q, block_k=block_k, scale=scale, num_levels=len(POOL_FACTORS)
        )
    return pyramid_sparse_attention_reference(q, k, v, levels, block_q, block_k, scale)


# PSA's level (0 skip, pooling factor 1/2/4/8) -> the block-sparse op's (-1 skip, pyramid level log2(factor)).
_LEVEL_OF_FACTOR = torch.tensor([-1, 0, 1, -1, 2, -1, -1, -1, 3])
