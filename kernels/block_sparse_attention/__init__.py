"""Block-sparse attention: query blocks attend to listed key/value blocks, each at a pooling level.

The one attention op behind the zoo's sparse mixers: BiFormer's routed regions (one index row per query
region), windows (every block lists itself, with a relative-position bias), pooled keys/values, and Pyramid
Sparse Attention (a level per (query block, key block) pair). Mixers are translators: they build the index
and level tables and call `block_sparse_attention`, which checks its inputs once and runs one backend:

- `reference` (`reference.py`): the definition, a masked dense form; the oracle of the tests;
- `flex` (`torch_impl.py`): FlexAttention with a block mask built from the tables;
- `gather` (`torch_impl.py`): the listed slots gathered, fused SDPA on them, in slabs in inference;
- `masked` (`torch_impl.py`): one fused SDPA over the whole key pyramid under an additive block mask (dense
  arithmetic: the fastest form on short sequences, where gathering costs more than it saves);
- `triton` (`triton_impl.py`): FlashAttention-style kernels that stream the listed blocks.

`ZOO_KERNELS` forces one (`torch`: the fastest of flex, gather and masked for the call); `auto` takes the measured
choice (`_backend_for`). Which path ran is logged at debug level on the "zoo.kernels" logger.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from .._backend import kernel_backend, needs_grad, select_backend
from .reference import block_sparse_attention_reference
from .torch_impl import (
    EXPLICIT_MAX_LOGITS,
    FlexCompileError,
    block_sparse_attention_flex,
    block_sparse_attention_gather,
    block_sparse_attention_masked,
    flex_available,
)

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_flex",
    "block_sparse_attention_gather",
    "block_sparse_attention_masked",
    "block_sparse_attention_reference",
    "tables_from_level_map",
]

OP_BACKENDS = ("reference", "torch", "flex", "gather", "masked", "triton")
# FlexAttention's compiled CPU kernel walks key blocks one at a time: below this many tokens per block (BiFormer's
# 4- and 16-token regions) the gathered slots with one fused SDPA are faster (benchmarks/sparse_attention_cpu.py).
_FLEX_MIN_BLOCK = 32


# On the CPU, a call whose masked dense form holds at most this many (query, pyramid key) pairs per head takes
# it: gathering costs more than the keys it saves there. Training: BiFormer's 196-token third stage (4-token
# regions, a third routed: 38,416 pairs) 2x faster masked; its 784-token second stage (a twelfth routed) 2-3x
# faster gathered. In inference the gathered form of short query blocks needs no empty-row guard without a mask,
# and BiFormer's third stage runs as fast or faster gathered (its BRA layer, 2 threads: -T/S 13.5 -> 12.5 ms, -B
# 22.7 -> 22.6 ms; 1 thread 3.5% faster), so the inference bound lies below it; smaller calls were not measured
# again and keep the masked form.
_MASKED_MAX_PAIRS = 2**16
_MASKED_MAX_PAIRS_INFERENCE = 2**15


def _masked_pairs(lq: int, lk: int, block_k: int, num_levels: int) -> int:
    """(query, key) pairs of the masked form: Lq times the pyramid of every level."""
    blocks = -(-lk // block_k)
    return lq * sum(blocks * -(-block_k // (1 << p)) for p in range(num_levels))


def _torch_form(
    device: str, grad: bool, block_q: int, block_k: int, pooled: bool, pairs: int = 0, narrow: bool = False
) -> str:
    """The fastest PyTorch form, as measured (benchmarks/sparse_attention_cpu.py, benchmarks/biformer_vs_official.py):
    on the CPU the masked dense form for small calls (`pairs` up to `_MASKED_MAX_PAIRS`, in inference
    `_MASKED_MAX_PAIRS_INFERENCE`); gather in CPU inference for `narrow` rows (unmasked, at most
    `EXPLICIT_MAX_LOGITS` logits per query block); FlexAttention where it
    has the pass, the blocks are large enough and no entry is pooled (pooled slots of several key blocks share one
    of its mask blocks, so the gathered slots with one fused SDPA are faster on the CPU); else gather."""
    if device == "cpu" and pairs <= (_MASKED_MAX_PAIRS if grad else _MASKED_MAX_PAIRS_INFERENCE):
        return "masked"
    if not flex_available() or min(block_q, block_k) < _FLEX_MIN_BLOCK:
        return "gather"
    if device == "cpu" and not grad and narrow:
        # Written out (EXPLICIT_MAX_LOGITS) the gathered form beats FlexAttention: BiFormer's first stage (64-token
        # regions, one routed) BRA layer at 2 threads 37.7 -> 30.9 ms (-B), 24.0 -> 21.5 ms (-T/S).
        return "gather"
    if device == "cuda":
        # Inductor's CUDA FlexAttention tiles blocks by powers of two (it rejects 48- or 49-token blocks).
        return "flex" if all(n & (n - 1) == 0 for n in (block_q, block_k)) else "gather"
    if device == "cpu" and not grad and not pooled:  # torch 2.14: no FlexAttention backward on the CPU
        return "flex"
    return "gather"


def _backend_for(q, k, v, kv_index, bias, block_q: int, block_k: int, num_levels: int, causal: bool) -> str:
    pooled = num_levels > 1
    pairs = _masked_pairs(q.shape[2], k.shape[2], block_k, num_levels)
    # Unmasked rows short enough for the gathered form's written-out attention (no bias, one level, not causal).
    narrow = (
        bias is None and not pooled and not causal and block_q * kv_index.shape[-1] * block_k <= EXPLICIT_MAX_LOGITS
    )

    def auto(device: str, grad: bool) -> str:
        from .._backend import triton_available

        if device == "cuda" and triton_available():
            return "triton"  # the peer of FlexAttention on CUDA: benchmarks/gpu.sh measures both
        return _torch_form(device, grad, block_q, block_k, pooled, pairs, narrow)

    inputs = [t for t in (q, k, v, bias) if t is not None]  # a bias that requires grad makes it training too
    backend = select_backend("block_sparse_attention", *inputs, backends=OP_BACKENDS, auto=auto)
    if backend == "torch":
        device = "cuda" if q.is_cuda else q.device.type
        backend = _torch_form(device, needs_grad(q, k, v, bias), block_q, block_k, pooled, pairs, narrow)
        if not torch.compiler.is_compiling():
            logging.getLogger("zoo.kernels").debug("block_sparse_attention: torch path is %s", backend)
    if backend in ("flex", "triton") and q.device.type == "meta":
        # Shapes only (model construction, FLOP counting): neither FlexAttention nor Triton takes meta tensors,
        # and the gather path computes the same shapes (and counts the listed blocks' arithmetic).
        return "gather"
    if backend == "flex" and q.device.type == "cpu" and needs_grad(q, k, v, bias):
        raise RuntimeError(
            "ZOO_KERNELS=flex: torch's FlexAttention has no backward on the CPU; use gather (or auto) to train"
        )
    return backend


def _is_int(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_inputs(q, k, v, kv_index, kv_level, bias, block_q, block_k, num_levels) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "block_sparse_attention expects q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"block_sparse_attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(q and k share B, H and D; k and v share B, H and Lk)"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, size in (("block_q", block_q), ("block_k", block_k), ("num_levels", num_levels)):
        if isinstance(size, bool) or not (isinstance(size, int) and size > 0):
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    b, h, lq, _ = q.shape
    mq, mk = -(-lq // block_q), -(-k.shape[2] // block_k)
    if (
        kv_index.dim() != 4
        or kv_index.shape[0] not in (1, b)
        or kv_index.shape[1] not in (1, h)
        or kv_index.shape[2] != mq
    ):
        raise ValueError(
            f"block_sparse_attention expects kv_index (B or 1, H or 1, ceil(Lq / block_q), K) with B = {b}, "
            f"H = {h}, ceil(Lq / block_q) = {mq}; got {tuple(kv_index.shape)}"
        )
    for name, t in (("kv_index", kv_index), ("kv_level", kv_level), ("bias", bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q, k, v are on {q.device}: move it to {q.device}")
    if kv_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_index must be int32 or int64, got {kv_index.dtype}")
    if kv_level is not None:
        if kv_level.shape != kv_index.shape:
            raise ValueError(
                f"kv_level must have the shape of kv_index {tuple(kv_index.shape)}, got {tuple(kv_level.shape)}"
            )
        if not _is_int(kv_level.dtype):
            raise ValueError(f"kv_level must be an integer tensor, got {kv_level.dtype}")
    if bias is not None:
        if bias.dim() != 3 or bias.shape[0] not in (1, h) or tuple(bias.shape[1:]) != (block_q, block_k):
            raise ValueError(
                f"block_sparse_attention expects bias (H or 1, block_q, block_k) = ({h} or 1, {block_q}, {block_k}), "
                f"got {tuple(bias.shape)}"
            )
        if not bias.dtype.is_floating_point:
            raise ValueError(f"bias must be a floating tensor, got {bias.dtype}")
    # Value checks need a device sync on CUDA (and values on meta, and a graph break when compiled): CPU only.
    if kv_index.device.type == "cpu" and not torch.compiler.is_compiling() and kv_index.numel():
        lo, hi = int(kv_index.min()), int(kv_index.max())
        if lo < -1 or hi >= mk:
            raise ValueError(f"kv_index values must lie in [-1, {mk}) (-1: empty slot), got range [{lo}, {hi}]")
        if kv_level is not None:
            lo, hi = int(kv_level.min()), int(kv_level.max())
            if lo < 0 or hi >= num_levels:
                raise ValueError(
                    f"kv_level values must lie in [0, num_levels = {num_levels}) (level p pools 2**p tokens; an empty "
                    f"slot is -1 in kv_index, not in kv_level), got range [{lo}, {hi}]"
                )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_index: torch.Tensor,
    kv_level: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    block_q: int,
    block_k: int,
    scale: float | None = None,
    num_levels: int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Each query block attends, under one softmax, to the key/value blocks its index row lists.

    Tokens are grouped in order: query block i holds queries [i * block_q, (i + 1) * block_q), key block j
    keys [j * block_k, (j + 1) * block_k); the last block of each may be shorter. An entry at level p reads
    its key block average-pooled in groups of 2**p tokens, each pooled logit raised by log(group tokens).
    Causal, query i (its position in q; q and k aligned at their first token, as torch's `is_causal`) sees key
    j only if j <= i, and a pooled group only once its last real token is at or before i, as the official causal
    PSA kernel decides. With every block listed at level 0 that is `scaled_dot_product_attention(is_causal=True)`.

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, Dv) values.
        kv_index: (B or 1, H or 1, ceil(Lq / block_q), K) int32/int64 key blocks per query block, -1 for an
            empty slot; repeats count every time. K may be 0.
        kv_level: pooling level per entry, shaped like kv_index, in [0, num_levels); None: all 0.
        bias: (H or 1, block_q, block_k) additive logit bias, indexed by (query offset in its block, key offset
            in its block) for every listed pair; averaged over each group's columns at pooled levels. Cast to
            the dtype of q.
        block_q: query tokens per block.
        block_k: key tokens per block.
        scale: logit scale; defaults to D ** -0.5.
        num_levels: levels in the pyramid; defaults to 1 + max(kv_level) (a device sync; pass it explicitly
            on CUDA and under torch.compile).
        causal: hide from every query the keys (and pooled groups) that end after it.

    Returns:
        (B, H, Lq, Dv); zero rows for query blocks without entries (and, causal, for queries that see none).
    """
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if num_levels is None:
        num_levels = 1 if kv_level is None or kv_level.numel() == 0 else max(int(kv_level.max()) + 1, 1)
    _check_inputs(q, k, v, kv_index, kv_level, bias, block_q, block_k, num_levels)
    # From level `top` on, a pooling group holds a whole key block: higher levels are the same level (same means,
    # counts and bias columns), so they are computed as `top` (a level of 40 would otherwise size buffers by 2**40).
    top = (block_k - 1).bit_length()
    if num_levels > top + 1:
        num_levels = top + 1
        kv_level = None if kv_level is None else kv_level.clamp(max=top)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if bias is not None:
        bias = bias.to(q.dtype)
    if kv_level is not None and num_levels == 1:
        kv_level = None
    args = (q, k, v, kv_index, kv_level, bias, block_q, block_k, scale, num_levels, causal)
    if 0 in (q.shape[0], q.shape[1], q.shape[2], kv_index.shape[-1], k.shape[2]):  # nothing to attend to
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        # Kept in the graph (zero gradients, from empty slices: no NaN from inf inputs) so that a backward
        # through it works as through any other call.
        if needs_grad(q, k, v, bias):
            out = out + sum(t.flatten()[:0].sum() for t in (q, k, v, bias) if t is not None)
        return out
    backend = _backend_for(q, k, v, kv_index, bias, block_q, block_k, num_levels, causal)
    if backend == "triton":
        from .triton_impl import block_sparse_attention_triton

        return block_sparse_attention_triton(*args)
    if backend == "flex":
        try:
            return block_sparse_attention_flex(*args)
        except FlexCompileError:
            if kernel_backend() == "flex":  # asked for by name: say so
                raise
            # Chosen for speed: the gather path computes the same, and `auto` no longer picks FlexAttention.
            warnings.warn(
                "block_sparse_attention: FlexAttention could not be compiled here; using the gather backend "
                "(set ZOO_KERNELS=gather to silence this)",
                RuntimeWarning,
                stacklevel=2,
            )
            return block_sparse_attention_gather(*args)
    if backend == "gather":
        return block_sparse_attention_gather(*args)
    if backend == "masked":
        return block_sparse_attention_masked(*args)
    return block_sparse_attention_reference(*args)


