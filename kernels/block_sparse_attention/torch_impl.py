"""The fast PyTorch backends of block-sparse attention: FlexAttention block masks, and slabs of fused SDPA.

Both lay the levels in use end to end (the key pyramid: K, then K pooled in groups of 2, 4, ... per key
block) and attend from every query block to the pyramid slots its row lists.

- `block_sparse_attention_flex` hands the pyramid to `torch.nn.attention.flex_attention` with a block
  mask built from the tables: FlexAttention's block size is the key block, so a level-0 entry is one whole
  mask block and pooled entries share blocks (2**p key blocks each) under a mask function. The log of the
  group size, repeats and the relative-position bias are score modifiers. Outside a compiled region it is
  compiled once per shape (`torch.compile(flex_attention, dynamic=False)`); inside one it is traced.
  torch 2.14 has FlexAttention forward and backward on CUDA, forward only on the CPU.
- `block_sparse_attention_gather` gathers the slots every query block lists (one indexing per tensor) and
  runs the fused `scaled_dot_product_attention` on them with an additive mask; in inference it works in
  slabs of query blocks so that the gathered copies stay no larger than K. It runs everywhere and has a
  backward everywhere: the CPU training path.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

__all__ = ["block_sparse_attention_flex", "block_sparse_attention_gather", "flex_available"]

# Below this many gathered key elements per slab (16 MiB in fp32) slabbing saves little and costs launches.
MIN_SLAB_ELEMENTS = 2**22
# FlexAttention recompiles per shape; a model calls it at a few shapes per resolution (BiFormer: 3 stages).
_FLEX_RECOMPILE_LIMIT = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 2 of x to `length`."""
    pad = length - x.shape[2]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _group_counts(length: int, block_k: int, level: int, device: torch.device) -> torch.Tensor:
    """Real tokens in each pooling group: (ceil(length / block_k), ceil(block_k / 2**level)) int64."""
    f, blocks = 1 << level, _cdiv(length, block_k)
    start = torch.arange(blocks, device=device).unsqueeze(1) * block_k
    offset = torch.arange(_cdiv(block_k, f), device=device) * f
    return ((length - start).clamp(max=block_k) - offset).clamp(0, f)


def _pool(x: torch.Tensor, block_k: int, level: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / block_k) * ceil(block_k / 2**level), D): group means of real tokens."""
    b, h, length, d = x.shape
    blocks, f = _cdiv(length, block_k), 1 << level
    groups = _cdiv(block_k, f)
    x = _pad_tokens(x, blocks * block_k).view(b, h, blocks, block_k, d)
    if level == 0:
        return x.flatten(2, 3)
    x = F.pad(x, (0, 0, 0, groups * f - block_k)).view(b, h, blocks, groups, f, d).sum(dim=4)
    count = _group_counts(length, block_k, level, x.device).clamp_min(1)
    return (x / count.unsqueeze(-1).to(x.dtype)).flatten(2, 3)


def _pool_bias(bias: torch.Tensor, level: int) -> torch.Tensor:
    """(Hb, block_q, block_k) -> (Hb, block_q, ceil(block_k / 2**level)), group means of its columns."""
    if level == 0:
        return bias
    hb, bq, bk = bias.shape
    f = 1 << level
    groups = _cdiv(bk, f)
    count = (bk - torch.arange(groups, device=bias.device) * f).clamp(max=f)
    return F.pad(bias, (0, groups * f - bk)).view(hb, bq, groups, f).sum(-1) / count.to(bias.dtype)


def _expand_tables(q: torch.Tensor, kv_index: torch.Tensor, kv_level: torch.Tensor | None):
    shape = (*q.shape[:2], *kv_index.shape[2:])
    index = kv_index.long().expand(shape)
    level = torch.zeros_like(index) if kv_level is None else kv_level.long().expand(shape)
    return index, level


# ----------------------------------------------------------------------------------------------------------
# Gather + fused SDPA
# ----------------------------------------------------------------------------------------------------------


def _select_level(index: torch.Tensor, level: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The entries at level p moved to the front of every row: (blocks (B, H, Mq, c), valid (B, H, Mq, c))."""
    hit = (index >= 0) & (level == p)
    count = hit.sum(dim=-1)
    # Eagerly, c is the longest list at this level; a compiled graph (or a meta tensor, which has no values)
    # keeps every slot: no data-dependent shape.
    if torch.compiler.is_compiling() or index.device.type == "meta":
        c = index.shape[-1]
    else:
        c = int(count.max()) if count.numel() else 0
    if c == 0:
        return None
    order = torch.argsort((~hit).to(torch.uint8), dim=-1, stable=True)[..., :c]
    return index.gather(-1, order).clamp_min(0), torch.arange(c, device=index.device) < count.unsqueeze(-1)


