"""The fast PyTorch backends of block-sparse attention: FlexAttention block masks, and gathered fused SDPA.

Both lay the levels in use end to end (the key pyramid: K, then K pooled in groups of 2, 4, ... per key
block) and attend from every query block to the pyramid slots its row lists.

- `block_sparse_attention_gather` copies the slots every query block lists out of the pyramid as whole rows
  (`index_select` of runs of slots) and runs the fused `scaled_dot_product_attention` on them, with an
  additive mask only where one is needed (pooled groups' log sizes, empty slots, the bias); query blocks of
  16 tokens or fewer take two batched matmuls and a softmax instead. In inference it works in slabs of query
  blocks so that the gathered copies stay no larger than K. It runs everywhere and has a backward
  everywhere: the CPU training path.
- `block_sparse_attention_flex` hands the pyramid to `torch.nn.attention.flex_attention` with a block
  mask built from the tables: FlexAttention's block size is the key block, so a level-0 entry is one whole
  mask block and pooled entries share blocks (2**p key blocks each) under a mask function. The log of the
  group size, repeats and the relative-position bias are score modifiers. Eagerly, pooled entries are
  gathered instead and merged in (see the function). Outside a compiled region it is compiled once per
  shape (`torch.compile(flex_attention, dynamic=False)`); inside one it is traced. torch 2.14 has
  FlexAttention forward and backward on CUDA, forward only on the CPU.

With `causal=True` every backend hides from query i the pyramid slots whose last real token lies past i (see
`reference.py`): an additive -inf per (query, slot) in the gathered and masked forms, a mask-function term and
mask blocks split into full, partial and skipped along the diagonal in FlexAttention.
"""

from __future__ import annotations

import math
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._backend import needs_grad

__all__ = [
    "FlexCompileError",
    "block_sparse_attention_flex",
    "block_sparse_attention_gather",
    "block_sparse_attention_masked",
    "flex_available",
]

# Gathered key elements per slab in inference (2 MiB in fp32; at least one query block): a slab's keys and values
# are read by its SDPA while they are still in cache. Measured on the 2-core CPU (fp32, 4 heads of 64), against
# slabs as large as K or 16 MiB: the 10%-block op on 8,192 tokens 1.6-2x faster, PSA's op 1.36x at 6,144 tokens
# and 1.14x at 12,288 (2 threads); 2^18 to 2^20 measured alike, 2^21 and above slower.
SLAB_ELEMENTS = 2**19
# Query rows per slab (per image and head), at least: a slab costs a dozen small ops whatever its size, which
# dominate slabs of tiny query blocks. BiFormer's third stage (4-query regions, 64 keys each, 2 threads): 2 -> 5
# blocks per slab, its BRA layer 20.5 -> 18.6 ms (-B, 12 heads), 11.6 -> 11.1 ms (-T/S); 10 blocks: 23.7 ms.
MIN_SLAB_QUERIES = 20
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


def _group_last(length: int, block_k: int, level: int, device: torch.device) -> torch.Tensor:
    """Position of the last real token of each pooling group: (ceil(length / block_k), ceil(block_k / 2**level)).

    A group without real tokens (past the end of a short last block) gets length - 1; its log count is -inf.
    """
    f, blocks = 1 << level, _cdiv(length, block_k)
    start = torch.arange(blocks, device=device).unsqueeze(1) * block_k
    end = (torch.arange(_cdiv(block_k, f), device=device) * f + f).clamp(max=block_k)
    return (start + end).clamp(max=length) - 1


