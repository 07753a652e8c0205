"""PyTorch reference of block-sparse attention: the definition of correct for every backend.

Queries are split into blocks of `block_q` tokens and keys/values into blocks of `block_k` tokens (the
last block of each may be shorter). Query block `i` attends, under one softmax, to the key/value blocks
its row of the index table lists, each at the pooling level given beside it:

- level 0: the block's tokens as they are;
- level p > 0: the block average-pooled in groups of 2**p consecutive tokens (keys and values alike), each
  pooled key's logit raised by log(n), n the number of tokens of its group, so that it weighs as the n
  tokens it stands for (exactly so when they are equal). The last block pools only its real tokens.

A relative-position bias, if given, is a tensor `bias` of shape (H or 1, block_q, block_k): for every
listed pair (query block i, key block j), `bias[h, a, c]` is added to the logit of query token
`i * block_q + a` and key token `j * block_k + c`, whatever i and j are. At level p the pooled key of group
g gets the mean of `bias[h, a, c]` over the group's columns `c` below `block_k` (in the last, shorter
block, also over columns whose tokens are missing: the bias is a function of positions, not of tokens).

Index entries equal to -1 are empty slots; a row with no entry gives a zero output row. A block listed
twice is attended twice (its tokens get twice the weight), as a gather of the listed blocks would do.

Two forms, equal to float precision:

- `block_sparse_attention_reference` lays the levels in use end to end (a pyramid), gathers the slots
  every query block lists with one indexing per tensor and attends to them with the fused
  `scaled_dot_product_attention`: its arithmetic grows with the listed blocks, not with the sequence
  squared; in inference it works in slabs of query blocks so that the gathered copies stay bounded.
- `block_sparse_attention_dense` masks the logits of every query against every key of the whole pyramid:
  the plainest statement of the op (and the straightforward implementation benchmarks compare with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "block_sparse_attention_reference",
    "block_sparse_attention_dense",
    "default_query_block_chunk",
    "group_counts",
    "pool_bias",
    "pool_blocks",
]

# Below this many gathered key elements per slab (16 MiB in fp32) slabbing saves little and costs launches.
MIN_SLAB_ELEMENTS = 2**22


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 2 of x to `length`."""
    pad = length - x.shape[2]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def group_counts(length: int, block_k: int, level: int, device: torch.device | None = None) -> torch.Tensor:
    """Real tokens in each pooling group: (ceil(length / block_k), ceil(block_k / 2**level)) int64.

    Zero for the groups of the last block that lie past `length`.
    """
    f, blocks = 1 << level, _cdiv(length, block_k)
    start = torch.arange(blocks, device=device).unsqueeze(1) * block_k
    offset = torch.arange(_cdiv(block_k, f), device=device) * f
    block_len = (length - start).clamp(max=block_k)
    return (block_len - offset).clamp(0, f)


def pool_blocks(x: torch.Tensor, block_k: int, level: int) -> torch.Tensor:
    """Average-pool every key block of x in groups of 2**level tokens (real tokens only).

    Args:
        x: (B, H, L, D) keys or values.
        block_k: tokens per block.
        level: pooling level p (group size 2**p).

    Returns:
        (B, H, ceil(L / block_k), ceil(block_k / 2**p), D); zero for groups without real tokens.
    """
    b, h, length, d = x.shape
    blocks, f = _cdiv(length, block_k), 1 << level
    groups = _cdiv(block_k, f)
    x = _pad_tokens(x, blocks * block_k).view(b, h, blocks, block_k, d)
    if level == 0:
        return x
    x = F.pad(x, (0, 0, 0, groups * f - block_k)).view(b, h, blocks, groups, f, d).sum(dim=4)
    count = group_counts(length, block_k, level, x.device).clamp_min(1)
    return x / count.unsqueeze(-1).to(x.dtype)


def pool_bias(bias: torch.Tensor, level: int) -> torch.Tensor:
    """bias: (Hb, block_q, block_k) -> (Hb, block_q, ceil(block_k / 2**level)), group means of its columns."""
    if level == 0:
        return bias
    hb, bq, bk = bias.shape
    f = 1 << level
    groups = _cdiv(bk, f)
    count = (bk - torch.arange(groups, device=bias.device) * f).clamp(max=f)
    return F.pad(bias, (0, groups * f - bk)).view(hb, bq, groups, f).sum(-1) / count.to(bias.dtype)


