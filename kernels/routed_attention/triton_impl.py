"""Triton kernels for routed attention, FlashAttention-style, forward and backward.

A forward program owns one BLOCK_M tile of one query region of one (batch, head) and streams the
tokens of its routed key regions straight out of K and V by index, with an online softmax: neither
gathered K/V copies nor the logits are ever materialized. It saves one log-sum-exp per query row
so the backward can recompute the probabilities tile by tile.

The backward has two kernels, as in FlashAttention-2. dq walks the routed key tiles of a query
tile (the forward's grid). dk/dv need a sum over every query region routed to a key region; rather
than atomics, the routing is inverted once with a sort (for each key region, the query regions
that name it, repeats included) so that each key tile sums its gradient in registers and stores it
once: deterministic, no zero-filled fp32 buffers, and safe to autotune (reruns only overwrite).

All exponentials are base 2 with `scale * log2(e)` folded into the logits; the saved log-sum-exp
is in that base too. Only CUDA launches are autotuned: the interpreter uses one fixed tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["routed_attention_triton"]

# One tile for the interpreter (CPU): 16 is the smallest size tl.dot accepts on GPUs, and small
# enough that the tests' lengths 17 or 5 cross or stay inside a tile.
_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16}
# Regions hold few tokens (49 or 64 in BiFormer), so tiles larger than 128 would be mostly mask.
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2)]
]
_TUNE_KEY = ["LQ", "LK", "BLOCK_D", "BLOCK_DV"]
_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptr, rows, cols, row_stride, n_rows, n_cols):
    """Masked (rows, cols) tile of a row-major matrix with unit column stride; padding reads 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, value, rows, cols, row_stride, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_pid(pid, H, R):
    """Program id over B * H * R -> (b, h, r), in int64 so offsets of large tensors cannot wrap.

    B * H * R goes on grid axis 0 because CUDA caps axes 1 and 2 at 65535 programs.
    """
    pid = pid.to(tl.int64)
    return pid // (H * R), (pid // R) % H, pid % R


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, IDX, sq, sk, sv, so, si,
    H, R, TOPK, LQ, LK, D, DV, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    b, h, r = _split_pid(tl.program_id(0), H, R)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d, offs_dv = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * sq[0] + h * sq[1] + r * sq[2], rows, offs_d, sq[3], LQ, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for t in range(TOPK):
        kr = tl.load(IDX + b * si[0] + r * si[1] + t * si[2]).to(tl.int64)
        k_base = K + b * sk[0] + h * sk[1] + kr * sk[2]
        v_base = V + b * sv[0] + h * sv[1] + kr * sv[2]
        for start in range(0, LK, BLOCK_N):
            cols = start + offs_n
            k = _load_tile(k_base, cols, offs_d, sk[3], LK, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            # Every tile holds at least one real column, so m_new stays finite.
            s = tl.where(cols[None, :] < LK, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_tile(v_base, cols, offs_dv, sv[3], LK, DV)
            # p in the input dtype keeps the second matmul on fp16/bf16 tensor cores, as in FlashAttention.
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    # An empty routing list (topk == 0) leaves l_i == 0: zero rows, as in the reference.
    l_i = tl.where(l_i > 0, l_i, 1.0)
    _store_tile(OUT + b * so[0] + h * so[1] + r * so[2], acc / l_i[:, None], rows, offs_dv, so[3], LQ, DV)
    tl.store(LSE + ((b * H + h) * R + r) * LQ + rows, m_i + tl.log2(l_i), mask=rows < LQ)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, IDX, sq, sk, sv, sdo, sdq, si,
    H, R, TOPK, LQ, LK, D, DV, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    b, h, r = _split_pid(tl.program_id(0), H, R)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d, offs_dv = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * sq[0] + h * sq[1] + r * sq[2], rows, offs_d, sq[3], LQ, D)
    do = _load_tile(DO + b * sdo[0] + h * sdo[1] + r * sdo[2], rows, offs_dv, sdo[3], LQ, DV)
    row_base = ((b * H + h) * R + r) * LQ
    lse = tl.load(LSE + row_base + rows, mask=rows < LQ, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=rows < LQ, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(TOPK):
        kr = tl.load(IDX + b * si[0] + r * si[1] + t * si[2]).to(tl.int64)
        k_base = K + b * sk[0] + h * sk[1] + kr * sk[2]
        v_base = V + b * sv[0] + h * sv[1] + kr * sv[2]
        for start in range(0, LK, BLOCK_N):
            cols = start + offs_n
            k = _load_tile(k_base, cols, offs_d, sk[3], LK, D)
            v = _load_tile(v_base, cols, offs_dv, sv[3], LK, DV)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            # Padded columns have s = 0, and exp2(-lse) may overflow: zero them rather than trust k = 0.
            p = tl.where(cols[None, :] < LK, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ + b * sdq[0] + h * sdq[1] + r * sdq[2], dq * scale, rows, offs_d, sdq[3], LQ, D)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DKEY, DVAL, LSE, DELTA, SRC, BOUNDS, sq, sk, sv, sdo, sdk, sdv,
    H, R, RK, TOPK, LQ, LK, D, DV, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    b, h, kr = _split_pid(tl.program_id(0), H, RK)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m, offs_d, offs_dv = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    k = _load_tile(K + b * sk[0] + h * sk[1] + kr * sk[2], cols, offs_d, sk[3], LK, D)
    v = _load_tile(V + b * sv[0] + h * sv[1] + kr * sv[2], cols, offs_dv, sv[3], LK, DV)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # SRC[b, lo:hi] lists the query regions routed to key region kr (BOUNDS: offsets per key region).
    lo = tl.load(BOUNDS + b * (RK + 1) + kr)
    hi = tl.load(BOUNDS + b * (RK + 1) + kr + 1)
    for j in range(lo, hi):
        r = tl.load(SRC + b * R * TOPK + j).to(tl.int64)
        q_base = Q + b * sq[0] + h * sq[1] + r * sq[2]
        do_base = DO + b * sdo[0] + h * sdo[1] + r * sdo[2]
        row_base = ((b * H + h) * R + r) * LQ
        for start in range(0, LQ, BLOCK_M):
            rows = start + offs_m
            q = _load_tile(q_base, rows, offs_d, sq[3], LQ, D)
            do = _load_tile(do_base, rows, offs_dv, sdo[3], LQ, DV)
            lse = tl.load(LSE + row_base + rows, mask=rows < LQ, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=rows < LQ, other=0.0)
            # Transposed probabilities (keys x queries), so both sums run along the query axis.
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            p_t = tl.where(rows[None, :] < LQ, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    _store_tile(DKEY + b * sdk[0] + h * sdk[1] + kr * sdk[2], dk * scale, cols, offs_d, sdk[3], LK, D)
    _store_tile(DVAL + b * sdv[0] + h * sdv[1] + kr * sdv[2], dv, cols, offs_dv, sdv[3], LK, DV)


_fwd_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY)(_fwd_kernel)
_bwd_dq_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY)(_bwd_dq_kernel)
_bwd_dkdv_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY)(_bwd_dkdv_kernel)


