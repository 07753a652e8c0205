"""Block-sparse attention, stated plainly: the oracle every backend is tested against.

Queries are split into blocks of `block_q` tokens and keys/values into blocks of `block_k` tokens (the
last block of each may be shorter). Query block `i` attends, under one softmax, to the key/value blocks
its row of the index table lists, each at the pooling level given beside it:

- level 0: the block's tokens as they are;
- level p > 0: the block average-pooled in groups of 2**p consecutive tokens (keys and values alike), each
  pooled key's logit raised by log(n), n the number of real tokens of its group, so that it weighs as the n
  tokens it stands for. The last block pools only its real tokens; a group with none is absent.

A relative-position bias, if given, has shape (H or 1, block_q, block_k): for every listed pair (query block
i, key block j), `bias[h, a, c]` is added to the logit of query `i * block_q + a` and key `j * block_k + c`.
At level p the pooled key of group g gets the mean of `bias[h, a, c]` over the group's columns c below
`block_k` (in a short last block also over columns without tokens: the bias depends on positions only).

An entry -1 is an empty slot; a row without entries gives a zero output row. A block listed n times is
attended n times (log(n) added to its logits), as a gather of the listed blocks would do.

Causal: query `i` (its position in q) sees key token `j` only if `j <= i`, and a pooled group only once all
its real tokens are visible (its last real token `<= i`), as the official causal PSA kernel decides; q and k
are aligned at their first token (torch's `is_causal`). A query that sees no listed key gets a zero row.

This file is the definition, not a backend to be fast: every pooled level is a matrix of group means,
every logit of every query against every pooled key is formed, and the ones not listed are masked. Its
memory grows with Lq times the pyramid's length; the backends in `torch_impl.py` and `triton_impl.py`
compute the same numbers without that.
"""

from __future__ import annotations

import math

import torch

__all__ = ["block_sparse_attention_reference"]


def _group_means(
    length: int, block_k: int, level: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooling at one level as a matrix.

    Returns:
        means: (G, length) float64, row g averaging the real tokens of group g (a zero row for a group without).
        counts: (G,) real tokens per group. Groups run block by block, ceil(block_k / 2**level) per block.
        last: (G,) position of the last real token of each group (-1 for a group without).
    """
    size = 1 << level
    per_block = -(-block_k // size)
    blocks = -(-length // block_k)
    token = torch.arange(length, device=device)
    group = (token // block_k) * per_block + (token % block_k) // size
    member = torch.arange(blocks * per_block, device=device)[:, None] == group[None, :]
    counts = member.sum(1)
    last = torch.where(member, token, -1).amax(1)
    return member.double() / counts.clamp_min(1)[:, None], counts, last


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
    causal: bool = False,
) -> torch.Tensor:
    """Block-sparse attention by masking dense attention over the whole key pyramid.

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, Dv) values.
        kv_index: (B or 1, H or 1, ceil(Lq / block_q), K) key blocks, -1 for an empty slot.
        kv_level: pooling level of every entry, in [0, num_levels), shaped like `kv_index`; None: all 0.
        bias: (H or 1, block_q, block_k) additive logit bias, or None.
        block_q: query tokens per block.
        block_k: key tokens per block.
        scale: factor applied to q·k.
        num_levels: levels of the pyramid.
        causal: query i sees a key group only if the group's last real token is at or before position i.

    Returns:
        (B, H, Lq, Dv) in the dtype of q, computed in float64.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    mk = -(-lk // block_k)
    index = kv_index.long().expand(b, h, *kv_index.shape[2:])
    level = torch.zeros_like(index) if kv_level is None else kv_level.long().expand(index.shape)
    q64, k64, v64 = q.double(), k.double(), v.double()
    query_block = torch.arange(lq, device=q.device) // block_q
    logits, values = [], []
    for p in range(num_levels):
        means, counts, last = _group_means(lk, block_k, p, q.device)
        per_block = -(-block_k // (1 << p))
        key_block = torch.arange(mk * per_block, device=q.device) // per_block
        # times[b, h, i, j]: how often query block i lists key block j at level p.
        listed = ((index >= 0) & (level == p)).double()
        times = torch.zeros(b, h, index.shape[2], mk, dtype=torch.float64, device=q.device)
        times.scatter_add_(-1, index.clamp_min(0), listed)
        times = times[:, :, query_block][..., key_block]  # (B, H, Lq, G)
        logit = scale * q64 @ (means @ k64).transpose(-1, -2) + counts.double().log() + times.log()
        if bias is not None:
            column = torch.arange(per_block, device=q.device) * (1 << p)
            pooled = torch.stack(
                [bias.double()[..., c : c + (1 << p)].mean(-1) for c in column.tolist()], dim=-1
            )  # (Hb, block_q, per_block)
            logit = logit + pooled[:, torch.arange(lq, device=q.device) % block_q].repeat(1, 1, mk)
        hidden = (times == 0) | (counts == 0)
        if causal:
            hidden = hidden | (last[None, :] > torch.arange(lq, device=q.device)[:, None])
        logits.append(logit.masked_fill(hidden, -math.inf))
        values.append((means @ v64).expand(b, h, -1, -1))
    logits = torch.cat(logits, -1)
    empty = (logits == -math.inf).all(-1, keepdim=True)
    weights = torch.softmax(logits.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return (weights @ torch.cat(values, -2)).to(q.dtype)