def _gather_slots(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, D), slots: (B, H, Mq, W) -> (B, H, Mq, W, D)."""
    b, h, _, d = x.shape
    rows = torch.arange(b * h, device=x.device).view(b * h, 1, 1)
    return x.reshape(b * h, -1, d)[rows, slots.reshape(b * h, *slots.shape[2:])].view(*slots.shape, d)


def _attend_slots(q_blocks: torch.Tensor, pyramid: tuple, slots: torch.Tensor, valid: torch.Tensor, scale: float):
    """Attention of query blocks (B, H, m, bq, D) to the pyramid slots (B, H, m, W) they list."""
    k_all, v_all, log_count, rel_bias = pyramid
    mask = log_count[slots].masked_fill(~valid, float("-inf")).unsqueeze(-2)  # (B, H, m, 1, W)
    if rel_bias is not None:
        mask = mask + rel_bias[None, :, None]  # (B, H, m, bq, W)
    b, h, m, bq, _ = q_blocks.shape
    mask = mask.flatten(1, 2)
    # A query row with every logit at -inf gives zeros where SDPA would give NaN.
    live = (mask > float("-inf")).any(dim=-1, keepdim=True)
    mask = torch.where(live, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    # 4-D views keep SDPA on its fused CPU kernel: the probabilities are never held whole.
    out = F.scaled_dot_product_attention(
        q_blocks.reshape(b, h * m, bq, -1),
        _gather_slots(k_all, slots).flatten(1, 2),
        _gather_slots(v_all, slots).flatten(1, 2),
        attn_mask=mask,
        scale=scale,
    )
    return (out * live).view(b, h, m, bq, -1)


def _query_block_chunk(k: torch.Tensor, num_q_blocks: int, kept_tokens: int) -> int:
    """Query blocks per slab: one slab's gathered keys are no larger than K itself (or 16 MiB in fp32)."""
    b, h, _, d = k.shape
    per_block = max(1, b * h * kept_tokens * d)
    return max(1, min(num_q_blocks, max(k.numel(), MIN_SLAB_ELEMENTS) // per_block))


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def block_sparse_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_index: torch.Tensor,
    kv_level: torch.Tensor | None,
    bias: torch.Tensor | None,
    block_q: int,
    block_k: int,
    scale: float,
    num_levels: int = 1,
    query_block_chunk: int | None = None,
) -> torch.Tensor:
    """Block-sparse attention on the gathered slots of every query block (fused SDPA, slabs in inference).

    Arguments as in `block_sparse_attention_reference`; `query_block_chunk` sets the query blocks per slab in
    inference (None: the largest slab whose gathered keys are no larger than K). Under autograd all blocks
    are computed at once: the saved activations dominate memory there.

    Returns:
        (B, H, Lq, Dv).
    """
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    mq, mk = _cdiv(lq, block_q), _cdiv(lk, block_k)
    index, level = _expand_tables(q, kv_index, kv_level)
    keys, values, log_counts, rel_biases, slots, valid, start = [], [], [], [], [], [], 0
    for p in range(num_levels):
        selected = _select_level(index, level, p)
        if selected is None:
            continue
        blocks, ok = selected  # (B, H, Mq, c)
        per_block = _cdiv(block_k, 1 << p)
        keys.append(_pool(k, block_k, p))
        values.append(_pool(v, block_k, p))
        # log(0) = -inf masks the groups past the end of the sequence.
        log_counts.append(_group_counts(lk, block_k, p, q.device).to(q.dtype).log().flatten())
        offset = torch.arange(per_block, device=q.device)
        slots.append((start + blocks.unsqueeze(-1) * per_block + offset).flatten(3))
        valid.append(ok.unsqueeze(-1).expand(*ok.shape, per_block).flatten(3))
        if bias is not None:  # the same columns for every listed block
            rel_biases.append(_pool_bias(bias, p).repeat(1, 1, blocks.shape[-1]))
        start += mk * per_block
    if not slots:
        return q.new_zeros(b, h, lq, dv)
    slots, valid = _cat(slots, -1), _cat(valid, -1)  # (B, H, Mq, W)
    pyramid = (_cat(keys, 2), _cat(values, 2), _cat(log_counts, 0), _cat(rel_biases, -1) if rel_biases else None)
    q_blocks = _pad_tokens(q, mq * block_q).view(b, h, mq, block_q, d)
    chunk = query_block_chunk or _query_block_chunk(k, mq, slots.shape[-1])
    if chunk >= mq or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))):
        out = _attend_slots(q_blocks, pyramid, slots, valid, scale)
    else:
        out = q.new_empty(b, h, mq, block_q, dv)  # inference: write slabs in place, no concatenation copy
        for s in range(0, mq, chunk):
            part = slice(s, s + chunk)
            out[:, :, part] = _attend_slots(q_blocks[:, :, part], pyramid, slots[:, :, part], valid[:, :, part], scale)
    return out.reshape(b, h, mq * block_q, dv)[:, :, :lq]