def tables_from_level_map(level_map: torch.Tensor, max_entries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and level tables from a dense map of levels per (query block, key block) pair.

    This is how a per-pair plan such as Pyramid Sparse Attention's becomes the op's input: every key block
    with a level >= 0 is listed, in increasing block order, and the rest of the row is empty (-1).

    Args:
        level_map: (B, H, Mq, Mk) integers: -1 skips the pair, p >= 0 attends to the key block at level p.
        max_entries: table width K; defaults to Mk (no data-dependent shape). Rows listing more are cut.

    Returns:
        kv_index, kv_level: (B, H, Mq, K) int32.
    """
    keep = level_map >= 0
    width = level_map.shape[-1] if max_entries is None else max_entries
    # A stable sort of "not kept" puts the kept blocks first, in increasing block order.
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[..., :width]
    kept = keep.gather(-1, order)
    kv_index = torch.where(kept, order, -1).to(torch.int32)
    kv_level = torch.where(kept, level_map.gather(-1, order), 0).to(torch.int32)
    if width > kv_index.shape[-1]:  # wider than the key blocks: empty slots
        pad = width - kv_index.shape[-1]
        kv_index, kv_level = F.pad(kv_index, (0, pad), value=-1), F.pad(kv_level, (0, pad))
    return kv_index, kv_level
