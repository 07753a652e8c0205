"""PyTorch reference of pyramid sparse attention: the definition of correct for every backend.

Pyramid Sparse Attention (PSA; Li et al., "PSA: Pyramid Sparse Attention for Efficient Video Understanding
and Generation", arXiv:2512.04025) splits queries into blocks of `block_q` tokens and keys/values into
blocks of `block_k` tokens. Every (query block, key block) pair carries a level:

- 1: the key block's tokens as they are;
- 2, 4, 8: the key block average-pooled in groups of that many consecutive tokens (keys and values alike);
- 0: the key block is skipped.

All the keys a query block sees, at whatever level, share one softmax. A pooled key stands for the
tokens it averages, so `log(group size)` is added to its logit: exp(q·k̄ + log f) = f·exp(q·k̄), the
weight the f tokens would get if they all equalled their mean. With that, attending to a pooled block
is exactly attending to the block with every key and value replaced by its group's mean.

A last key block shorter than `block_k` pools only its real tokens: a group's mean and its logit bias
use the number of real tokens in it, and a group with none is masked. (The official kernel pads the
keys by repeating the last one instead; the two agree wherever the length divides the block.)

Two forms, equal to float precision:

- `pyramid_sparse_attention_reference` gathers, per query block, the kept key blocks at their level
  and attends to them: its arithmetic grows with the kept fraction, not with the sequence squared.
- `pyramid_sparse_attention_masked` attends from every query to every key at every level and masks
  what the levels do not select: the plainest statement of the op, for tests.
"""

from __future__ import annotations

import torch

__all__ = [
    "LEVELS",
    "POOL_FACTORS",
    "pooled_pyramid",
    "pyramid_sparse_attention_masked",
    "pyramid_sparse_attention_reference",
    "default_query_block_chunk",
]

POOL_FACTORS = (1, 2, 4, 8)
LEVELS = (0, *POOL_FACTORS)

# Below this many gathered key elements per slab (16 MiB in fp32) slabbing saves little and costs launches.
MIN_SLAB_ELEMENTS = 2**22


