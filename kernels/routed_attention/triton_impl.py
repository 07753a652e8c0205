"""Routed attention on the Triton block-sparse attention kernels.

Routed attention is block-sparse attention whose blocks are the regions: the query regions are the
query blocks (`block_q = Lq`), the key regions the key blocks (`block_k = Lk`), and the routing index is
the index table, shared by the heads. Flattening the region axes is a view for the layouts BRA produces
(regions and tokens adjacent in memory), so nothing is copied on the way in or out.
"""

from __future__ import annotations

import torch

from ..block_sparse_attention.triton_impl import block_sparse_attention_triton

__all__ = ["routed_attention_triton"]


def routed_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """Routed attention with Triton kernels (differentiable in q, k, v).

    Inputs are assumed checked (see `kernels.routed_attention.routed_attention`); indices are not
    bounds-checked here.

    Args:
        q: (B, H, R, Lq, D) queries grouped by region; fp32, fp16 or bf16.
        k: (B, H, Rk, Lk, D) keys grouped by region.
        v: (B, H, Rk, Lk, Dv) values grouped by region.
        region_index: (B, R, topk) int32/int64 key regions per query region, shared across heads;
            repeats count twice, topk may be 0 (zero output).
        scale: factor applied to the logits q·k.

    Returns:
        (B, H, R, Lq, Dv) in the dtype of q; accumulation is in fp32.
    """
    b, h, r, lq, d = q.shape
    rk, lk, dv = k.shape[2], k.shape[3], v.shape[-1]
    if lq == 0 or lk == 0:  # no query, or regions without tokens: nothing to attend to
        return q.new_zeros(b, h, r, lq, dv)
    out = block_sparse_attention_triton(
        q.reshape(b, h, r * lq, d),
        k.reshape(b, h, rk * lk, d),
        v.reshape(b, h, rk * lk, dv),
        region_index.unsqueeze(1),
        None,
        None,
        block_q=lq,
        block_k=lk,
        scale=scale,
    )
    return out.view(b, h, r, lq, dv)
