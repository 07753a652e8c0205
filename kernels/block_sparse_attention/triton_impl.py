"""Triton kernels for block-sparse attention, FlashAttention-style, forward and backward.

The keys and values are read from a pyramid: level 0 is K (or V) itself, level p > 0 follows it with
every key block average-pooled in groups of 2**p tokens (`ceil(block_k / 2**p)` slots per block). The
pyramid and the pooled bias are built with PyTorch ops around the kernels, so autograd carries their
gradients back to K, V and the bias; when no entry is pooled the pyramid is K itself, without a copy.

A forward program owns one BLOCK_M tile of one query block of one (batch, head) and walks the entries of
its row of the index table: for each, the listed block's slots at the entry's level are streamed straight
out of the pyramid with an online softmax, `log2(tokens in the group)` and the bias added to the logits;
neither gathered copies nor logits are materialized. It saves one log-sum-exp per query row so that the
backward recomputes the probabilities tile by tile.

The backward has two kernels, as in FlashAttention-2. dq walks the entries of a query tile (the forward's
grid). dk/dv need a sum over every query block that lists a (level, key block) unit; rather than atomics,
the index table is inverted once with a sort (for each unit, the query blocks that list it, repeats
included) so that each key tile sums its gradient in registers and stores it once. The bias gradient is
summed over query blocks in registers too, then added to an fp32 buffer with one atomic per tile, because
every (batch, head, key block) shares the bias.

Causal (`CAUSAL`): a slot is hidden from a query row that precedes its group's last real token, and a forward or
dq program skips the entries whose key block starts past its tile's last row.

Exponentials are base 2 with `scale * log2(e)` folded into the logits; the saved log-sum-exp is in that
base too. Only CUDA launches are autotuned: the interpreter (CPU) uses one fixed tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The pyramid's pooled levels are the PyTorch backend's (a deterministic reshape-and-sum; `index_add` would
# be atomics on CUDA); the oracle in reference.py pools by its own, independent means.
from .torch_impl import pool_bias_columns, pool_groups

__all__ = ["block_sparse_attention_triton", "build_pyramid", "invert_index"]

# One tile for the interpreter (CPU): 16 is the smallest size tl.dot accepts on GPUs, and small enough
# that the tests' ragged lengths cross or stay inside a tile.
_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16}
# Blocks hold 4..128 tokens (BiFormer regions: 4..64, windows: 49..64, PSA: 64 keys, 128 queries), and
# pooled blocks as few as 8: small tiles are kept for them, and pruned where the blocks are large.
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in [
        (16, 16, 2, 2),
        (32, 16, 4, 2),
        (32, 32, 4, 2),
        (64, 32, 4, 2),
        (64, 64, 4, 2),
        (64, 64, 8, 3),
        (128, 32, 8, 2),
        (128, 64, 8, 2),
    ]
]
_TUNE_KEY = ["BQ", "BK", "D", "DV"]
_LOG2E = 1.4426950408889634


def _prune(configs, named_args, **kwargs):
    """Drop tiles more than twice as tall or wide as a block: they would be mostly mask."""
    bq = max(16, triton.next_power_of_2(named_args["BQ"]))
    bk = max(16, triton.next_power_of_2(named_args["BK"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bq and c.kwargs["BLOCK_N"] <= bk]
    return kept or configs[:1]


@triton.jit
def _load_rows(ptr, rows, row_ok, cols, row_stride, n_cols):
    """Masked (rows, cols) tile of a matrix with unit column stride; padding reads 0."""
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, rows, row_ok, cols, row_stride, n_cols):
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _entry(IDX, LVL, LOFF, entry_off, NK, BK, POOLED: tl.constexpr):
    """Geometry of one index entry: (first pyramid slot, bias column offset, log2 of the group size,
    group size, valid slots, tokens of the key block, its first token). An empty entry (-1) has no valid slot."""
    kb = tl.load(IDX + entry_off).to(tl.int64)
    block_len = tl.where(kb >= 0, tl.minimum(BK, NK - kb * BK), 0)
    if POOLED:
        lvl = tl.load(LVL + entry_off).to(tl.int32)
        group = (block_len * 0 + 1) << lvl
        slots_per_block = (BK + group - 1) >> lvl
        base = tl.load(LOFF + 2 * lvl) + kb * slots_per_block
        bias_col = tl.load(LOFF + 2 * lvl + 1)
        n_slots = ((block_len + group - 1) >> lvl).to(tl.int32)  # 32-bit loop bounds
    else:
        lvl = 0
        group = 1
        base = kb * BK
        bias_col = 0
        n_slots = block_len.to(tl.int32)
    return base, bias_col, lvl, group, n_slots, block_len, kb * BK


@triton.jit
def _extra_logits(
    s, cols, col_ok, rows_in, row_ok, group, block_len, BIAS, bias_off, bias_col, sbias_row,
    POOLED: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Add log2(group's tokens) and the bias (base 2) to (BLOCK_M, BLOCK_N) logits; mask absent slots."""
    if POOLED:
        count = tl.minimum(group, block_len - cols * group)
        s += tl.log2(tl.maximum(count, 1).to(tl.float32))[None, :]
    if HAS_BIAS:
        mask = row_ok[:, None] & col_ok[None, :]
        ptr = BIAS + bias_off + rows_in[:, None] * sbias_row + (bias_col + cols)[None, :]
        s += tl.load(ptr, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _causal_logits(s, cols, rows, group, block_len, key_start):
    """Hide from each query row the slots whose group ends (last real token) past it."""
    last = key_start + tl.minimum((cols + 1) * group, block_len) - 1
    return tl.where(last[None, :] <= rows[:, None], s, float("-inf"))


@triton.jit
def _split_query_pid(pid, H, NQB):
    """Program id over B * H * NQB -> (b, h, query block), in int64 so offsets cannot wrap.

    It goes on grid axis 0 because CUDA caps axes 1 and 2 at 65535 programs.
    """
    pid = pid.to(tl.int64)
    return pid // (H * NQB), (pid // NQB) % H, pid % NQB


@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, OUT, LSE, IDX, LVL, LOFF, sq, sk, sv, so, sb, si,
    H, NQ, NK, BQ, BK, NQB, TOPK, D, DV, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    POOLED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b, h, qb = _split_query_pid(tl.program_id(0), H, NQB)
    rows_in = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qb * BQ + rows_in
    row_ok = (rows_in < BQ) & (rows < NQ)
    last_row = qb * BQ + tl.minimum((tl.program_id(1) + 1) * BLOCK_M, BQ) - 1
    offs_n, offs_d, offs_dv = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b * sq[0] + h * sq[1], rows, row_ok, offs_d, sq[2], D)
    k_head, v_head, bias_off = K + b * sk[0] + h * sk[1], V + b * sv[0] + h * sv[1], h * sb[0]
    row_entries = b * si[0] + h * si[1] + qb * si[2]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for t in range(TOPK):
        base, bias_col, lvl, group, n_slots, block_len, key_start = _entry(
            IDX, LVL, LOFF, row_entries + t * si[3], NK, BK, POOLED
        )
        if CAUSAL:  # a key block that starts past the tile's last row has nothing this tile sees
            n_slots = tl.where(key_start <= last_row, n_slots, 0)
        for start in range(0, n_slots, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < n_slots
            k = _load_rows(k_head, base + cols, col_ok, offs_d, sk[2], D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = _extra_logits(
                s, cols, col_ok, rows_in, row_ok, group, block_len, BIAS, bias_off, bias_col, sb[1], POOLED, HAS_BIAS
            )
            if CAUSAL:
                s = _causal_logits(s, cols, rows, group, block_len, key_start)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A bias of -inf can mask a whole row of a tile: keep the exponentials finite (0, not NaN).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(v_head, base + cols, col_ok, offs_dv, sv[2], DV)
            # p in the input dtype keeps the second matmul on fp16/bf16 tensor cores, as in FlashAttention.
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    # A row with no key (empty list, or all masked) outputs zeros and saves lse = +inf: its p is 0 in backward.
    empty = l_i == 0
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    _store_rows(OUT + b * so[0] + h * so[1], acc / tl.where(empty, 1.0, l_i)[:, None], rows, row_ok, offs_dv, so[2], DV)
    tl.store(LSE + (b * H + h) * NQ + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, BIAS, DO, DQ, LSE, DELTA, IDX, LVL, LOFF, sq, sk, sv, sb, sdo, sdq, si,
    H, NQ, NK, BQ, BK, NQB, TOPK, D, DV, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    POOLED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b, h, qb = _split_query_pid(tl.program_id(0), H, NQB)
    rows_in = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qb * BQ + rows_in
    row_ok = (rows_in < BQ) & (rows < NQ)
    last_row = qb * BQ + tl.minimum((tl.program_id(1) + 1) * BLOCK_M, BQ) - 1
    offs_n, offs_d, offs_dv = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b * sq[0] + h * sq[1], rows, row_ok, offs_d, sq[2], D)
    do = _load_rows(DO + b * sdo[0] + h * sdo[1], rows, row_ok, offs_dv, sdo[2], DV)
    lse = tl.load(LSE + (b * H + h) * NQ + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * NQ + rows, mask=row_ok, other=0.0)
    k_head, v_head, bias_off = K + b * sk[0] + h * sk[1], V + b * sv[0] + h * sv[1], h * sb[0]
    row_entries = b * si[0] + h * si[1] + qb * si[2]

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(TOPK):
        base, bias_col, lvl, group, n_slots, block_len, key_start = _entry(
            IDX, LVL, LOFF, row_entries + t * si[3], NK, BK, POOLED
        )
        if CAUSAL:  # a key block that starts past the tile's last row has nothing this tile sees
            n_slots = tl.where(key_start <= last_row, n_slots, 0)
        for start in range(0, n_slots, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < n_slots
            k = _load_rows(k_head, base + cols, col_ok, offs_d, sk[2], D)
            v = _load_rows(v_head, base + cols, col_ok, offs_dv, sv[2], DV)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = _extra_logits(
                s, cols, col_ok, rows_in, row_ok, group, block_len, BIAS, bias_off, bias_col, sb[1], POOLED, HAS_BIAS
            )
            if CAUSAL:
                s = _causal_logits(s, cols, rows, group, block_len, key_start)
            p = tl.exp2(s - lse[:, None])  # masked slots have s = -inf, rows without keys lse = +inf: p = 0
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ + b * sdq[0] + h * sdq[1], dq * scale, rows, row_ok, offs_d, sdq[2], D)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, DK, DV_OUT, DBIAS, LSE, DELTA, SRC, BOUNDS, LOFF,
    sq, sk, sv, sb, sdo, sdk, sdv, sdb, inv_sb, inv_sh,
    H, NQ, NK, BQ, BK, NKB, NUM_UNITS, NUM_ENTRIES, D, DV, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    POOLED: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b, h, unit = pid // (H * NUM_UNITS), (pid // NUM_UNITS) % H, pid % NUM_UNITS
    lvl = (unit // NKB).to(tl.int32)
    kb = unit % NKB
    block_len = tl.minimum(BK, NK - kb * BK)
    group = (block_len * 0 + 1) << lvl
    slots_per_block = (BK + group - 1) >> lvl
    n_slots = ((block_len + group - 1) >> lvl).to(tl.int32)
    if POOLED:
        base = tl.load(LOFF + 2 * lvl) + kb * slots_per_block
        bias_col = tl.load(LOFF + 2 * lvl + 1)
    else:
        base = kb * BK
        bias_col = 0
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_slots
    offs_m, offs_d, offs_dv = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b * sk[0] + h * sk[1], base + cols, col_ok, offs_d, sk[2], D)
    v = _load_rows(V + b * sv[0] + h * sv[1], base + cols, col_ok, offs_dv, sv[2], DV)
    if POOLED:
        count = tl.minimum(group, block_len - cols * group)
        log_count = tl.log2(tl.maximum(count, 1).to(tl.float32))
    else:
        log_count = tl.zeros([BLOCK_N], tl.float32)
    slot_last = kb * BK + tl.minimum((cols + 1) * group, block_len) - 1  # causal: the group's last real token
    q_head, do_head, bias_off = Q + b * sq[0] + h * sq[1], DO + b * sdo[0] + h * sdo[1], h * sb[0]

    # SRC[row, lo:hi] lists the query blocks whose tables name this unit (BOUNDS: offsets per unit).
    inv_row = b * inv_sb + h * inv_sh
    lo = tl.load(BOUNDS + inv_row * (NUM_UNITS + 1) + unit)
    hi = tl.load(BOUNDS + inv_row * (NUM_UNITS + 1) + unit + 1)
    hi = tl.where(tl.program_id(1) * BLOCK_N < n_slots, hi, lo)  # a tile past this level's slots: no work

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Query offsets outside, listing query blocks inside: every block's query offset `a` meets the same bias row.
    for m_start in range(0, BQ, BLOCK_M):
        rows_in = m_start + offs_m
        if HAS_BIAS:
            bias_mask = col_ok[:, None] & (rows_in < BQ)[None, :]
            bias_ptr = BIAS + bias_off + rows_in[None, :] * sb[1] + (bias_col + cols)[:, None]
            bias_t = tl.load(bias_ptr, mask=bias_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        if BIAS_GRAD:
            dbias = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for j in range(lo, hi):
            qb = tl.load(SRC + inv_row * NUM_ENTRIES + j).to(tl.int64)
            rows = qb * BQ + rows_in
            row_ok = (rows_in < BQ) & (rows < NQ)
            q = _load_rows(q_head, rows, row_ok, offs_d, sq[2], D)
            do = _load_rows(do_head, rows, row_ok, offs_dv, sdo[2], DV)
            lse = tl.load(LSE + (b * H + h) * NQ + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + (b * H + h) * NQ + rows, mask=row_ok, other=0.0)
            # Transposed probabilities (keys x queries), so both sums run along the query axis.
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + log_count[:, None]
            if HAS_BIAS:
                s_t += bias_t
            seen = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                seen = seen & (slot_last[:, None] <= rows[None, :])
            p_t = tl.where(seen, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
            if BIAS_GRAD:
                dbias += ds_t
        if BIAS_GRAD:
            dbias_ptr = DBIAS + h * sdb[0] + rows_in[None, :] * sdb[1] + (bias_col + cols)[:, None]
            tl.atomic_add(dbias_ptr, dbias, mask=col_ok[:, None] & (rows_in < BQ)[None, :], sem="relaxed")
    _store_rows(DK + b * sdk[0] + h * sdk[1], dk * scale, base + cols, col_ok, offs_d, sdk[2], D)
    _store_rows(DV_OUT + b * sdv[0] + h * sdv[1], dv, base + cols, col_ok, offs_dv, sdv[2], DV)


def _tuned(kernel, reset=None):
    return triton.autotune(
        _CUDA_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune}, reset_to_zero=reset
    )(kernel)


_fwd_tuned = _tuned(_fwd_kernel)
_bwd_dq_tuned = _tuned(_bwd_dq_kernel)
# The bias gradient is accumulated with atomics: every config the tuner tries must start from zero.
_bwd_dkdv_tuned = _tuned(_bwd_dkdv_kernel, reset=["DBIAS"])


def _launch(kernel, tuned, on_cuda: bool, grid, *args, **meta) -> None:
    """Autotuned launch on CUDA; the interpreter cannot benchmark, so it gets the fixed tile."""
    if 0 in grid(_INTERPRETER_TILE):  # nothing to compute, and CUDA rejects an empty grid
        return
    if on_cuda:
        tuned[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, **_INTERPRETER_TILE)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(q: torch.Tensor, v: torch.Tensor, pooled: bool, has_bias: bool, causal: bool) -> dict:
    # fp32 inputs follow torch's matmul setting: exact by default, tf32 when the user allowed it.
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),
        "BLOCK_DV": max(16, triton.next_power_of_2(v.shape[-1])),
        "POOLED": pooled,
        "HAS_BIAS": has_bias,
        "CAUSAL": causal,
        "PRECISION": precision,
    }


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def level_offsets(length: int, block_k: int, num_levels: int, device: torch.device) -> torch.Tensor:
    """(num_levels, 2) int64: first pyramid slot and first bias column of every level."""
    blocks, slot, col, rows = _cdiv(length, block_k), 0, 0, []
    for p in range(num_levels):
        rows.append((slot, col))
        per_block = _cdiv(block_k, 1 << p)
        slot += length if p == 0 else blocks * per_block
        col += per_block
    return torch.tensor(rows, dtype=torch.int64, device=device)


def build_pyramid(
    k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, block_k: int, num_levels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """K, V and the bias with their pooled levels appended, in the layout of `level_offsets`.

    Args:
        k: (B, H, Lk, D), v: (B, H, Lk, Dv), bias: (Hb, block_q, block_k) or None.

    Returns:
        (B, H, S, D), (B, H, S, Dv), (Hb, block_q, C) or None, with S = Lk + sum over p > 0 of
        ceil(Lk / block_k) * ceil(block_k / 2**p) slots and C = sum over p of ceil(block_k / 2**p) columns.
        With one level they are the inputs themselves.
    """
    if num_levels == 1:
        return k, v, bias
    k_pyr = torch.cat([k] + [pool_groups(k, block_k, p) for p in range(1, num_levels)], dim=2)
    v_pyr = torch.cat([v] + [pool_groups(v, block_k, p) for p in range(1, num_levels)], dim=2)
    b_pyr = None if bias is None else torch.cat([pool_bias_columns(bias, p) for p in range(num_levels)], dim=-1)
    return k_pyr, v_pyr, b_pyr


def invert_index(
    kv_index: torch.Tensor, kv_level: torch.Tensor | None, num_kv_blocks: int, num_levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (level, key block) unit, the query blocks that list it.

    Args:
        kv_index: (Bi, Hi, Mq, K) key blocks, -1 for empty slots.
        kv_level: levels shaped like kv_index, or None (all 0).
        num_kv_blocks: Mk; num_levels: levels in the pyramid.

    Returns:
        src: (Bi * Hi, Mq * K) int32 query block of each entry, sorted by unit `level * Mk + block` (stable);
            empty slots last.
        bounds: (Bi * Hi, num_levels * Mk + 1) int32; unit u's entries are src[:, bounds[:, u]:bounds[:, u + 1]].
    """
    bi, hi, _, topk = kv_index.shape
    index = kv_index.long().reshape(bi * hi, -1)
    units = num_levels * num_kv_blocks
    key = index if kv_level is None else kv_level.long().reshape(bi * hi, -1) * num_kv_blocks + index
    key = torch.where(index >= 0, key, units)
    keys, order = torch.sort(key, dim=1, stable=True)
    targets = torch.arange(units + 1, device=keys.device, dtype=keys.dtype).expand(bi * hi, -1).contiguous()
    bounds = torch.searchsorted(keys.contiguous(), targets)
    return (order // max(topk, 1)).to(torch.int32).contiguous(), bounds.to(torch.int32).contiguous()


def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, device=device, dtype=torch.float32)


def _bias_strides(bias: torch.Tensor | None, heads: int) -> tuple[int, int]:
    if bias is None:
        return 0, 0
    return (bias.stride(0) if bias.shape[0] == heads and heads > 1 else 0), bias.stride(1)


def _index_args(q: torch.Tensor, kv_index: torch.Tensor, kv_level: torch.Tensor | None):
    """Both tables broadcast to (B, H, Mq, K) with the same strides: the kernels index them with one set."""
    b, h = q.shape[:2]
    index = kv_index.contiguous().expand(b, h, *kv_index.shape[2:])
    level = index if kv_level is None else kv_level.contiguous().expand(index.shape)
    return index, level


@torch.library.custom_op("zoo::block_sparse_attention", mutates_args=())
def _bsa_forward_op(
    q: torch.Tensor,
    k_pyr: torch.Tensor,
    v_pyr: torch.Tensor,
    bias_pyr: torch.Tensor | None,
    kv_index: torch.Tensor,
    kv_level: torch.Tensor | None,
    block_q: int,
    block_k: int,
    kv_len: int,
    num_levels: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Lq, Dv), lse (B, H, Lq) fp32 in base 2) from q and the key/value/bias pyramids."""
    q, k_pyr, v_pyr = _unit_last(q), _unit_last(k_pyr), _unit_last(v_pyr)
    bias_pyr = None if bias_pyr is None else _unit_last(bias_pyr)
    b, h, nq, d = q.shape
    dv = v_pyr.shape[-1]
    nqb, topk = _cdiv(nq, block_q), kv_index.shape[-1]
    out = q.new_empty(b, h, nq, dv)
    lse = torch.empty(b, h, nq, device=q.device, dtype=torch.float32)
    index, level = _index_args(q, kv_index, kv_level)
    loff = level_offsets(kv_len, block_k, num_levels, q.device)
    meta = _meta(q, v_pyr, num_levels > 1, bias_pyr is not None, causal)
    grid = lambda m: (b * h * nqb, triton.cdiv(block_q, m["BLOCK_M"]))
    _launch(
        _fwd_kernel, _fwd_tuned, q.is_cuda, grid,
        q, k_pyr, v_pyr, _dummy(q.device) if bias_pyr is None else bias_pyr, out, lse, index, level, loff,
        q.stride()[:3], k_pyr.stride()[:3], v_pyr.stride()[:3], out.stride()[:3], _bias_strides(bias_pyr, h),
        index.stride(), h, nq, kv_len, block_q, block_k, nqb, topk, d, dv, scale * _LOG2E, **meta,
    )  # fmt: skip
    return out, lse


@_bsa_forward_op.register_fake
def _(q, k_pyr, v_pyr, bias_pyr, kv_index, kv_level, block_q, block_k, kv_len, num_levels, scale, causal):
    b, h, nq, _ = q.shape
    return q.new_empty(b, h, nq, v_pyr.shape[-1]), q.new_empty(b, h, nq, dtype=torch.float32)


@torch.library.custom_op("zoo::block_sparse_attention_backward", mutates_args=())
def _bsa_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k_pyr: torch.Tensor,
    v_pyr: torch.Tensor,
    bias_pyr: torch.Tensor | None,
    kv_index: torch.Tensor,
    kv_level: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_q: int,
    block_k: int,
    kv_len: int,
    num_levels: int,
    scale: float,
    causal: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk_pyr, dv_pyr, dbias_pyr); dbias_pyr is empty unless `bias_grad`."""
    q, k_pyr, v_pyr, dout = _unit_last(q), _unit_last(k_pyr), _unit_last(v_pyr), _unit_last(dout)
    bias_pyr = None if bias_pyr is None else _unit_last(bias_pyr)
    b, h, nq, d = q.shape
    dv_dim = v_pyr.shape[-1]
    nqb, nkb, topk = _cdiv(nq, block_q), _cdiv(kv_len, block_k), kv_index.shape[-1]
    # delta = rowsum(dO * O) is the softmax-backward correction term, shared by both kernels.
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty_like(q)
    # Level 0 is covered slot by slot; pooled levels have slots no key token fills (short last block).
    alloc = torch.empty_like if num_levels == 1 else torch.zeros_like
    dk, dv = alloc(k_pyr), alloc(v_pyr)
    bias_arg = _dummy(q.device) if bias_pyr is None else bias_pyr
    dbias = torch.zeros(bias_pyr.shape, device=q.device, dtype=torch.float32) if bias_grad else _dummy(q.device)
    index, level = _index_args(q, kv_index, kv_level)
    loff = level_offsets(kv_len, block_k, num_levels, q.device)
    meta = _meta(q, v_pyr, num_levels > 1, bias_pyr is not None, causal)
    grid_q = lambda m: (b * h * nqb, triton.cdiv(block_q, m["BLOCK_M"]))
    _launch(
        _bwd_dq_kernel, _bwd_dq_tuned, q.is_cuda, grid_q,
        q, k_pyr, v_pyr, bias_arg, dout, dq, lse, delta, index, level, loff,
        q.stride()[:3], k_pyr.stride()[:3], v_pyr.stride()[:3], _bias_strides(bias_pyr, h), dout.stride()[:3],
        dq.stride()[:3], index.stride(), h, nq, kv_len, block_q, block_k, nqb, topk, d, dv_dim,
        scale * _LOG2E, scale, **meta,
    )  # fmt: skip
    bi, hi = kv_index.shape[:2]
    src, bounds = invert_index(kv_index, kv_level, nkb, num_levels)
    units = num_levels * nkb
    grid_k = lambda m: (b * h * units, triton.cdiv(block_k, m["BLOCK_N"]))
    _launch(
        _bwd_dkdv_kernel, _bwd_dkdv_tuned, q.is_cuda, grid_k,
        q, k_pyr, v_pyr, bias_arg, dout, dk, dv, dbias, lse, delta, src, bounds, loff,
        q.stride()[:3], k_pyr.stride()[:3], v_pyr.stride()[:3], _bias_strides(bias_pyr, h), dout.stride()[:3],
        dk.stride()[:3], dv.stride()[:3], _bias_strides(dbias if bias_grad else None, h),
        hi if bi > 1 else 0, 1 if hi > 1 else 0,
        h, nq, kv_len, block_q, block_k, nkb, units, src.shape[1], d, dv_dim, scale * _LOG2E, scale,
        BIAS_GRAD=bias_grad, **meta,
    )  # fmt: skip
    dbias = dbias.to(bias_pyr.dtype) if bias_grad else q.new_empty(0)
    return dq, dk, dv, dbias


@_bsa_backward_op.register_fake
def _(
    dout, q, k_pyr, v_pyr, bias_pyr, kv_index, kv_level, out, lse, block_q, block_k, kv_len, levels, scale, causal, bg
):
    dbias = torch.empty_like(bias_pyr) if bg else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k_pyr), torch.empty_like(v_pyr), dbias


def _setup_context(ctx, inputs, output):
    q, k_pyr, v_pyr, bias_pyr, kv_index, kv_level, block_q, block_k, kv_len, num_levels, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k_pyr, v_pyr, bias_pyr, kv_index, kv_level, out, lse)
    ctx.args = (block_q, block_k, kv_len, num_levels, scale, causal)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k_pyr, v_pyr, bias_pyr, kv_index, kv_level, out, lse = ctx.saved_tensors
    bias_grad = bias_pyr is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _bsa_backward_op(
        dout, q, k_pyr, v_pyr, bias_pyr, kv_index, kv_level, out, lse, *ctx.args, bias_grad
    )
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None, None, None, None, None


_bsa_forward_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention_triton(
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
    """Block-sparse attention with Triton kernels (differentiable in q, k, v and bias).

    Inputs are assumed checked (see `zoo.kernels.block_sparse_attention.block_sparse_attention`); indices and
    levels are not bounds-checked here. Arguments as in `block_sparse_attention_reference`; fp32, fp16 or
    bf16 inputs with fp32 accumulation. With `num_levels == 1`, `kv_level` is ignored.

    Returns:
        (B, H, Lq, Dv) in the dtype of q.
    """
    kv_level = None if num_levels == 1 else kv_level
    if kv_level is None and num_levels > 1:
        num_levels = 1
    k_pyr, v_pyr, bias_pyr = build_pyramid(k, v, bias, block_k, num_levels)
    pyramid = (k_pyr, v_pyr, bias_pyr)
    out, _ = _bsa_forward_op(
        q, *pyramid, kv_index, kv_level, block_q, block_k, k.shape[2], num_levels, float(scale), bool(causal)
    )
    return out
