"""PyTorch reference of routed attention: the definition of correct for every backend.

Routed attention is what Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023) computes
after routing: every query region attends to the tokens of the `topk` key/value regions that
its row of `region_index` names, with one softmax over all of them.

The straightforward implementation (the official one) gathers the routed key/value regions of
every query region into one tensor: `topk` copies of K and V, plus the attention matrix over all of
them. This reference computes the same thing in slabs of query regions, so that the gathered
keys/values and the logits of one slab at a time are alive, no more than one copy of K by default.
The arithmetic per slab is the plain one (matmul, softmax, matmul), so it costs the same time.
"""

from __future__ import annotations

import torch

__all__ = ["routed_attention_reference", "routed_attention_gather", "default_region_chunk"]


# Below this many gathered key elements per slab (16 MiB in fp32) slabbing saves little and costs launches.
MIN_SLAB_ELEMENTS = 2**22


def default_region_chunk(k: torch.Tensor, num_q_regions: int, topk: int) -> int:
    """Query regions per slab: one slab's gathered keys are no larger than K itself (or 16 MiB in fp32)."""
    b, h, _, lk, d = k.shape
    per_region = max(1, b * h * topk * lk * d)
    budget = max(k.numel(), MIN_SLAB_ELEMENTS)
    return max(1, min(num_q_regions, budget // per_region))


def _gather_regions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, H, Rk, L, D), index: (B, R, c) -> (B, H, R, c * L, D)."""
    b, h, _, length, dim = x.shape
    r, c = index.shape[1], index.shape[2]
    flat = index.reshape(b, 1, r * c, 1, 1).expand(b, h, r * c, length, dim)
    return torch.gather(x, 2, flat).reshape(b, h, r, c * length, dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, scale: float) -> torch.Tensor:
    ks, vs = _gather_regions(k, index), _gather_regions(v, index)
    attn = torch.matmul(q * scale, ks.transpose(-1, -2)).softmax(dim=-1)
    return torch.matmul(attn, vs)


def routed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    region_index: torch.Tensor,
    scale: float,
    region_chunk: int | None = None,
) -> torch.Tensor:
    """Attention of each query region to the key/value regions it is routed to.

    Args:
        q: (B, H, R, Lq, D) queries, grouped by region.
        k: (B, H, Rk, Lk, D) keys, grouped by region.
        v: (B, H, Rk, Lk, Dv) values, grouped by region.
        region_index: (B, R, topk) integer indices into the Rk key regions, shared by all heads.
            Repeated entries count twice, as in the official gather. `topk` may be 0.
        scale: factor applied to the logits q·k.
        region_chunk: query regions per slab in inference; `None` picks the largest slab whose gathered
            keys are no larger than `k` (see `default_region_chunk`); `R` or more computes all at once.
            Under autograd everything is computed at once: the saved activations dominate memory there,
            and per-slab gather backward would allocate a full-size gradient of K and V per slab.

    Returns:
        (B, H, R, Lq, Dv); all-zero rows for an empty index list.
    """
    b, h, r, lq, _ = q.shape
    topk = region_index.shape[-1]
    if topk == 0:
        return q.new_zeros(b, h, r, lq, v.shape[-1])
    chunk = region_chunk or default_region_chunk(k, r, topk)
    if chunk >= r or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return _attend(q, k, v, region_index, scale)
    out = q.new_empty(b, h, r, lq, v.shape[-1])  # inference: write slabs in place, no concatenation copy
    for s in range(0, r, chunk):
        out[:, :, s : s + chunk] = _attend(q[:, :, s : s + chunk], k, v, region_index[:, s : s + chunk], scale)
    return out


def routed_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """The straightforward form, as in the official BiFormer code: gather `topk` copies of K/V for every
    query region at once, materialize the logits, softmax, multiply. The baseline of benchmarks and tests."""
    if region_index.shape[-1] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    return _attend(q, k, v, region_index, scale)
