"""PyTorch reference of routed attention: the definition of correct for every backend.

Routed attention is what Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023) computes
after routing: every query region attends to the tokens of the `topk` key/value regions that
its row of `region_index` names, with one softmax over all of them.

The straightforward implementation (the official one) gathers the routed key/value regions of
every query region into one tensor, `topk` copies of K and V. This reference instead walks the
index list in chunks and merges the partial results with an online softmax, so at most one
chunk of gathered keys/values lives at a time; with one chunk it reduces to a single fused
`scaled_dot_product_attention` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["routed_attention_reference", "routed_attention_gather", "default_kv_chunk"]


def default_kv_chunk(num_q_regions: int, num_kv_regions: int, topk: int) -> int:
    """Index entries per chunk so that one gathered chunk is no larger than K itself."""
    return max(1, min(topk, num_kv_regions // max(num_q_regions, 1)))


def _gather_regions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, H, Rk, L, D), index: (B, R, c) -> (B, H, R, c * L, D)."""
    b, h, _, length, dim = x.shape
    r, c = index.shape[1], index.shape[2]
    flat = index.reshape(b, 1, r * c, 1, 1).expand(b, h, r * c, length, dim)
    return torch.gather(x, 2, flat).reshape(b, h, r, c * length, dim)


def routed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    region_index: torch.Tensor,
    scale: float,
    kv_chunk: int | None = None,
) -> torch.Tensor:
    """Attention of each query region to the key/value regions it is routed to.

    Args:
        q: (B, H, R, Lq, D) queries, grouped by region.
        k: (B, H, Rk, Lk, D) keys, grouped by region.
        v: (B, H, Rk, Lk, Dv) values, grouped by region.
        region_index: (B, R, topk) integer indices into the Rk key regions, shared by all heads.
            Repeated entries count twice, as in the official gather. `topk` may be 0.
        scale: factor applied to the logits q·k.
        kv_chunk: index entries processed at once; `None` picks the largest chunk whose gathered
            keys are no larger than `k` (see `default_kv_chunk`). `topk` gathers everything at once.

    Returns:
        (B, H, R, Lq, Dv); all-zero rows for an empty index list.
    """
    b, h, r, lq, _ = q.shape
    topk = region_index.shape[-1]
    if topk == 0:
        return q.new_zeros(b, h, r, lq, v.shape[-1])
    chunk = kv_chunk or default_kv_chunk(r, k.shape[2], topk)
    if chunk >= topk:
        ks, vs = _gather_regions(k, region_index), _gather_regions(v, region_index)
        return F.scaled_dot_product_attention(q, ks, vs, scale=scale)

    out = lse = None
    for start in range(0, topk, chunk):
        index = region_index[:, :, start : start + chunk]
        ks, vs = _gather_regions(k, index), _gather_regions(v, index)
        logits = torch.matmul(q, ks.transpose(-1, -2)) * scale
        chunk_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        chunk_out = torch.matmul(torch.exp(logits - chunk_lse), vs)
        if out is None:
            out, lse = chunk_out, chunk_lse
            continue
        new_lse = torch.logaddexp(lse, chunk_lse)
        out = out * torch.exp(lse - new_lse) + chunk_out * torch.exp(chunk_lse - new_lse)
        lse = new_lse
    return out


def routed_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """The straightforward form, as in the official BiFormer code: gather `topk` copies of K/V,
    materialize the logits, softmax, multiply. Kept as the baseline for benchmarks and tests."""
    if region_index.shape[-1] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    ks, vs = _gather_regions(k, region_index), _gather_regions(v, region_index)
    attn = torch.matmul(q * scale, ks.transpose(-1, -2)).softmax(dim=-1)
    return torch.matmul(attn, vs)
