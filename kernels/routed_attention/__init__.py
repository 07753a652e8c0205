"""Routed attention: query regions attend to the key/value regions a routing index names.

The op behind Bi-Level Routing Attention. `routed_attention` checks its inputs once, then runs
the Triton kernel on CUDA tensors and the PyTorch reference elsewhere (`ZOO_KERNELS` forces one).
On the Triton path it is block-sparse attention (`kernels.block_sparse_attention`) with one block
per region and the routing index as the index table, shared by the heads.
"""

from __future__ import annotations

import torch

from .._backend import select_backend
from .reference import default_region_chunk, routed_attention_gather, routed_attention_reference

__all__ = ["routed_attention", "routed_attention_reference", "routed_attention_gather", "default_region_chunk"]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor) -> None:
    if q.dim() != 5 or k.dim() != 5 or v.dim() != 5:
        raise ValueError(
            "routed_attention expects q (B, H, R, Lq, D), k (B, H, Rk, Lk, D), v (B, H, Rk, Lk, Dv); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:4] != v.shape[:4] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"routed_attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    expected = (q.shape[0], q.shape[2])
    if region_index.dim() != 3 or tuple(region_index.shape[:2]) != expected:
        raise ValueError(
            f"routed_attention expects region_index (B, R, topk) with (B, R) = {expected}, "
            f"got {tuple(region_index.shape)}"
        )
    if region_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"region_index must be int32 or int64, got {region_index.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # A bounds check needs a device sync on CUDA (and values on meta, and a graph break when compiled); the
    # kernel masks nothing: check on CPU, eagerly.
    if region_index.device.type == "cpu" and not torch.compiler.is_compiling() and region_index.numel():
        lo, hi = int(region_index.min()), int(region_index.max())
        if lo < 0 or hi >= k.shape[2]:
            raise ValueError(f"region_index values must lie in [0, {k.shape[2]}), got range [{lo}, {hi}]")


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    region_index: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Each query region attends to the tokens of its routed key/value regions (one softmax).

    Args:
        q: (B, H, R, Lq, D) queries grouped by region.
        k: (B, H, Rk, Lk, D) keys grouped by region.
        v: (B, H, Rk, Lk, Dv) values grouped by region.
        region_index: (B, R, topk) int32/int64 indices of key regions, shared across heads.
        scale: logit scale; defaults to D ** -0.5.

    Returns:
        (B, H, R, Lq, Dv).
    """
    _check_inputs(q, k, v, region_index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if select_backend("routed_attention", q, k, v) == "triton":
        from .triton_impl import routed_attention_triton

        return routed_attention_triton(q, k, v, region_index, scale)
    return routed_attention_reference(q, k, v, region_index.long(), scale)