def pooled_pyramid(x: torch.Tensor, block_k: int, length: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool each key block of x in groups of `factor` consecutive tokens.

    Args:
        x: (B, H, Mk * block_k, D) keys or values, zero beyond `length`.
        block_k: tokens per key block (a multiple of `factor`).
        length: number of real tokens.
        factor: group size.

    Returns:
        pooled: (B, H, Mk, block_k // factor, D) group means over the real tokens of each group.
        log_count: (Mk, block_k // factor) log of the real tokens per group, -inf for a group with none.
    """
    b, h, padded, d = x.shape
    mk, groups = padded // block_k, block_k // factor
    count = (length - torch.arange(0, padded, factor, device=x.device)).clamp(0, factor).view(mk, groups)
    if factor == 1:
        pooled = x.view(b, h, mk, groups, d)
    else:
        pooled = x.view(b, h, mk, groups, factor, d).sum(dim=4) / count.clamp_min(1).unsqueeze(-1).to(x.dtype)
    log_count = count.to(x.dtype).log()  # log(0) = -inf masks a group without real tokens
    return pooled, log_count


def _pad_tokens(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[2] % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def _select_blocks(levels: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Key-block indices at `factor` for every query block, padded to the longest list.

    Returns (index (B, H, Mq, c), valid (B, H, Mq, c)) or None when no pair has this level.
    """
    hit = levels == factor
    count = hit.sum(dim=-1)
    c = int(count.max()) if count.numel() else 0
    if c == 0:
        return None
    # A stable sort of "not hit" puts the hit blocks first, in increasing block order.
    index = torch.argsort((~hit).to(torch.uint8), dim=-1, stable=True)[..., :c]
    valid = torch.arange(c, device=levels.device) < count.unsqueeze(-1)
    return index, valid


def _gather_blocks(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, H, Mk, n, D), index: (B, H, Mq, c) -> (B, H, Mq, c * n, D)."""
    b, h, _, n, d = x.shape
    mq, c = index.shape[2], index.shape[3]
    rows = torch.arange(b * h, device=x.device).view(b * h, 1, 1)
    picked = x.reshape(b * h, -1, n, d)[rows, index.reshape(b * h, mq, c)]
    return picked.view(b, h, mq, c * n, d)


def _softmax_attend(logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(logits) @ v, with rows whose logits are all -inf giving zeros instead of NaN.

    The softmax runs in at least float32 (as fused attention kernels accumulate), the product in v's dtype.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    empty = logits.amax(dim=-1, keepdim=True) == float("-inf")
    if not empty.any():
        return torch.matmul(torch.softmax(logits, dim=-1).to(v.dtype), v)
    # Give empty rows finite logits (so that no NaN reaches the backward pass), then zero their output.
    weights = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).to(v.dtype)
    return torch.matmul(weights, v).masked_fill(empty, 0.0)


def default_query_block_chunk(k: torch.Tensor, num_q_blocks: int, kept_tokens: int) -> int:
    """Query blocks per slab: one slab's gathered keys are no larger than K itself (or 16 MiB in fp32)."""
    b, h, _, d = k.shape
    per_block = max(1, b * h * kept_tokens * d)
    return max(1, min(num_q_blocks, max(k.numel(), MIN_SLAB_ELEMENTS) // per_block))


def _attend_blocks(
    q_blocks: torch.Tensor,
    pyramid: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    selections: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]],
    scale: float,
) -> torch.Tensor:
    keys, values, biases = [], [], []
    for level, (index, valid) in selections:
        pk, pv, log_count = pyramid[POOL_FACTORS.index(level)]
        keys.append(_gather_blocks(pk, index))
        values.append(_gather_blocks(pv, index))
        bias = log_count[index]  # (B, H, Mq, c, n)
        bias = bias.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        biases.append(bias.flatten(3))
    k_sel, v_sel, bias = torch.cat(keys, dim=3), torch.cat(values, dim=3), torch.cat(biases, dim=3)
    logits = torch.matmul(q_blocks * scale, k_sel.transpose(-1, -2)) + bias.unsqueeze(-2)
    return _softmax_attend(logits, v_sel)


def pyramid_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    query_block_chunk: int | None = None,
) -> torch.Tensor:
    """Pyramid sparse attention, computed on the kept key blocks only.

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, Dv) values.
        levels: (B, H, ceil(Lq / block_q), ceil(Lk / block_k)) integers in {0, 1, 2, 4, 8}.
        block_q: query tokens per block.
        block_k: key tokens per block, a multiple of 8.
        scale: factor applied to the logits q·k.
        query_block_chunk: query blocks per slab in inference; `None` picks the largest slab whose gathered
            keys are no larger than `k`. Under autograd all blocks are computed at once (the saved
            activations dominate memory there).

    Returns:
        (B, H, Lq, Dv); zero rows for query blocks whose levels are all 0.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    k_pad, v_pad = _pad_tokens(k, block_k), _pad_tokens(v, block_k)
    pyramid = []
    for f in POOL_FACTORS:
        pk, log_count = pooled_pyramid(k_pad, block_k, lk, f)
        pv, _ = pooled_pyramid(v_pad, block_k, lk, f)
        pyramid.append((pk, pv, log_count))
    selections = [(f, sel) for f in POOL_FACTORS if (sel := _select_blocks(levels, f)) is not None]
    mq = levels.shape[2]
    q_blocks = _pad_tokens(q, block_q).view(b, h, mq, block_q, q.shape[-1])
    if not selections:
        return q.new_zeros(b, h, lq, v.shape[-1])
    kept = sum(sel[0].shape[-1] * (block_k // f) for f, sel in selections)
    chunk = query_block_chunk or default_query_block_chunk(k, mq, kept)
    if chunk >= mq or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        out = _attend_blocks(q_blocks, pyramid, selections, scale)
    else:
        out = q.new_empty(b, h, mq, block_q, v.shape[-1])
        for s in range(0, mq, chunk):
            part = [(f, (index[:, :, s : s + chunk], valid[:, :, s : s + chunk])) for f, (index, valid) in selections]
            out[:, :, s : s + chunk] = _attend_blocks(q_blocks[:, :, s : s + chunk], pyramid, part, scale)
    return out.reshape(b, h, mq * block_q, -1)[:, :, :lq]


def pyramid_sparse_attention_masked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
) -> torch.Tensor:
    """The same op as `pyramid_sparse_attention_reference`, by masking the logits of every query against
    every key at every level (memory grows with Lq * Lk). Arguments and result as there."""
    lq, lk = q.shape[2], k.shape[2]
    k_pad, v_pad = _pad_tokens(k, block_k), _pad_tokens(v, block_k)
    mk = k_pad.shape[2] // block_k
    keys, values, biases, owner, factor = [], [], [], [], []
    for f in POOL_FACTORS:
        pk, log_count = pooled_pyramid(k_pad, block_k, lk, f)
        pv, _ = pooled_pyramid(v_pad, block_k, lk, f)
        keys.append(pk.flatten(2, 3))
        values.append(pv.flatten(2, 3))
        biases.append(log_count.flatten())
        owner.append(torch.arange(mk, device=q.device).repeat_interleave(block_k // f))
        factor.append(torch.full((mk * block_k // f,), f, device=q.device))
    owner, factor = torch.cat(owner), torch.cat(factor)
    selected = levels.long()[..., owner] == factor  # (B, H, Mq, pooled tokens)
    selected = selected.repeat_interleave(block_q, dim=2)[:, :, :lq]
    logits = torch.matmul(q * scale, torch.cat(keys, dim=2).transpose(-1, -2)) + torch.cat(biases)
    logits = logits.masked_fill(~selected, float("-inf"))
    return _softmax_attend(logits, torch.cat(values, dim=2))