def _launch(kernel, tuned, on_cuda: bool, grid, *args, **meta) -> None:
    """Autotuned launch on CUDA; the interpreter cannot benchmark, so it gets the fixed tile."""
    if 0 in grid(_INTERPRETER_TILE):  # empty batch/regions/queries: nothing to write, and CUDA rejects it
        return
    if on_cuda:
        tuned[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, **_INTERPRETER_TILE)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(q: torch.Tensor, v: torch.Tensor) -> dict:
    # fp32 inputs follow torch's matmul setting: exact by default, tf32 when the user allowed it.
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),
        "BLOCK_DV": max(16, triton.next_power_of_2(v.shape[-1])),
        "PRECISION": precision,
    }


def _invert_routing(region_index: torch.Tensor, num_kv_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch, the query regions routed to each key region, grouped by key region.

    Args:
        region_index: (B, R, topk) key region of each routing entry.
        num_kv_regions: Rk.

    Returns:
        src: (B, R * topk) int32 query region of each entry, sorted by key region (stable).
        bounds: (B, Rk + 1) int32; the entries of key region j are src[:, bounds[:, j]:bounds[:, j + 1]].
    """
    b, _, topk = region_index.shape
    keys, order = torch.sort(region_index.reshape(b, -1), dim=1, stable=True)
    targets = torch.arange(num_kv_regions + 1, device=keys.device, dtype=keys.dtype).expand(b, -1).contiguous()
    bounds = torch.searchsorted(keys.contiguous(), targets)
    return (order // max(topk, 1)).to(torch.int32).contiguous(), bounds.to(torch.int32).contiguous()


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, region_index, scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        b, h, r, lq, d = q.shape
        rk, lk, dv = k.shape[2], k.shape[3], v.shape[-1]
        out = q.new_empty(b, h, r, lq, dv)
        lse = torch.empty(b, h, r, lq, device=q.device, dtype=torch.float32)
        meta = _meta(q, v)
        grid = lambda m: (b * h * r, triton.cdiv(lq, m["BLOCK_M"]))
        _launch(
            _fwd_kernel, _fwd_tuned, q.is_cuda, grid,
            q, k, v, out, lse, region_index, q.stride()[:4], k.stride()[:4], v.stride()[:4], out.stride()[:4],
            region_index.stride(), h, r, region_index.shape[-1], lq, lk, d, dv, scale * _LOG2E, **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, region_index, out, lse)
        ctx.scale, ctx.num_kv_regions = scale, rk
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, region_index, out, lse = ctx.saved_tensors
        scale, rk = ctx.scale, ctx.num_kv_regions
        dout = _unit_last(dout)
        b, h, r, lq, d = q.shape
        lk, dv_dim, topk = k.shape[3], v.shape[-1], region_index.shape[-1]
        # delta = rowsum(dO * O) is the softmax-backward correction term, shared by both kernels.
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = _meta(q, v)
        grid_q = lambda m: (b * h * r, triton.cdiv(lq, m["BLOCK_M"]))
        _launch(
            _bwd_dq_kernel, _bwd_dq_tuned, q.is_cuda, grid_q,
            q, k, v, dout, dq, lse, delta, region_index,
            q.stride()[:4], k.stride()[:4], v.stride()[:4], dout.stride()[:4], dq.stride()[:4], region_index.stride(),
            h, r, topk, lq, lk, d, dv_dim, scale * _LOG2E, scale, **meta,
        )  # fmt: skip
        src, bounds = _invert_routing(region_index, rk)
        grid_k = lambda m: (b * h * rk, triton.cdiv(lk, m["BLOCK_N"]))
        _launch(
            _bwd_dkdv_kernel, _bwd_dkdv_tuned, q.is_cuda, grid_k,
            q, k, v, dout, dk, dv, lse, delta, src, bounds,
            q.stride()[:4], k.stride()[:4], v.stride()[:4], dout.stride()[:4], dk.stride()[:4], dv.stride()[:4],
            h, r, rk, topk, lq, lk, d, dv_dim, scale * _LOG2E, scale, **meta,
        )  # fmt: skip
        return dq, dk, dv, None, None


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
    return _RoutedAttention.apply(q, k, v, region_index, float(scale))