# ----------------------------------------------------------------------------------------------------------
# FlexAttention
# ----------------------------------------------------------------------------------------------------------


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_call(*args, **kwargs) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # the caller's graph traces it
        return flex_attention(*args, **kwargs)
    # Without compilation FlexAttention materializes every score; compiled it skips the masked blocks.
    with torch._dynamo.config.patch(recompile_limit=_FLEX_RECOMPILE_LIMIT):
        return _compiled_flex()(*args, **kwargs)


def _pyramid_layout(lk: int, block_k: int, num_levels: int, device: torch.device):
    """Per pyramid slot, laid out level after level, each level padded to a whole number of key blocks:

    unit: (S,) level * Mk + key block, or U = num_levels * Mk for padding;
    log_count: (S,) log of the group's real tokens, 0 for padding;
    real: (S,) whether the slot holds at least one real token;
    column: (S,) column in the levels' bias tables laid end to end.
    """
    mk = _cdiv(lk, block_k)
    units, log_counts, reals, columns, col0 = [], [], [], [], 0
    for p in range(num_levels):
        per_block = _cdiv(block_k, 1 << p)
        counts = _group_counts(lk, block_k, p, device).flatten()
        n = counts.numel()
        pad = _cdiv(n, block_k) * block_k - n
        slot = torch.arange(n + pad, device=device)
        units.append(torch.where(slot < n, p * mk + slot // per_block, num_levels * mk))
        counts = F.pad(counts, (0, pad))
        reals.append(counts > 0)
        log_counts.append(counts.clamp_min(1).double().log())
        columns.append(col0 + slot % per_block)
        col0 += per_block
    return torch.cat(units), torch.cat(log_counts), torch.cat(reals), torch.cat(columns)


def _blocks_to_table(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Mq, F) bool -> (number (B, H, Mq), indices (B, H, Mq, F)) int32, the kept blocks first."""
    order = torch.argsort((~blocks).to(torch.uint8), dim=-1, stable=True)
    return blocks.sum(-1).to(torch.int32), order.to(torch.int32)


def block_sparse_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_index: torch.Tensor,
    kv_level: torch.Tensor | None,
    bias: torch.Tensor | None,
    block_q: int,
    block_k: int,
    scale: float,
    num_levels: int = 1,
) -> torch.Tensor:
    """Block-sparse attention with `flex_attention` and a block mask built from the tables.

    Arguments as in `block_sparse_attention_reference`. Differentiable where FlexAttention is (CUDA).

    Returns:
        (B, H, Lq, Dv).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if not torch.is_grad_enabled():  # FlexAttention refuses CPU inputs that require grad, even under no_grad
        q, k, v, bias = (None if t is None else t.detach() for t in (q, k, v, bias))
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    mq, mk = _cdiv(lq, block_q), _cdiv(lk, block_k)
    index, level = _expand_tables(q, kv_index, kv_level)
    num_units = num_levels * mk
    # times[b, h, i, u]: how often query block i lists unit u = (level, key block); a last column for padding.
    listed = (index >= 0) & (level < num_levels)
    unit_of_entry = torch.where(listed, level * mk + index, num_units)
    times = torch.zeros(b, h, mq, num_units + 1, dtype=torch.int32, device=q.device)
    times = times.scatter_add(-1, unit_of_entry, listed.to(torch.int32))
    times[..., -1] = 0
    # Only the levels some entry uses are laid out (each costs a pooled copy of K and V); compiled, all of them.
    top = num_levels
    if num_levels > 1 and not torch.compiler.is_compiling():
        top = int(torch.where(listed, level, 0).max()) + 1 if listed.any() else 1
    slot_unit, log_count, real, column = _pyramid_layout(lk, block_k, top, q.device)
    slot_unit = torch.where(slot_unit >= top * mk, num_units, slot_unit)
    k_pyr = torch.cat([_pad_tokens(_pool(k, block_k, p), _cdiv(mk * _cdiv(block_k, 1 << p), block_k) * block_k)
                       for p in range(top)], 2)  # fmt: skip
    v_pyr = torch.cat([_pad_tokens(_pool(v, block_k, p), _cdiv(mk * _cdiv(block_k, 1 << p), block_k) * block_k)
                       for p in range(top)], 2)  # fmt: skip
    num_kv_blocks = k_pyr.shape[2] // block_k

    # Mask blocks: one per key block of pyramid slots. A block is visited if a unit inside it is listed, and
    # "full" (no mask function) when every slot in it is real and listed exactly once.
    slot_block = torch.arange(k_pyr.shape[2], device=q.device) // block_k
    inside = torch.zeros(num_units + 1, num_kv_blocks, device=q.device)
    inside[slot_unit, slot_block] = 1.0
    inside[-1] = 0.0
    visited = (times > 0).float() @ inside > 0
    once = (times == 1).float() @ inside
    whole = real.view(num_kv_blocks, block_k).all(-1)  # every slot of the block holds real tokens
    full = (once == inside.sum(0)) & whole & visited
    partial = visited & ~full
    kv_num, kv_idx = _blocks_to_table(partial)
    full_num, full_idx = _blocks_to_table(full)
    q_len = mq * block_q
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(block_q, block_k), seq_lengths=(q_len, k_pyr.shape[2])
    )
    times_f = times  # captured by the mask and score functions

    def mask_mod(bi, hi, qi, kvi):
        return (times_f[bi, hi, qi // block_q, slot_unit[kvi]] > 0) & real[kvi]

    block_mask.mask_mod = mask_mod
    extra = []
    if top > 1:
        log_count_q = log_count.to(torch.float32)
        extra.append(lambda bi, hi, qi, kvi: log_count_q[kvi])
    if torch.compiler.is_compiling() or bool((times > 1).any()):
        log_times = times.float().clamp_min(1).log()
        extra.append(lambda bi, hi, qi, kvi: log_times[bi, hi, qi // block_q, slot_unit[kvi]])
    if bias is not None:
        bias_cat = torch.cat([_pool_bias(bias, p) for p in range(top)], -1).float()
        per_head = bias_cat.shape[0] > 1
        extra.append(lambda bi, hi, qi, kvi: bias_cat[hi if per_head else 0, qi % block_q, column[kvi]])
    score_mod = None
    if extra:

        def score_mod(score, bi, hi, qi, kvi):
            for term in extra:
                score = score + term(bi, hi, qi, kvi)
            return score

    out = _flex_call(_pad_tokens(q, q_len), k_pyr, v_pyr, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out[:, :, :lq]