def _causal_mask(last: torch.Tensor, first_query: int, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (..., num_queries, W) hiding from each query the slots whose last token (last: (..., W)) is
    past it; queries at positions first_query, first_query + 1, ..."""
    pos = torch.arange(first_query, first_query + num_queries, device=last.device)
    hide = last.unsqueeze(-2) > pos.unsqueeze(-1)
    return torch.zeros((), dtype=dtype, device=last.device).masked_fill(hide, float("-inf"))


def pool_groups(x: torch.Tensor, block_k: int, level: int) -> torch.Tensor:
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


def pool_bias_columns(bias: torch.Tensor, level: int) -> torch.Tensor:
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


class _Listed(NamedTuple):
    """The key pyramid and what every query block lists of it (see `_listed_slots`)."""

    keys: torch.Tensor  # (B, H, S, D): the levels in use laid end to end
    values: torch.Tensor  # (B, H, S, Dv)
    rows: torch.Tensor  # (B or 1, H or 1, Mq, W / unit): listed runs of `unit` slots
    mask: torch.Tensor | None  # (B or 1, H or 1, Mq, W): log of each slot's tokens, -inf if empty; None: all 0
    bias: torch.Tensor | None  # (Hb, bq, W): the bias columns of every listed slot
    unit: int
    levels: tuple[int, ...]  # the pyramid's levels, in order
    slot_last: torch.Tensor | None = None  # (S,): causal only, each slot's last real token


def _listed_slots(
    q, k, v, kv_index, kv_level, bias, block_k: int, num_levels: int, causal: bool = False
) -> _Listed | None:
    """The levels in use laid end to end (the pyramid) and, per query block, the pyramid rows it lists.

    Rows are runs of `unit` consecutive slots (the largest size dividing a block at every level in use), so
    that gathering is a copy of whole rows (`index_select`) straight into one (B, H, m, W, D) tensor.

    Returns:
        None when nothing is listed, else the pyramid and the listed rows (`_Listed`).
    """
    lk = k.shape[2]
    mk = _cdiv(lk, block_k)
    # The tables stay as broadcast as they come ((1, 1, Mq, K) for BiFormer's shared routing): everything
    # built from them is per table row, and broadcasts against (B, H) only where the slots are gathered.
    index = kv_index.long()
    if kv_level is None or num_levels == 1:  # one level: the table as it is, no selection
        if index.shape[-1] == 0:
            return None
        selected = [(0, (index.clamp_min(0), index >= 0))]
    else:
        level = kv_level.long()
        selected = [(p, sel) for p in range(num_levels) if (sel := _select_level(index, level, p)) is not None]
    if not selected:
        return None
    sizes = [_cdiv(block_k, 1 << p) for p, _ in selected]
    unit = math.gcd(*sizes)
    keys = _cat([pool_groups(k, block_k, p) for p, _ in selected], 2)
    values = _cat([pool_groups(v, block_k, p) for p, _ in selected], 2)
    # log(0) = -inf masks the groups past the end of the sequence.
    log_count = _cat([_group_counts(lk, block_k, p, q.device).to(q.dtype).log().flatten() for p, _ in selected], 0)
    rows, masks, biases, start = [], [], [], 0
    for (p, (blocks, ok)), n in zip(selected, sizes, strict=True):
        first = start + blocks * n  # (B, H, Mq, c) first slot of every listed block
        rows.append((first.unsqueeze(-1) // unit + torch.arange(n // unit, device=q.device)).flatten(3))
        slots = (first.unsqueeze(-1) + torch.arange(n, device=q.device)).flatten(3)
        masks.append(log_count[slots].masked_fill(~ok.repeat_interleave(n, -1), float("-inf")))
        if bias is not None:  # the same columns for every listed block
            biases.append(pool_bias_columns(bias, p).repeat(1, 1, blocks.shape[-1]))
        start += mk * n
    mask = _cat(masks, -1)
    slot_last = None
    if causal:
        slot_last = _cat([_group_last(lk, block_k, p, q.device).flatten() for p, _ in selected], 0)
    if len(selected) == 1 and selected[0][0] == 0 and bias is None and not torch.compiler.is_compiling():
        # Whole blocks at level 0, every slot valid (the routed regions of BiFormer): no mask at all, which
        # keeps SDPA on its unmasked kernel.
        if mask.device.type != "meta" and bool((mask == 0).all()):
            mask = None
    levels = tuple(p for p, _ in selected)
    biases = _cat(biases, -1) if biases else None
    return _Listed(keys, values, _cat(rows, -1), mask, biases, unit, levels, slot_last)


def _gathered(listed: _Listed, part: slice, block_q: int):
    """Keys (B, H, m, W, D), values (B, H, m, W, Dv) and additive mask (B, H, m, 1 or bq, W) of query blocks
    `part` (of `block_q` queries each)."""
    keys, values, rows, mask, bias, unit, _, slot_last = listed
    b, h, length, d = keys.shape
    rows = rows[:, :, part]
    flat = (torch.arange(b * h, device=rows.device).view(b, h, 1, 1) * (length // unit) + rows).flatten()
    m, width = rows.shape[2], rows.shape[3] * unit
    k_sel = keys.reshape(-1, unit * d).index_select(0, flat).view(b, h, m, width, d)
    v_sel = values.reshape(-1, unit * values.shape[-1]).index_select(0, flat).view(b, h, m, width, -1)
    causal = None
    if slot_last is not None:
        slots = (rows.unsqueeze(-1) * unit + torch.arange(unit, device=rows.device)).flatten(-2)  # (., ., m, W)
        pos = (part.start or 0) * block_q + torch.arange(m, device=rows.device).view(m, 1) * block_q
        causal = _causal_mask(slot_last[slots] - pos, 0, block_q, keys.dtype)  # (., ., m, bq, W)
    if mask is None:  # dropped only without a bias (and not causal)
        return k_sel, v_sel, causal
    mask = mask[:, :, part].unsqueeze(-2)
    if bias is not None:
        mask = mask + bias[None, :, None]
    if causal is not None:
        mask = mask + causal
    return k_sel, v_sel, mask


# CPU query blocks up to this size attend through two batched matmuls and a softmax: the fused CPU SDPA kernel
# tiles queries for longer rows and loses to the plain form on BiFormer's 4- and 16-token regions (measured
# 1.3-1.8x slower, 64 keys, head dim 32).
_EXPLICIT_MAX_QUERIES = 16
# Unmasked, longer query blocks too, up to this many logits per block (queries x listed keys): BiFormer's first
# stage (64-token regions, one routed: 64 x 64, head dim 32) runs its BRA layer 35.2 -> 30.9 ms (2 threads).
EXPLICIT_MAX_LOGITS = 64 * 64


def _attend(q_blocks: torch.Tensor, listed: tuple, part: slice, scale: float) -> torch.Tensor:
    """Attention of query blocks (B, H, m, bq, D) to the slots they list, (B, H, m, bq, Dv)."""
    keys, values, mask = _gathered(listed, part, q_blocks.shape[3])
    b, h, m, bq, _ = q_blocks.shape
    short = bq <= _EXPLICIT_MAX_QUERIES or (mask is None and bq * keys.shape[-2] <= EXPLICIT_MAX_LOGITS)
    if short and q_blocks.device.type == "cpu":
        # Logits and softmax in at least fp32, as the fused kernels accumulate.
        wide = torch.promote_types(q_blocks.dtype, torch.float32)
        if mask is None:
            # Every listed slot is real (the mask was dropped): each row has keys, so no guard of empty rows (as the
            # unmasked SDPA call below), and the scale on the queries (as the official BiFormer), two passes fewer:
            # BiFormer-B's second-stage BRA layer (16-token regions) 23.3 -> 21.1 ms, 2 threads.
            logits = torch.matmul(q_blocks.to(wide) * scale, keys.to(wide).transpose(-1, -2))
            return torch.matmul(torch.softmax(logits, dim=-1).to(values.dtype), values)
        logits = torch.matmul(q_blocks.to(wide), keys.to(wide).transpose(-1, -2)) * scale + mask
        live = logits.amax(dim=-1, keepdim=True) > float("-inf")  # a row without keys gives zeros, not NaN
        weights = torch.softmax(torch.where(live, logits, 0.0), dim=-1).to(values.dtype)
        return torch.matmul(weights, values) * live
    # 4-D views keep SDPA on its fused CPU kernel: the probabilities are never held whole.
    q_4d, k_4d, v_4d = q_blocks.reshape(b, h * m, bq, -1), keys.flatten(1, 2), values.flatten(1, 2)
    if mask is None:
        return F.scaled_dot_product_attention(q_4d, k_4d, v_4d, scale=scale).view(b, h, m, bq, -1)
    mask = mask.expand(b, h, *mask.shape[2:]).flatten(1, 2)
    return _sdpa_masked(q_4d, k_4d, v_4d, mask, scale).view(b, h, m, bq, -1)


def _sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused SDPA under an additive mask; a query row with every logit at -inf gives zeros (SDPA: NaN)."""
    live = (mask > float("-inf")).any(dim=-1, keepdim=True)
    mask = torch.where(live, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) * live


def _attend_lse(q_blocks: torch.Tensor, listed: tuple, part: slice, scale: float):
    """As `_attend`, with the log-sum-exp of every row's logits: (out (B, H, m, bq, Dv), lse (B, H, m, bq)).

    Written out (two matmuls and a softmax) because the fused CPU SDPA does not return the log-sum-exp.
    """
    keys, values, mask = _gathered(listed, part, q_blocks.shape[3])
    # In fp32 whatever the inputs: the log-sum-exp becomes a logit of the merge, where bf16 rounding of it
    # (0.06 at 20) would move the whole row.
    logits = torch.matmul(q_blocks.float() * scale, keys.float().transpose(-1, -2))
    if mask is not None:
        logits = logits + mask.float()
    live = logits.amax(dim=-1, keepdim=True) > float("-inf")
    # Rows without keys get finite logits before the log-sum-exp (whose backward would be NaN there), then an
    # lse of -inf and zero weights.
    logits = torch.where(live, logits, 0.0)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    weights = torch.exp(logits - lse) * live
    lse = torch.where(live, lse, float("-inf")).squeeze(-1)
    return torch.matmul(weights, values.float()).to(values.dtype), lse


def _query_block_chunk(k: torch.Tensor, num_q_blocks: int, kept_tokens: int, block_q: int) -> int:
    """Query blocks per slab: one slab's gathered keys hold about `SLAB_ELEMENTS` elements, and the slab at least
    `MIN_SLAB_QUERIES` query rows (one block at least)."""
    b, h, _, d = k.shape
    per_block = max(1, b * h * kept_tokens * d)
    return max(1, min(num_q_blocks, max(SLAB_ELEMENTS // per_block, _cdiv(MIN_SLAB_QUERIES, block_q))))


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
    causal: bool = False,
    query_block_chunk: int | None = None,
) -> torch.Tensor:
    """Block-sparse attention on the gathered slots of every query block (fused SDPA, slabs in inference).

    Arguments as in `block_sparse_attention_reference`; `query_block_chunk` sets the query blocks per slab in
    inference (None: slabs of about `SLAB_ELEMENTS` gathered key elements). Under autograd all blocks
    are computed at once: the saved activations dominate memory there.

    Returns:
        (B, H, Lq, Dv).
    """
    b, h, lq, d = q.shape
    dv = v.shape[-1]
    mq = _cdiv(lq, block_q)
    listed = _listed_slots(q, k, v, kv_index, kv_level, bias, block_k, num_levels, causal)
    if listed is None:
        return q.new_zeros(b, h, lq, dv)
    # Rows are copied out of the pyramid as whole runs of slots: lay strided keys and values out once here,
    # not once per slab (head-split views of a projection, say).
    listed = listed._replace(keys=listed.keys.contiguous(), values=listed.values.contiguous())
    q_blocks = _pad_tokens(q, mq * block_q).view(b, h, mq, block_q, d)
    chunk = query_block_chunk or _query_block_chunk(k, mq, listed.rows.shape[-1] * listed.unit, block_q)
    if chunk >= mq or needs_grad(q, k, v, bias):
        out = _attend(q_blocks, listed, slice(None), scale)
    else:
        out = q.new_empty(b, h, mq, block_q, dv)  # inference: write slabs in place, no concatenation copy
        for s in range(0, mq, chunk):
            out[:, :, s : s + chunk] = _attend(q_blocks[:, :, s : s + chunk], listed, slice(s, s + chunk), scale)
    return out.reshape(b, h, mq * block_q, dv)[:, :, :lq]


# ----------------------------------------------------------------------------------------------------------
# Masked dense SDPA over the pyramid
# ----------------------------------------------------------------------------------------------------------


def block_sparse_attention_masked(
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
    causal: bool = False,
) -> torch.Tensor:
    """Block-sparse attention as one fused SDPA over the whole key pyramid under an additive block mask.

    Every query attends to every pyramid slot, the unlisted ones at -inf, the listed ones raised by the log of
    their tokens and of how often their block is listed (plus the bias). It does dense arithmetic over the
    pyramid, so it pays only on short sequences or dense tables, where gathering costs more than the keys it
    saves (BiFormer's 196-token third stage: 4-token regions, a third of them routed). Arguments as in
    `block_sparse_attention_reference`.

    Returns:
        (B, H, Lq, Dv).
    """
    b, h, lq, d = q.shape
    mq = _cdiv(lq, block_q)
    listed = _listed_slots(q, k, v, kv_index, kv_level, bias, block_k, num_levels, causal)
    if listed is None:
        return q.new_zeros(b, h, lq, v.shape[-1])
    size = listed.keys.shape[2]
    slots = (listed.rows.unsqueeze(-1) * listed.unit + torch.arange(listed.unit, device=q.device)).flatten(-2)
    # Tokens behind each listed slot, summed over repeats of its block: log of it is the slot's logit offset.
    tokens = torch.ones((), dtype=q.dtype, device=q.device) if listed.mask is None else listed.mask.exp()
    counts = q.new_zeros(*slots.shape[:-1], size).scatter_add_(-1, slots, tokens.expand(slots.shape))
    mask = counts.log().unsqueeze(-2)  # (B or 1, H or 1, Mq, 1, S)
    if bias is not None:  # the same columns under every block of a level
        mk = _cdiv(k.shape[2], block_k)
        columns = _cat([pool_bias_columns(bias, p).repeat(1, 1, mk) for p in listed.levels], -1)
        mask = mask + columns[None, :, None]
    mask = mask.expand(*mask.shape[:3], block_q, size).flatten(2, 3)
    if causal:
        mask = mask + _causal_mask(listed.slot_last, 0, mq * block_q, mask.dtype)
    out = _sdpa_masked(_pad_tokens(q, mq * block_q), listed.keys, listed.values, mask, scale)
    return out[:, :, :lq]


# ----------------------------------------------------------------------------------------------------------
# FlexAttention
# ----------------------------------------------------------------------------------------------------------


class FlexCompileError(RuntimeError):
    """FlexAttention could not be compiled here (no C++ compiler for Inductor's CPU kernel, say)."""


# Set when compiling FlexAttention failed once in this process: `auto` stops choosing it.
_flex_failed: list[str] = []


def flex_available() -> bool:
    """Whether torch has FlexAttention and compiling it has not failed in this process."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return not _flex_failed


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_call(*args, **kwargs) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # the caller's graph traces it
        return flex_attention(*args, **kwargs)
    # Without compilation FlexAttention materializes every score; compiled it skips the masked blocks.
    try:
        with torch._dynamo.config.patch(recompile_limit=_FLEX_RECOMPILE_LIMIT):
            return _compiled_flex()(*args, **kwargs)
    except (torch._dynamo.exc.TorchDynamoException, OSError) as error:  # Inductor's errors derive from the first
        _flex_failed.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        raise FlexCompileError(f"compiling FlexAttention failed: {_flex_failed[-1]}") from error


def _pyramid_layout(lk: int, block_k: int, num_levels: int, device: torch.device):
    """Per pyramid slot, laid out level after level, each level padded to a whole number of key blocks:

    unit: (S,) level * Mk + key block, or U = num_levels * Mk for padding;
    log_count: (S,) log of the group's real tokens, 0 for padding;
    real: (S,) whether the slot holds at least one real token;
    column: (S,) column in the levels' bias tables laid end to end;
    last: (S,) position of the group's last real token, -1 for padding.
    """
    mk = _cdiv(lk, block_k)
    units, log_counts, reals, columns, lasts, col0 = [], [], [], [], [], 0
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
        lasts.append(F.pad(_group_last(lk, block_k, p, device).flatten(), (0, pad), value=-1))
        col0 += per_block
    return torch.cat(units), torch.cat(log_counts), torch.cat(reals), torch.cat(columns), torch.cat(lasts)


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
    causal: bool = False,
) -> torch.Tensor:
    """Block-sparse attention with `flex_attention` and a block mask built from the tables.

    Arguments as in `block_sparse_attention_reference`. Differentiable where FlexAttention is (CUDA).

    Eagerly, with pooled entries present, the pooled slots (a few per listed block) are gathered and attended
    with two matmuls, and FlexAttention takes the level-0 entries (whole mask blocks, no mask function):
    pooled slots of several key blocks share one mask block, so FlexAttention alone would compute every slot
    of every visited block. The two halves of each row's softmax are merged inside FlexAttention, whose CPU
    kernel returns no log-sum-exp: one extra key slot per row carries the pooled half's log-sum-exp as its
    logit and an indicator as its value, so the output tells the pooled half's share of the softmax.

    Returns:
        (B, H, Lq, Dv).
    """
    if not torch.is_grad_enabled():  # FlexAttention refuses CPU inputs that require grad, even under no_grad
        q, k, v, bias = (None if t is None else t.detach() for t in (q, k, v, bias))
    if kv_level is None or num_levels == 1 or torch.compiler.is_compiling() or q.device.type == "meta":
        return _flex(q, k, v, kv_index, kv_level, bias, block_q, block_k, scale, num_levels, causal)
    pooled = kv_level > 0
    listed = _listed_slots(q, k, v, torch.where(pooled, kv_index, -1), kv_level, bias, block_k, num_levels, causal)
    if listed is None:
        return _flex(q, k, v, kv_index, None, bias, block_q, block_k, scale, 1, causal)
    b, h, lq, d = q.shape
    mq = _cdiv(lq, block_q)
    q_blocks = _pad_tokens(q, mq * block_q).view(b, h, mq, block_q, d)
    chunk = mq if needs_grad(q, k, v, bias) else _query_block_chunk(k, mq, listed.rows.shape[-1] * listed.unit, block_q)
    parts = [
        _attend_lse(q_blocks[:, :, s : s + chunk], listed, slice(s, s + chunk), scale) for s in range(0, mq, chunk)
    ]
    out_p = _cat([o for o, _ in parts], 2).flatten(2, 3)[:, :, :lq]
    lse_p = _cat([x for _, x in parts], 2).flatten(2, 3)[:, :, :lq]
    level0 = torch.where(pooled, -1, kv_index)
    return _flex(q, k, v, level0, None, bias, block_q, block_k, scale, 1, causal, merge=(out_p, lse_p))


def _flex(
    q, k, v, kv_index, kv_level, bias, block_q: int, block_k: int, scale: float, num_levels: int, causal: bool,
    merge=None,
):  # fmt: skip
    """FlexAttention over the whole pyramid of the levels in use: (B, H, Lq, Dv).

    `merge`: (out (B, H, Lq, Dv), lse (B, H, Lq)) of attention to further keys of every row, merged into the
    softmax: a sentinel key slot whose logit is that lse and whose value is an indicator column.
    """
    from torch.nn.attention.flex_attention import BlockMask

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
    no_values = torch.compiler.is_compiling() or q.device.type == "meta"
    if num_levels > 1 and not no_values:
        top = int(torch.where(listed, level, 0).max()) + 1 if listed.any() else 1
    slot_unit, log_count, real, column, last = _pyramid_layout(lk, block_k, top, q.device)
    slot_unit = torch.where(slot_unit >= top * mk, num_units, slot_unit)
    # One level of whole blocks (BiFormer's regions) passes K and V as they are, strided head views included: the
    # compiled kernel reads them in place, and the copy cost more than it saved (BiFormer-B's first-stage BRA layer
    # 41.4 -> 37.7 ms, 2 threads).
    k_pyr, v_pyr = (
        _cat([_pad_tokens(pool_groups(x, block_k, p), _cdiv(mk * _cdiv(block_k, 1 << p), block_k) * block_k)
              for p in range(top)], 2)
        for x in (k, v)
    )  # fmt: skip
    sentinel = k_pyr.shape[2]
    if merge is not None:  # one more key block holding the sentinel slot, one more value column
        k_pyr = _pad_tokens(k_pyr, sentinel + block_k)
        v_pyr = F.pad(v_pyr, (0, 1, 0, block_k))
        v_pyr[:, :, sentinel, -1] = 1.0
        slot_unit = F.pad(slot_unit, (0, block_k), value=num_units)
        real = F.pad(real, (0, block_k), value=True)
        column = F.pad(column, (0, block_k))
        last = F.pad(last, (0, block_k), value=-1)
        log_count = F.pad(log_count, (0, block_k))
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
    if causal:
        # Along the diagonal: a block whose every slot is past every query of the query block is skipped, one
        # whose every slot is visible to the block's first query needs no mask function.
        first = torch.arange(mq, device=q.device).unsqueeze(-1) * block_q  # (Mq, 1)
        block_last = torch.where(real, last, -1).view(num_kv_blocks, block_k)
        block_first = torch.where(real, last, k_pyr.shape[2] + lq).view(num_kv_blocks, block_k)
        visited = visited & (block_first.amin(-1) < first + block_q)
        full = full & (block_last.amax(-1) <= first)
    partial = visited & ~full
    if merge is not None:
        partial[..., -1] = True
    kv_num, kv_idx = _blocks_to_table(partial)
    full_num, full_idx = _blocks_to_table(full)
    q_len = mq * block_q
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(block_q, block_k), seq_lengths=(q_len, k_pyr.shape[2])
    )

    if merge is None:

        def mask_mod(bi, hi, qi, kvi):
            kept = (times[bi, hi, qi // block_q, slot_unit[kvi]] > 0) & real[kvi]
            return kept & (last[kvi] <= qi) if causal else kept

    else:
        merge_lse = _pad_tokens(merge[1].unsqueeze(-1), q_len).squeeze(-1).float()
        merge_live = torch.isfinite(merge_lse)

        def mask_mod(bi, hi, qi, kvi):
            kept = (times[bi, hi, qi // block_q, slot_unit[kvi]] > 0) & real[kvi]
            if causal:
                kept = kept & (last[kvi] <= qi)
            return kept | ((kvi == sentinel) & merge_live[bi, hi, qi])

    block_mask.mask_mod = mask_mod
    extra = []
    if top > 1:
        log_count_q = log_count.to(torch.float32)
        extra.append(lambda bi, hi, qi, kvi: log_count_q[kvi])
    if no_values or bool((times > 1).any()):
        log_times = times.float().clamp_min(1).log()
        extra.append(lambda bi, hi, qi, kvi: log_times[bi, hi, qi // block_q, slot_unit[kvi]])
    if bias is not None:
        bias_cat = torch.cat([pool_bias_columns(bias, p) for p in range(top)], -1).float()
        per_head = bias_cat.shape[0] > 1
        extra.append(lambda bi, hi, qi, kvi: bias_cat[hi if per_head else 0, qi % block_q, column[kvi]])
    if merge is not None:
        terms = list(extra)
        extra = [lambda bi, hi, qi, kvi: torch.where(kvi == sentinel, merge_lse[bi, hi, qi], 0.0)]
        if terms:
            extra.append(
                lambda bi, hi, qi, kvi: torch.where(kvi == sentinel, 0.0, sum(t(bi, hi, qi, kvi) for t in terms))
            )
    score_mod = None
    if extra:

        def score_mod(score, bi, hi, qi, kvi):
            for term in extra:
                score = score + term(bi, hi, qi, kvi)
            return score

    out = _flex_call(_pad_tokens(q, q_len), k_pyr, v_pyr, score_mod=score_mod, block_mask=block_mask, scale=scale)
    out = out[:, :, :lq]
    if merge is None:
        return out
    share = out[..., -1:]  # the pooled half's share of each row's softmax
    return (out[..., :-1] + share * merge[0]).to(q.dtype)