def _log_counts(length: int, block_k: int, level: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # log(0) = -inf masks the groups past the end of the sequence.
    return group_counts(length, block_k, level, device).to(dtype).log()


def _gather_slots(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, D), slots: (B, H, Mq, W) -> (B, H, Mq, W, D)."""
    b, h, _, d = x.shape
    rows = torch.arange(b * h, device=x.device).view(b * h, 1, 1)
    return x.reshape(b * h, -1, d)[rows, slots.reshape(b * h, *slots.shape[2:])].view(*slots.shape, d)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Fused `scaled_dot_product_attention` (q: (N, M, Lq, D), k/v: (N, M, S, D), mask broadcastable to
    (N, M, Lq, S)), except that a query row whose mask is -inf everywhere gives zeros (and zero gradients)
    where SDPA would give NaN: an empty list, or a bias of -inf on every listed key."""
    live = (mask > float("-inf")).any(dim=-1, keepdim=True)
    mask = torch.where(live, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) * live


def default_query_block_chunk(k: torch.Tensor, num_q_blocks: int, kept_tokens: int) -> int:
    """Query blocks per slab: one slab's gathered keys are no larger than K itself (or 16 MiB in fp32)."""
    b, h, _, d = k.shape
    per_block = max(1, b * h * kept_tokens * d)
    return max(1, min(num_q_blocks, max(k.numel(), MIN_SLAB_ELEMENTS) // per_block))


def _expand_tables(
    q: torch.Tensor, kv_index: torch.Tensor, kv_level: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h = q.shape[:2]
    shape = (b, h, *kv_index.shape[2:])
    index = kv_index.long().expand(shape)
    level = torch.zeros_like(index) if kv_level is None else kv_level.long().expand(shape)
    return index, level


def _select_level(index: torch.Tensor, level: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The entries at level p moved to the front of every row: (blocks (B, H, Mq, c), valid (B, H, Mq, c))."""
    hit = (index >= 0) & (level == p)
    count = hit.sum(dim=-1)
    # Eagerly, c is the longest list at this level; a compiled graph keeps every slot (no data-dependent shape).
    c = index.shape[-1] if torch.compiler.is_compiling() else int(count.max()) if count.numel() else 0
    if c == 0:
        return None
    order = torch.argsort((~hit).to(torch.uint8), dim=-1, stable=True)[..., :c]
    blocks = index.gather(-1, order).clamp_min(0)
    valid = torch.arange(c, device=index.device) < count.unsqueeze(-1)
    return blocks, valid


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _attend(q_blocks: torch.Tensor, pyramid: tuple, slots: torch.Tensor, valid: torch.Tensor, scale: float):
    """Attention of query blocks (B, H, m, bq, D) to the pyramid slots (B, H, m, W) they list."""
    k_all, v_all, log_count, rel_bias = pyramid
    mask = log_count[slots].masked_fill(~valid, float("-inf")).unsqueeze(-2)  # (B, H, m, 1, W)
    if rel_bias is not None:
        mask = mask + rel_bias[None, :, None]  # (B, H, m, bq, W)
    b, h, m, bq, _ = q_blocks.shape
    # 4-D views keep SDPA on its fused CPU kernel: the probabilities are never held whole.
    out = _masked_attention(
        q_blocks.reshape(b, h * m, bq, -1),
        _gather_slots(k_all, slots).flatten(1, 2),
        _gather_slots(v_all, slots).flatten(1, 2),
        mask.flatten(1, 2),
        scale,
    )
    return out.view(b, h, m, bq, -1)


def block_sparse_attention_reference(
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
    form: str = "auto",
) -> torch.Tensor:
    """Block-sparse attention, computed by the cheaper of its two exact forms (see the module docstring).

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, Dv) values.
        kv_index: (B or 1, H or 1, ceil(Lq / block_q), K) integer key-block indices in [0, ceil(Lk / block_k)),
            -1 for an empty slot.
        kv_level: pooling level of every entry, in [0, num_levels), shaped like `kv_index`; None: all 0.
        bias: (H or 1, block_q, block_k) additive logit bias per (query offset, key offset) in a block pair.
        block_q: query tokens per block.
        block_k: key tokens per block.
        scale: factor applied to the logits q·k.
        num_levels: pooling levels that may occur (levels >= num_levels are ignored).
        query_block_chunk: query blocks per slab in inference; `None` picks the largest slab whose gathered
            keys are no larger than `k`. Under autograd all blocks are computed at once (the saved activations
            dominate memory there).
        form: "gather" attends to the gathered slots each query block lists; "masked" is
            `block_sparse_attention_dense`; "auto" takes "masked" when the longest row lists at least half
            of the pyramid (gathering would copy K and V about once per query block for no saving), else
            "gather" (and always "gather" under torch.compile: the choice depends on the tables' values).

    Returns:
        (B, H, Lq, Dv); zero rows for query blocks without entries.
    """
    if form not in ("auto", "gather", "masked"):
        raise ValueError(f"form must be 'auto', 'gather' or 'masked', got {form!r}")
    dense_args = (q, k, v, kv_index, kv_level, bias, block_q, block_k, scale, num_levels)
    if form == "masked":
        return block_sparse_attention_dense(*dense_args)
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    mq, mk = _cdiv(lq, block_q), _cdiv(lk, block_k)
    index, level = _expand_tables(q, kv_index, kv_level)
    # The levels in use, pooled and laid end to end (the pyramid), and every entry's slots in it, level by level.
    keys, values, log_counts, rel_biases, slots, valid, start = [], [], [], [], [], [], 0
    for p in range(num_levels):
        selected = _select_level(index, level, p)
        if selected is None:
            continue
        blocks, ok = selected  # (B, H, Mq, c)
        per_block = _cdiv(block_k, 1 << p)
        keys.append(pool_blocks(k, block_k, p).flatten(2, 3))
        values.append(pool_blocks(v, block_k, p).flatten(2, 3))
        log_counts.append(_log_counts(lk, block_k, p, q.dtype, q.device).flatten())
        offset = torch.arange(per_block, device=q.device)
        slots.append((start + blocks.unsqueeze(-1) * per_block + offset).flatten(3))
        valid.append(ok.unsqueeze(-1).expand(*ok.shape, per_block).flatten(3))
        if bias is not None:  # the same columns for every listed block
            rel_biases.append(pool_bias(bias, p).repeat(1, 1, blocks.shape[-1]))
        start += mk * per_block
    if not slots:
        return q.new_zeros(b, h, lq, dv)
    slots, valid = _cat(slots, -1), _cat(valid, -1)  # (B, H, Mq, W)
    pyramid_len = lk + sum(mk * _cdiv(block_k, 1 << p) for p in range(1, num_levels))
    if form == "auto" and not torch.compiler.is_compiling() and 2 * slots.shape[-1] >= pyramid_len:
        return block_sparse_attention_dense(*dense_args)
    pyramid = (_cat(keys, 2), _cat(values, 2), _cat(log_counts, 0), _cat(rel_biases, -1) if rel_biases else None)
    q_blocks = _pad_tokens(q, mq * block_q).view(b, h, mq, block_q, d)
    chunk = query_block_chunk or default_query_block_chunk(k, mq, slots.shape[-1])
    if chunk >= mq or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))):
        out = _attend(q_blocks, pyramid, slots, valid, scale)
    else:
        out = q.new_empty(b, h, mq, block_q, dv)  # inference: write slabs in place, no concatenation copy
        for s in range(0, mq, chunk):
            part = slice(s, s + chunk)
            out[:, :, part] = _attend(q_blocks[:, :, part], pyramid, slots[:, :, part], valid[:, :, part], scale)
    return out.reshape(b, h, mq * block_q, dv)[:, :, :lq]


def block_sparse_attention_dense(
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
    """The same op by masking dense attention from every query to every key of the whole pyramid.

    A block listed n times adds log(n) to its logits, which weighs it as n copies would. Memory grows with
    Lq times the pyramid's length; arguments and result as in `block_sparse_attention_reference`.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    mq, mk = _cdiv(lq, block_q), _cdiv(lk, block_k)
    index, level = _expand_tables(q, kv_index, kv_level)
    # How often each (level, key block) unit is listed by each query block.
    unit = torch.where((index >= 0) & (level < num_levels), level * mk + index, num_levels * mk)
    times = torch.zeros(b, h, mq, num_levels * mk + 1, dtype=q.dtype, device=q.device)
    times = times.scatter_add(-1, unit, torch.ones_like(unit, dtype=q.dtype))[..., :-1]
    keys, values, key_bias, rel_bias = [], [], [], []
    for p in range(num_levels):
        keys.append(pool_blocks(k, block_k, p).flatten(2, 3))
        values.append(pool_blocks(v, block_k, p).flatten(2, 3))
        log_count = _log_counts(lk, block_k, p, q.dtype, q.device)  # (Mk, groups)
        listed = times[..., p * mk : (p + 1) * mk].log()  # (B, H, Mq, Mk), -inf where not listed
        key_bias.append((listed.unsqueeze(-1) + log_count).flatten(3))
        if bias is not None:
            rel_bias.append(pool_bias(bias, p).repeat(1, 1, mk))
    rows = torch.arange(lq, device=q.device)
    mask = torch.cat(key_bias, -1)[:, :, rows // block_q]  # (B, H, Lq, S)
    if bias is not None:
        mask = mask + torch.cat(rel_bias, -1)[:, rows % block_q]
    return _masked_attention(q, torch.cat(keys, 2), torch.cat(values, 2), mask, scale)
