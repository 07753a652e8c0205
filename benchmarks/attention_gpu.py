"""Block-sparse attention on a CUDA GPU: the Triton kernels against dense SDPA (FlashAttention) and against
FlexAttention on the same block masks, BiFormer's routed attention against gather-then-SDPA, and PSA at the
attention shape of Wan2.1-1.3B at 480p. Writes the "attention_gpu" section of BENCHMARKS.md.

    bash benchmarks/gpu.sh [--quick]                  # the CUDA tests, then this: within 8 minutes on one H100
    python -m benchmarks.attention_gpu [--quick] [--stages sparse psa bra patterns] [--budget 300]
    python -m benchmarks.attention_gpu --smoke        # tiny shapes on the CPU, every code path; writes nothing

Every stage runs in a process of its own under a time budget: a stage short of time stops between
measurements and keeps what it measured, one that hangs is killed at its budget, and a CUDA error (which
poisons its context) ends that stage only. Each measurement is appended to a JSON-lines file as it is
made, and the section is rendered from that file after every stage, so a run cut short keeps its figures.

Measured in bf16 with `triton.testing.do_bench` (CUDA events, median, L2 flushed before each run); forward
under `torch.no_grad()`, forward+backward as `torch.autograd.grad` of the output; peak memory is the
allocator's high-water mark of one call above what was allocated before it.

- sparse: B = 1, 16 heads, blocks of 128 x 128 tokens (FlexAttention's own block size, which all its default
  tiles divide; `--block-k 64` gives PSA's key blocks), distinct random key blocks per (head, query block);
  4k/16k/64k tokens, head dims 64/128, 5/10/25/50% of the key blocks kept. Paths: dense
  `F.scaled_dot_product_attention` on the FlashAttention backend; the Triton kernels
  (`block_sparse_attention_triton`, autotuned); FlexAttention (`torch.compile(flex_attention)`) on a BlockMask
  built once from the same table, i.e. the kernel alone; the zoo's FlexAttention backend
  (`block_sparse_attention_flex`, which builds its BlockMask from the tables in every call). TFLOP/s count the
  kept blocks only: 4 * bq * bk * D per listed (query block, key block) pair forward, 3.5x that forward +
  backward (FlashAttention-2's accounting, the same for every path).
- psa: Wan2.1-1.3B at 480p (832 x 480, 81 frames: latent 21 x 60 x 104, patch (1, 2, 2): 21 x 30 x 52 =
  32,760 tokens; 12 heads of 128; diffusers' Wan2.1-T2V-1.3B transformer config), `PSAConfig()` defaults.
  Dense SDPA; the op (`pyramid_sparse_attention`) on the planned levels through the Triton and the
  FlexAttention backends; `PyramidSparseAttention` end to end (reorder, plan, op, restore; Triton); the
  planning alone. TFLOP/s count the kept slots (a key block pooled 2**p-fold has ceil(bk / 2**p) slots).
- bra: BiFormer-T's routing stages (49 regions, head dim 32; 2/4/8 heads; 64/16/4 tokens per region; topk
  1/4/16) at 224 x 224, batch 128, and at 896 x 896, batch 8: the op as `BiLevelRoutingAttention` calls it
  (one block per region, index shared by the heads; Triton) against gathering the routed regions' K/V with
  `torch.gather` and calling SDPA on (B, heads * regions, tokens, D) x (..., topk * tokens, D).
- patterns: the video sparse-attention patterns (STA, GNA, Radial; `zoo.blocks.sparse_patterns`) at the settings
  nearest 10% and 30% density, on a 20 x 32 x 48 = 30,720-token grid (near Wan 480p's 32,760, divisible by
  the 4 x 8 x 8 tiles), 12 heads of 128, against dense SDPA; Triton backend; forward, then forward+backward.

Trimmed to fit 8 minutes with the CUDA tests (FlexAttention compiles once per shape and pass, the Triton
launches autotune once per block shape and head dim): 8k and 32k tokens, 100% density, B > 1 and fp16 in
the sweep; window attention; head dims other than 128 for PSA. `--quick` keeps 16k tokens, head dim 128, 10
and 50% in the sweep, the 224 x 224 BRA stages, and the op and dense rows of PSA.
"""

from __future__ import annotations

if not __package__:  # run as a file, `benchmarks` and `tests` would not import
    raise SystemExit("run from the repository root as: python -m benchmarks.attention_gpu [args]")

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "attention_gpu"
STAGES = ("env", "sparse", "psa", "bra", "patterns")
TARGETS = (
    "on kept blocks at least 70% of dense SDPA's TFLOP/s, and no slower than FlexAttention on the same block mask "
    "(issue 16)"
)
DENSE_FRACTION_TARGET = 0.70
SPARSE_BACKENDS = ("dense", "triton", "flex", "flex_op")
BACKEND_NAMES = {
    "dense": "dense SDPA (flash)",
    "triton": "Triton",
    "flex": "FlexAttention (BlockMask built once)",
    "flex_op": "zoo flex backend (mask per call)",
    "gather_sdpa": "gather-then-SDPA",
}
# Relative difference between two bf16 paths above which a row is flagged: bf16 rounding gives ~4e-3.
DIFF_FLAG = 2e-2


@dataclass(frozen=True)
class Plan:
    """What one run measures, and each stage's time budget in seconds (the process start included)."""

    device: str
    dtype: str
    seqs: tuple[int, ...]
    dims: tuple[int, ...]
    densities: tuple[float, ...]
    heads: int
    batch: int
    block_q: int
    block_k: int
    sparse_backends: tuple[str, ...]
    psa_grid: tuple[int, int, int]
    psa_heads: int
    psa_dim: int
    psa_full: bool  # also the end-to-end module, the planning alone and the flex backend
    bra_cases: tuple[tuple[str, int, tuple[tuple[str, int, int, int], ...]], ...]
    budgets: dict[str, float] = field(default_factory=dict)
    # The video patterns' grid and tile (STA/GNA windows in tiles; Radial's block is the tile's volume): near
    # Wan 480p's 32,760 tokens, on a grid the tile divides.
    pattern_grid: tuple[int, int, int] = (20, 32, 48)
    pattern_tile: tuple[int, int, int] = (4, 8, 8)


# BiFormer-T's routing stages: (stage, heads, tokens per region, topk); 7 x 7 regions, head dim 32.
_BRA_224 = (("stage 1", 2, 64, 1), ("stage 2", 4, 16, 4), ("stage 3", 8, 4, 16))
_BRA_896 = (("stage 1", 2, 1024, 1), ("stage 2", 4, 256, 4), ("stage 3", 8, 64, 16))
WAN_480P_GRID = (21, 30, 52)  # (81 - 1) / 4 + 1 latent frames; 480 / 8 / 2 x 832 / 8 / 2 patches

PLANS = {
    "full": Plan(
        device="cuda",
        dtype="bfloat16",
        seqs=(4096, 16384, 65536),
        dims=(64, 128),
        densities=(0.05, 0.10, 0.25, 0.50),
        heads=16,
        batch=1,
        block_q=128,
        block_k=128,
        sparse_backends=SPARSE_BACKENDS,
        psa_grid=WAN_480P_GRID,
        psa_heads=12,
        psa_dim=128,
        psa_full=True,
        bra_cases=(("224x224, batch 128", 128, _BRA_224), ("896x896, batch 8", 8, _BRA_896)),
        budgets={"env": 20, "sparse": 140, "psa": 65, "bra": 45, "patterns": 30},
    ),
    "quick": Plan(
        device="cuda",
        dtype="bfloat16",
        seqs=(16384,),
        dims=(128,),
        densities=(0.10, 0.50),
        heads=16,
        batch=1,
        block_q=128,
        block_k=128,
        sparse_backends=SPARSE_BACKENDS,
        psa_grid=WAN_480P_GRID,
        psa_heads=12,
        psa_dim=128,
        psa_full=False,
        bra_cases=(("224x224, batch 128", 128, _BRA_224),),
        budgets={"env": 15, "sparse": 60, "psa": 40, "bra": 30, "patterns": 20},
    ),
    # CPU, fp32 (the Triton interpreter's bf16 is unreliable), tiny shapes: every code path, no figures.
    "smoke": Plan(
        device="cpu",
        dtype="float32",
        seqs=(512,),
        dims=(64,),
        densities=(0.25, 0.50),
        heads=2,
        batch=1,
        block_q=128,
        block_k=64,
        sparse_backends=SPARSE_BACKENDS,
        psa_grid=(4, 8, 16),
        psa_heads=2,
        psa_dim=64,
        psa_full=True,
        bra_cases=(("56x56, batch 2", 2, (("stage 2", 2, 16, 4),)),),
        budgets={"env": 120, "sparse": 900, "psa": 600, "bra": 300, "patterns": 600},
        pattern_grid=(4, 8, 16),
        pattern_tile=(2, 4, 4),
    ),
}
# In the sweep, the (tokens, head dim) shapes in the order they are measured: the figures that matter most
# first, so that a stage short of time drops the least useful ones.
# Head dim 128 (Wan, CogVideoX, HunyuanVideo) over the whole length range first, then 64.
_SHAPE_PRIORITY = ((16384, 128), (65536, 128), (4096, 128), (16384, 64), (65536, 64), (4096, 64))


def sweep_shapes(plan: Plan) -> list[tuple[int, int]]:
    """(tokens, head dim) pairs of the sweep, most useful first."""
    shapes = [(s, d) for s in plan.seqs for d in plan.dims]
    rank = {s: i for i, s in enumerate(_SHAPE_PRIORITY)}
    return sorted(shapes, key=lambda s: (rank.get(s, len(rank)), s))


# ----------------------------------------------------------------------------------------------- bookkeeping


class StageStop(BaseException):
    """The stage's time is up (its deadline, or SIGTERM from the parent): stop measuring, keep the records."""


class Stage:
    """One stage's records (appended to a JSON-lines file at once) and its deadline."""

    def __init__(self, name: str, plan: Plan, results: Path, deadline: float):
        self.name, self.plan, self.results, self.deadline = name, plan, results, deadline
        self.device = plan.device
        self.last_seconds: dict[str, float] = {}

    def emit(self, kind: str, **fields) -> None:
        record = {"stage": self.name, "kind": kind, **fields}
        with open(self.results, "a") as f:
            f.write(json.dumps(record) + "\n")
        if kind in ("row", "note", "error", "check"):
            print(f"[{self.name}] {kind}: " + ", ".join(f"{k}={_short(v)}" for k, v in fields.items()), flush=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def ensure(self, seconds: float, what: str) -> None:
        """Raise StageStop unless `seconds` remain before the deadline."""
        if self.left() < seconds:
            self.emit("note", text=f"stopped before {what}: {self.left():.0f} s left of the stage budget")
            raise StageStop


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _on_sigterm(signum, frame):
    raise StageStop


# ----------------------------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device: str) -> float:
    """Median milliseconds per call: do_bench on CUDA; on the CPU (smoke runs) a short wall-clock median."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def peak_mib(fn, device: str) -> float | None:
    """Allocator high-water mark of one call above the memory allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_diff(a, b) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _passes(fn, inputs, grad_out):
    import torch

    def fwd():
        with torch.no_grad():
            return fn()

    def fwd_bwd():
        return torch.autograd.grad(fn(), inputs, grad_out)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def measure(st: Stage, case: dict, backend: str, fn, inputs, grad_out, flop: float, passes=("fwd", "fwd+bwd")):
    """Time `fn` forward and forward+backward; emit one row per pass. Returns the forward output (or None)."""
    import torch

    calls = _passes(fn, inputs, grad_out)
    out = None
    for name in passes:
        if name == "fwd+bwd" and st.device == "cpu" and backend in ("flex", "flex_op"):
            st.emit("note", text=f"{backend} fwd+bwd skipped on the CPU: FlexAttention has no CPU backward", **case)
            continue
        shape = {k: v for k, v in case.items() if k not in ("density", "kept")}
        key = f"{backend}/{name}/{sorted(shape.items())}"
        # A path's first call at a shape compiles (FlexAttention) or autotunes (Triton): leave room for that.
        need = 20.0 if key not in st.last_seconds else max(4.0, 3 * st.last_seconds[key])
        st.ensure(need, f"{backend} {name} at " + ", ".join(f"{k} {v}" for k, v in case.items()))
        call = calls[name]
        started = time.perf_counter()
        try:
            t0 = time.perf_counter()
            result = call()
            _sync(st.device)
            first = time.perf_counter() - t0
            if name == "fwd":
                out = result
                if not bool(torch.isfinite(result).all()):
                    st.emit("error", backend=backend, pass_=name, text="non-finite output", **case)
            ms = bench_ms(call, st.device)
            peak = peak_mib(call, st.device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            st.emit("error", backend=backend, pass_=name, text="CUDA out of memory", **case)
            continue
        except Exception as exc:  # one path failing must not hide the others
            text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            st.emit("error", backend=backend, pass_=name, text=text, **case)
            if st.device == "cuda" and ("CUDA error" in text or "illegal memory" in text or "AcceleratorError" in text):
                raise StageStop from exc  # the context is poisoned: the next stage starts a fresh process
            continue
        st.last_seconds[key] = time.perf_counter() - started
        mult = 1.0 if name == "fwd" else 3.5
        st.emit(
            "row",
            backend=backend,
            pass_=name,
            ms=ms,
            tflops=flop * mult / ms / 1e9 if flop else None,
            flop=flop * mult,
            peak_mib=peak,
            first_call_s=first,
            **case,
        )
    return out


@contextlib.contextmanager
def zoo_kernels(backend: str):
    """ZOO_KERNELS set for the calls inside (the dispatch reads it at every call)."""
    old = os.environ.get("ZOO_KERNELS")
    os.environ["ZOO_KERNELS"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ZOO_KERNELS", None)
        else:
            os.environ["ZOO_KERNELS"] = old


def _setup_torch(plan: Plan):
    import torch

    dtype = getattr(torch, plan.dtype)
    # FlexAttention compiles once per shape and grad mode; the sweep visits up to a dozen of them.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch, dtype


def kept_flop(index, level, block_q: int, block_k: int, lq: int, lk: int, batch: int, heads: int, d: int) -> float:
    """Forward FLOP on the listed entries: 4 * D * sum over entries of (real queries) x (key slots at its level).

    Args:
        index: (B or 1, H or 1, Mq, K) key blocks, -1 empty; level: same shape or None (all 0).
    """
    import torch

    mq = index.shape[2]
    index = index.long().expand(batch, heads, *index.shape[2:])
    rows = (lq - torch.arange(mq, device=index.device) * block_q).clamp(max=block_q).double()
    keys = (lk - index.clamp_min(0) * block_k).clamp(max=block_k)
    if level is not None:
        f = 1 << level.long().expand(index.shape)
        keys = (keys + f - 1) // f
    slots = torch.where(index >= 0, keys, 0).double()
    return 4.0 * d * float((slots * rows.view(1, 1, mq, 1)).sum())


def random_tables(b: int, h: int, mq: int, mk: int, density: float, device, seed: int = 0):
    """(B, H, Mq, K) distinct random key blocks per query block in increasing order, K = round(density * Mk)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    keep = max(1, round(density * mk))
    index = torch.rand(b, h, mq, mk, generator=gen, device=device).argsort(dim=-1)[..., :keep]
    return index.sort(dim=-1).values.to(torch.int32)


def flex_block_mask(index, mk: int, block_q: int, block_k: int, lq: int, lk: int):
    """A FlexAttention BlockMask whose full blocks are exactly the listed (query block, key block) pairs."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    b, h, mq, _ = index.shape
    dense = torch.zeros(b, h, mq, mk, dtype=torch.bool, device=index.device)
    dense.scatter_(-1, index.long().clamp_min(0), index >= 0)
    full_num = dense.sum(-1).to(torch.int32)
    full_idx = torch.argsort((~dense).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(full_num),
        torch.zeros_like(full_idx),
        full_num,
        full_idx,
        BLOCK_SIZE=(block_q, block_k),
        seq_lengths=(lq, lk),
    )


_COMPILED_FLEX = None


def compiled_flex():
    """`flex_attention` compiled once (per shape and grad mode), as a user of FlexAttention would call it."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def dense_sdpa(device: str):
    """Dense attention on FlashAttention (CUDA) or the fused CPU kernel (smoke runs)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v, scale=None):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return attend


# ----------------------------------------------------------------------------------------------- stages


def stage_env(st: Stage) -> None:
    """Device, versions and one bf16 matrix-product ceiling."""
    import platform

    import torch
    import triton

    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    if st.device == "cuda":
        if info["triton_interpret"] == "1":
            st.emit("error", text="TRITON_INTERPRET=1 on a GPU: the Triton kernels would run on the host")
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            sms=props.multi_processor_count,
            memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = bench_ms(lambda: a @ b, "cuda")
        info["matmul_tflops"] = 2 * n**3 / ms / 1e9
    else:
        info.update(device=f"CPU ({platform.machine()}), {os.cpu_count()} cores", cuda=None)
    st.emit("meta", **info)


def stage_sparse(st: Stage) -> None:
    """Block-sparse vs dense SDPA vs FlexAttention on the same random block masks."""
    torch, _ = _setup_torch(st.plan)
    for seq, d in sweep_shapes(st.plan):
        st.ensure(30.0, f"{seq} tokens, head dim {d}")
        _sparse_shape(st, seq, d)
        if st.device == "cuda":
            torch.cuda.empty_cache()


def _sparse_shape(st: Stage, seq: int, d: int) -> None:
    """Dense SDPA once, then every backend at every density, for one (tokens, head dim)."""
    plan = st.plan
    torch, dtype = _setup_torch(plan)
    b, h = plan.batch, plan.heads
    gen = torch.Generator(device=st.device).manual_seed(seq + d)
    q, k, v = (torch.randn(b, h, seq, d, generator=gen, device=st.device, dtype=dtype).requires_grad_() for _ in "qkv")
    grad_out = torch.randn(b, h, seq, d, generator=gen, device=st.device, dtype=dtype)
    if "dense" in plan.sparse_backends:
        dense = dense_sdpa(st.device)
        flop = 4.0 * b * h * seq * seq * d
        measure(st, {"seq": seq, "d": d, "density": 1.0}, "dense", lambda: dense(q, k, v), (q, k, v), grad_out, flop)
    for density in plan.densities:
        _sparse_density(st, q, k, v, grad_out, density)


def _sparse_density(st: Stage, q, k, v, grad_out, density: float) -> None:
    """Triton, FlexAttention and the zoo's flex backend on one random table; their outputs compared."""
    import torch
    from zoo.kernels.block_sparse_attention import block_sparse_attention_flex
    from zoo.kernels.block_sparse_attention.triton_impl import block_sparse_attention_triton

    plan = st.plan
    (b, h, seq, d), bq, bk = q.shape, plan.block_q, plan.block_k
    scale = d**-0.5
    mq, mk = -(-seq // bq), -(-seq // bk)
    index = random_tables(b, h, mq, mk, density, st.device, seed=int(density * 1000))
    case = {"seq": seq, "d": d, "density": density, "kept": index.shape[-1] / mk}
    flop = kept_flop(index, None, bq, bk, seq, seq, b, h, d)
    paths = {
        "triton": lambda: block_sparse_attention_triton(q, k, v, index, None, None, bq, bk, scale, 1),
        "flex_op": lambda: block_sparse_attention_flex(q, k, v, index, None, None, bq, bk, scale, 1),
    }
    if "flex" in plan.sparse_backends:
        mask = flex_block_mask(index, mk, bq, bk, seq, seq)
        flex = compiled_flex()

        def flex_path():
            # FlexAttention refuses CPU inputs that require grad, even under no_grad: inference gets them detached.
            qkv = (q, k, v) if torch.is_grad_enabled() else (q.detach(), k.detach(), v.detach())
            return flex(*qkv, block_mask=mask, scale=scale)

        paths["flex"] = flex_path
    outs = {}
    for backend in ("triton", "flex", "flex_op"):
        if backend in plan.sparse_backends:
            outs[backend] = measure(st, case, backend, paths[backend], (q, k, v), grad_out, flop)
    for other in ("flex", "flex_op"):
        if outs.get("triton") is not None and outs.get(other) is not None:
            st.emit("check", a="triton", b=other, rel_diff=rel_diff(outs["triton"], outs[other]), **case)


def psa_kept_flop(levels, block_q: int, block_k: int, length: int, d: int) -> float:
    """Forward FLOP on the kept slots of a PSA level map (B, H, Mq, Mk) with 0 skip, 1/2/4/8 pooling."""
    import torch

    mq, mk = levels.shape[-2:]
    rows = (length - torch.arange(mq, device=levels.device) * block_q).clamp(max=block_q).double()
    keys = (length - torch.arange(mk, device=levels.device) * block_k).clamp(max=block_k)
    f = levels.long().clamp_min(1)
    slots = torch.where(levels > 0, (keys + f - 1) // f, 0).double()
    return 4.0 * d * float((slots * rows.view(mq, 1)).sum())


def video_inputs_and_dense_row(st: Stage, grid: tuple[int, int, int], label: dict):
    """Seeded q, k, v (1, heads, T*H*W, D) with grads, an output gradient, the case fields, and dense SDPA's row
    (labelled with `label`) at the plan's video attention shape (`psa_heads` heads of `psa_dim`)."""
    torch, dtype = _setup_torch(st.plan)
    h, d, length = st.plan.psa_heads, st.plan.psa_dim, math.prod(grid)
    gen = torch.Generator(device=st.device).manual_seed(0)
    q, k, v = (
        torch.randn(1, h, length, d, generator=gen, device=st.device, dtype=dtype).requires_grad_() for _ in range(3)
    )
    grad_out = torch.randn(1, h, length, d, generator=gen, device=st.device, dtype=dtype)
    base = {"grid": list(grid), "seq": length, "heads": h, "d": d}
    dense = dense_sdpa(st.device)
    measure(st, {**base, **label}, "dense", lambda: dense(q, k, v), (q, k, v), grad_out, 4.0 * h * length**2 * d)
    return q, k, v, grad_out, base


def stage_psa(st: Stage) -> None:
    """PSA at Wan2.1-1.3B's attention shape: dense SDPA, the op per backend, the module, the planning."""
    plan = st.plan
    from zoo.blocks.pyramid_sparse import (
        PSAConfig,
        PyramidSparseAttention,
        attention_density,
        plan_levels,
        pyramid_sparse_attention,
    )

    config = PSAConfig()
    grid, d = plan.psa_grid, plan.psa_dim
    length = math.prod(grid)
    q, k, v, grad_out, base = video_inputs_and_dense_row(st, grid, {"path": "dense"})

    levels = plan_levels(q.detach(), k.detach(), config)
    density = float(attention_density(levels))
    flop = psa_kept_flop(levels, config.block_q, config.block_k, length, d)
    shares = {f: float((levels == f).float().mean()) for f in (1, 2, 4, 8)}
    st.emit("meta", psa_density=density, psa_shares=shares, psa_config=config.to_dict(), **base)
    outs = {}
    for env_name, backend in (("triton", "triton"), ("flex", "flex_op")) if plan.psa_full else (("triton", "triton"),):
        with zoo_kernels(env_name):
            op = lambda: pyramid_sparse_attention(q, k, v, levels, config.block_q, config.block_k)  # noqa: E731
            outs[backend] = measure(st, {**base, "path": "op"}, backend, op, (q, k, v), grad_out, flop)
    if outs.get("triton") is not None and outs.get("flex_op") is not None:
        rel = rel_diff(outs["triton"], outs["flex_op"])
        st.emit("check", a="triton", b="flex_op", rel_diff=rel, path="op", **base)
    del outs
    if plan.psa_full:
        psa = PyramidSparseAttention(config)
        with zoo_kernels("triton"):
            module = lambda: psa(q, k, v, grid=grid)  # noqa: E731
            measure(st, {**base, "path": "module"}, "triton", module, (q, k, v), grad_out, flop)
        planning = lambda: plan_levels(q, k, config)  # noqa: E731
        measure(st, {**base, "path": "plan"}, "plan", planning, (q, k, v), grad_out, 0.0, passes=("fwd",))


def gather_then_sdpa(q, k, v, region_index, tokens: int, scale: float):
    """BiFormer's routed attention the plain way: gather the routed regions' K/V, then SDPA per region.

    Args:
        q, k, v: (B, H, R * L, D), regions of L tokens laid end to end.
        region_index: (B, 1, R, topk) routed key regions per query region.

    Returns:
        (B, H, R * L, D).
    """
    import torch
    import torch.nn.functional as F

    b, h, n, d = q.shape
    r, topk = n // tokens, region_index.shape[-1]
    idx = region_index.reshape(b, 1, r * topk, 1, 1).expand(b, h, r * topk, tokens, d)
    kg = torch.gather(k.view(b, h, r, tokens, d), 2, idx).view(b, h * r, topk * tokens, d)
    vg = torch.gather(v.view(b, h, r, tokens, d), 2, idx).view(b, h * r, topk * tokens, d)
    out = F.scaled_dot_product_attention(q.reshape(b, h * r, tokens, d), kg, vg, scale=scale)
    return out.view(b, h, n, d)


def stage_bra(st: Stage) -> None:
    """BiFormer's routed attention: the op (Triton, as BiLevelRoutingAttention calls it) vs gather-then-SDPA."""
    torch, _ = _setup_torch(st.plan)
    for label, batch, stages in st.plan.bra_cases:
        for stage, heads, tokens, topk in stages:
            st.ensure(15.0, f"BRA {label} {stage}")
            _bra_case(st, label, batch, stage, heads, tokens, topk)
            if st.device == "cuda":
                torch.cuda.empty_cache()


def _bra_case(st: Stage, label: str, batch: int, stage: str, heads: int, tokens: int, topk: int) -> None:
    torch, dtype = _setup_torch(st.plan)
    from zoo.kernels.block_sparse_attention.triton_impl import block_sparse_attention_triton

    regions, d = 49, 32
    scale, n = d**-0.5, regions * tokens
    gen = torch.Generator(device=st.device).manual_seed(tokens + topk)
    q, k, v = (
        torch.randn(batch, heads, n, d, generator=gen, device=st.device, dtype=dtype).requires_grad_() for _ in "qkv"
    )
    grad_out = torch.randn(batch, heads, n, d, generator=gen, device=st.device, dtype=dtype)
    route = torch.rand(batch, regions, regions, generator=gen, device=st.device).argsort(-1)[..., :topk]
    index = route.unsqueeze(1)  # (B, 1, R, topk), as BiLevelRoutingAttention passes it
    case = {"input": label, "bra_stage": stage, "batch": batch, "heads": heads, "tokens": tokens, "topk": topk}
    flop = kept_flop(index, None, tokens, tokens, n, n, batch, heads, d)
    ours = measure(
        st,
        case,
        "triton",
        lambda: block_sparse_attention_triton(q, k, v, index, None, None, tokens, tokens, scale, 1),
        (q, k, v),
        grad_out,
        flop,
    )
    theirs = measure(
        st, case, "gather_sdpa", lambda: gather_then_sdpa(q, k, v, index, tokens, scale), (q, k, v), grad_out, flop
    )
    if ours is not None and theirs is not None:
        st.emit("check", a="triton", b="gather_sdpa", rel_diff=rel_diff(ours, theirs), **case)


PATTERN_NAMES = ("sta", "neighborhood", "radial")
PATTERN_DENSITIES = (0.10, 0.30)


def stage_patterns(st: Stage) -> None:
    """The video patterns of `zoo.blocks.sparse_patterns` (issue 18) on the op's Triton backend, against dense SDPA,
    at the densities nearest 10% and 30%. Inference (forward) first, then forward+backward."""
    plan = st.plan
    from zoo.blocks.sparse_patterns import pattern_at_density

    grid = plan.pattern_grid
    q, k, v, grad_out, base = video_inputs_and_dense_row(st, grid, {"pattern": "dense"})
    dense_flop = 4.0 * plan.psa_heads * math.prod(grid) ** 2 * plan.psa_dim
    for target in PATTERN_DENSITIES:
        for name in PATTERN_NAMES:
            st.ensure(15.0, f"{name} at density {target}")
            pattern = pattern_at_density(name, grid, target, tile=plan.pattern_tile, device=st.device)
            kept = pattern.density()
            case = {**base, "pattern": name, "target": target, "density": kept, "block": pattern.block_q}
            with zoo_kernels("triton"):
                call = lambda pattern=pattern: pattern.attend(q, k, v)  # noqa: E731
                measure(st, case, "triton", call, (q, k, v), grad_out, dense_flop * kept)


STAGE_FUNCS = {
    "env": stage_env,
    "sparse": stage_sparse,
    "psa": stage_psa,
    "bra": stage_bra,
    "patterns": stage_patterns,
}


def run_stage(name: str, plan: Plan, results: Path, deadline: float) -> int:
    """Child process: run one stage until done or out of time; every record is already on disk."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    st = Stage(name, plan, results, deadline)
    started = time.time()
    try:
        STAGE_FUNCS[name](st)
        status = "done"
    except StageStop:
        status = "stopped (time budget)"
    except Exception as exc:
        import traceback

        traceback.print_exc()
        st.emit("error", text=f"stage failed: {type(exc).__name__}: {str(exc).strip()[:300]}")
        status = "failed"
    st.emit("stage_end", status=status, seconds=time.time() - started)
    return 0 if status == "done" else 1


# ----------------------------------------------------------------------------------------------- rendering


def fingerprint() -> str:
    """sha1 (12 hex) of the code a GPU run exercises, so a run can be matched to a working tree without git."""
    files = sorted((ROOT / "kernels").rglob("*.py")) + [
        ROOT / p
        for p in (
            "blocks/pyramid_sparse.py",
            "blocks/routing.py",
            "benchmarks/attention_gpu.py",
            "tests/kernels/test_block_sparse_attention_cuda.py",
        )
    ]
    digest = hashlib.sha1()
    for path in files:
        if path.exists():
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def code_version() -> str:
    commit = os.environ.get("ZOO_COMMIT", "")
    dirty = os.environ.get("ZOO_DIRTY", "")
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
            status = subprocess.check_output(["git", "status", "--porcelain"], cwd=ROOT, text=True)
            dirty = "1" if status.strip() else "0"
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown (no git here; pass ZOO_COMMIT)"
    changes = {"1": " with uncommitted changes", "0": " (clean tree)"}.get(dirty, "")
    how = "`python -m benchmarks.attention_gpu --fingerprint`"
    return f"commit `{commit}`{changes}, code fingerprint `{fingerprint()}` ({how})"


def load(results: Path) -> list[dict]:
    if not results.exists():
        return []
    records = []
    for line in results.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
            records.append(json.loads(line))
    return records


def _fmt(x, spec: str = ".3f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def _tf(x) -> str:
    """TFLOP/s: whole numbers where they are large (GPU), three significant digits where not (CPU smoke runs)."""
    return "—" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def _seq_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _case_label(r: dict) -> str:
    """Where a record was measured, in a few words."""
    if r["stage"] == "sparse" and "seq" in r:
        return f"sparse {_seq_label(r['seq'])} tokens, D {r['d']}, {r.get('density', 1.0):.0%}"
    if r["stage"] == "psa":
        return f"PSA {r.get('path', '')}"
    if r["stage"] == "bra":
        return f"BRA {r.get('input', '')} {r.get('bra_stage', '')}"
    if r["stage"] == "patterns":
        return f"pattern {r.get('pattern', '')} at {r.get('target', 1.0):.0%}"
    return r["stage"]


def render(records: list[dict], plan: Plan, args, started: str, elapsed: float) -> tuple[str, list[str]]:
    """The section's markdown, and the short summary lines printed last."""
    rows = [r for r in records if r["kind"] == "row"]
    meta = {}
    for r in records:
        if r["kind"] == "meta":
            meta.update({k: v for k, v in r.items() if k not in ("stage", "kind")})
    checks = [r for r in records if r["kind"] == "check"]
    problems = [r for r in records if r["kind"] in ("error", "note")]
    ends = {r["stage"]: r for r in records if r["kind"] == "stage_end"}
    summary: list[str] = []
    out: list[str] = []

    dev = meta.get("device", "unknown device")
    line = f"Device: {dev}"
    if meta.get("sms"):
        line += f" ({meta['sms']} SMs, {meta['memory_gib']:.0f} GiB, compute capability {meta['capability']})"
    line += f"; CUDA {meta.get('cuda')}, torch {meta.get('torch')}, triton {meta.get('triton')}"
    if meta.get("matmul_tflops"):
        line += f"; an 8192^3 bf16 matrix product ran at {meta['matmul_tflops']:.0f} TFLOP/s in this run"
    out.append(line + ".")
    mode = "quick" if args.quick else "smoke (CPU, tiny shapes: no figures)" if args.smoke else "full"
    command = "bash benchmarks/gpu.sh" if os.environ.get("ZOO_GPU_SH") else "python -m benchmarks.attention_gpu"
    out.append(
        f"Code: {code_version()}. Run: `{command}{' --quick' if args.quick else ''}` ({mode} plan), "
        f"started {started}, benchmarks {elapsed:.0f} s; stages: "
        + ", ".join(f"{s} {ends[s]['status']} in {ends[s]['seconds']:.0f} s" for s in STAGES if s in ends)
        + "."
    )
    if os.environ.get("ZOO_TESTS_STATUS"):
        out.append(tests_summary(Path(os.environ.get("ZOO_TESTS_LOG", "")), os.environ["ZOO_TESTS_STATUS"]))
    out.append(f"\nTargets: {TARGETS}. ✓/✗ beside each figure.")

    # ---- sparse sweep
    sparse = [r for r in rows if r["stage"] == "sparse"]
    if sparse or "sparse" in ends:
        out.append(
            f"\n### Block-sparse attention vs dense SDPA and FlexAttention\n\nB = {plan.batch}, {plan.heads} heads, "
            f"{plan.dtype}, blocks of {plan.block_q} queries x {plan.block_k} keys, distinct random key blocks per "
            "(head, query block). TFLOP/s on the kept blocks (dense: all); forward+backward counts 3.5x the "
            "forward's FLOP. 'vs Flex' = FlexAttention time / Triton time on the same BlockMask (>= 1.00x: "
            "Triton no slower). 'zoo flex' = `block_sparse_attention_flex`, which builds the mask in every call. "
            "'diff' = ||Triton - Flex|| / ||Flex|| of the forward output."
        )
        by = {(r["seq"], r["d"], r["density"], r["backend"], r["pass_"]): r for r in sparse}
        diffs = {
            (c["seq"], c["d"], c["density"]): c["rel_diff"]
            for c in checks
            if c["stage"] == "sparse" and c["b"] == "flex"
        }
        met = {"dense": [0, 0], "flex": [0, 0]}
        for pass_ in ("fwd", "fwd+bwd"):
            out.append(f"\n#### {'Forward' if pass_ == 'fwd' else 'Forward + backward'}\n")
            head = (
                "| tokens | D | kept | dense ms | dense TFLOP/s | Triton ms | Triton TFLOP/s | % of dense (>= 70%) "
                "| Flex ms | Flex TFLOP/s | vs Flex (>= 1.00x) | zoo flex ms | Triton speed-up vs dense |"
            )
            head += " diff |" if pass_ == "fwd" else " peak MiB dense / Triton / Flex |"
            out.append(head)
            out.append("|" + "---:|" * (head.count("|") - 1))
            for seq, d in sorted({(r["seq"], r["d"]) for r in sparse}):
                dn = by.get((seq, d, 1.0, "dense", pass_))
                for density in plan.densities:
                    tr = by.get((seq, d, density, "triton", pass_))
                    fx = by.get((seq, d, density, "flex", pass_))
                    fo = by.get((seq, d, density, "flex_op", pass_))
                    if not (tr or fx or fo):
                        continue
                    frac = tr["tflops"] / dn["tflops"] if tr and dn else None
                    vs = fx["ms"] / tr["ms"] if tr and fx else None
                    ok_dense = None if frac is None else frac >= DENSE_FRACTION_TARGET
                    ok_flex = None if vs is None else vs >= 1.0
                    for key, ok in (("dense", ok_dense), ("flex", ok_flex)):
                        if ok is not None:
                            met[key][0] += ok
                            met[key][1] += 1
                    kept = (tr or fx or fo).get("kept", density)
                    cells = [
                        _seq_label(seq),
                        str(d),
                        f"{kept:.0%}",
                        _fmt(dn and dn["ms"]),
                        _tf(dn and dn["tflops"]),
                        _fmt(tr and tr["ms"]),
                        _tf(tr and tr["tflops"]),
                        _fmt(frac, ".0%") + _mark(ok_dense),
                        _fmt(fx and fx["ms"]),
                        _tf(fx and fx["tflops"]),
                        (_fmt(vs, ".2f") + "x" if vs else "—") + _mark(ok_flex),
                        _fmt(fo and fo["ms"]),
                        _fmt(dn["ms"] / tr["ms"], ".2f") + "x" if tr and dn else "—",
                    ]
                    if pass_ == "fwd":
                        diff = diffs.get((seq, d, density))
                        cells.append(_fmt(diff, ".1e") + (" (!)" if diff is not None and diff > DIFF_FLAG else ""))
                    else:
                        cells.append(" / ".join(_fmt(r and r["peak_mib"], ".0f") for r in (dn, tr, fx)))
                    out.append("| " + " | ".join(cells) + " |")
        summary.append(
            f"sparse: Triton >= 70% of dense TFLOP/s on kept blocks in {met['dense'][0]}/{met['dense'][1]} rows; "
            f"no slower than FlexAttention in {met['flex'][0]}/{met['flex'][1]} rows"
        )

    # ---- PSA
    psa = [r for r in rows if r["stage"] == "psa"]
    if psa or "psa" in ends:
        grid = tuple(meta.get("grid", plan.psa_grid))
        wan = " (832 x 480, 81 frames; VAE 8x spatial, 4x temporal; patch 1 x 2 x 2)" if grid == WAN_480P_GRID else ""
        out.append(
            f"\n### PSA at the attention shape of Wan2.1-1.3B, 480p\n\n{grid[0]} x {grid[1]} x {grid[2]} = "
            f"{math.prod(grid):,} tokens{wan}, "
            f"{plan.psa_heads} heads of {plan.psa_dim}, batch 1, {plan.dtype}, `PSAConfig()` defaults (quota "
            "10/5/0/20%, blocks 128/64, Gilbert order in the module)"
            + (
                f"; the plan keeps {meta['psa_density']:.1%} of dense attention's arithmetic"
                if "psa_density" in meta
                else ""
            )
            + ". TFLOP/s on the kept slots (dense: all). Speed-up = dense time / path time."
        )
        out.append(
            "\n| path | fwd ms | fwd TFLOP/s | fwd speed-up | f+b ms | f+b TFLOP/s | f+b speed-up | f+b peak MiB |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        by = {(r["path"], r["backend"], r["pass_"]): r for r in psa}
        dense = {p: by.get(("dense", "dense", p)) for p in ("fwd", "fwd+bwd")}
        labels = (
            ("dense", "dense", "dense SDPA (flash)"),
            ("op", "triton", "op `pyramid_sparse_attention`, Triton"),
            ("op", "flex_op", "op, zoo flex backend (FlexAttention)"),
            ("module", "triton", "`PyramidSparseAttention` end to end (reorder, plan, op), Triton"),
            ("plan", "plan", "planning alone (`plan_levels`)"),
        )
        for path, backend, label in labels:
            f, fb = by.get((path, backend, "fwd")), by.get((path, backend, "fwd+bwd"))
            if not (f or fb):
                continue
            cells = [label]
            for r, p in ((f, "fwd"), (fb, "fwd+bwd")):
                dn = dense[p]
                cells += [
                    _fmt(r and r["ms"]),
                    _tf(r and r["tflops"]) if path != "plan" else "—",
                    _fmt(dn["ms"] / r["ms"], ".2f") + "x" if r and dn else "—",
                ]
            cells.append(_fmt(fb and fb["peak_mib"], ".0f"))
            out.append("| " + " | ".join(cells) + " |")
        for c in checks:
            if c["stage"] == "psa":
                flag = " (!)" if c["rel_diff"] > DIFF_FLAG else ""
                out.append(f"\nOp output, Triton vs zoo flex backend: relative difference {c['rel_diff']:.1e}{flag}.")
        f_tr, f_dn = by.get(("op", "triton", "fwd")), dense["fwd"]
        if f_tr and f_dn:
            summary.append(f"psa: op (Triton) {f_dn['ms'] / f_tr['ms']:.2f}x dense forward")

    # ---- BRA
    bra = [r for r in rows if r["stage"] == "bra"]
    if bra or "bra" in ends:
        out.append(
            "\n### BRA (BiFormer-T routing stages) vs gather-then-SDPA\n\n49 regions, head dim 32, "
            f"{plan.dtype}; the op through its Triton backend with one block per region (as `BiLevelRoutingAttention` "
            "calls it) against `torch.gather` of the routed regions' K/V and SDPA on (B, heads * regions, tokens, 32). "
            "TFLOP/s on the routed pairs."
        )
        out.append(
            "\n| input | stage | Triton fwd ms | gather+SDPA fwd ms | fwd speed-up | Triton f+b ms "
            "| gather+SDPA f+b ms | f+b speed-up | Triton fwd TFLOP/s | f+b peak MiB Triton / gather+SDPA | diff |"
        )
        out.append("|---|---|" + "---:|" * 9)
        by = {}
        for r in bra:
            by[(r["input"], r["tokens"], r["backend"], r["pass_"])] = r
        diffs = {(c["input"], c["tokens"]): c["rel_diff"] for c in checks if c["stage"] == "bra"}
        wins = [0, 0]
        for label, _, stages in plan.bra_cases:
            for stage, heads, tokens, topk in stages:
                g = {
                    (b, p): by.get((label, tokens, b, p)) for b in ("triton", "gather_sdpa") for p in ("fwd", "fwd+bwd")
                }
                if not any(g.values()):
                    continue
                cells = [label, f"{stage}: {heads} heads, {tokens} tokens/region, topk {topk}"]
                for p in ("fwd", "fwd+bwd"):
                    a, b = g[("triton", p)], g[("gather_sdpa", p)]
                    speed = b["ms"] / a["ms"] if a and b else None
                    if speed is not None:
                        wins[0] += speed >= 1.0
                        wins[1] += 1
                    cells += [_fmt(a and a["ms"]), _fmt(b and b["ms"]), _fmt(speed, ".2f") + ("x" if speed else "")]
                a = g[("triton", "fwd")]
                cells.append(_tf(a and a["tflops"]))
                cells.append(
                    " / ".join(
                        _fmt(r and r["peak_mib"], ".0f")
                        for r in (g[("triton", "fwd+bwd")], g[("gather_sdpa", "fwd+bwd")])
                    )
                )
                diff = diffs.get((label, tokens))
                cells.append(_fmt(diff, ".1e") + (" (!)" if diff is not None and diff > DIFF_FLAG else ""))
                out.append("| " + " | ".join(cells) + " |")
        summary.append(f"bra: Triton faster than gather-then-SDPA in {wins[0]}/{wins[1]} measurements")

    # ---- video patterns
    pats = [r for r in rows if r["stage"] == "patterns"]
    if pats or "patterns" in ends:
        grid = plan.pattern_grid
        out.append(
            f"\n### Video sparse-attention patterns near Wan 480p's size\n\n{grid[0]} x {grid[1]} x {grid[2]} = "
            f"{math.prod(grid):,} tokens, {plan.psa_heads} heads of {plan.psa_dim}, batch 1, {plan.dtype}; "
            f"STA, GNA (NATTEN's strided windows) and Radial from `zoo.blocks.sparse_patterns.pattern_at_density` "
            f"at the settings nearest each target density (tiles of {' x '.join(map(str, plan.pattern_tile))} "
            "tokens), on the op's Triton backend. TFLOP/s on the kept blocks. Speed-up = dense time / pattern time."
        )
        out.append("\n| pattern | target | density | fwd ms | fwd TFLOP/s | fwd speed-up | f+b ms | f+b speed-up |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        by = {(r["pattern"], r.get("target"), r["pass_"]): r for r in pats}
        dense = {p: by.get(("dense", None, p)) for p in ("fwd", "fwd+bwd")}
        for target in (None, *PATTERN_DENSITIES):
            for name in ("dense",) if target is None else PATTERN_NAMES:
                f, fb = by.get((name, target, "fwd")), by.get((name, target, "fwd+bwd"))
                if not (f or fb):
                    continue
                kept = (f or fb).get("density", 1.0)
                cells = [name, "—" if target is None else f"{target:.0%}", f"{kept:.3f}"]
                cells += [_fmt(f and f["ms"]), _tf(f and f["tflops"])]
                cells.append(_fmt(dense["fwd"]["ms"] / f["ms"], ".2f") + "x" if f and dense["fwd"] else "—")
                cells.append(_fmt(fb and fb["ms"]))
                cells.append(_fmt(dense["fwd+bwd"]["ms"] / fb["ms"], ".2f") + "x" if fb and dense["fwd+bwd"] else "—")
                out.append("| " + " | ".join(cells) + " |")

    # ---- compile / autotune cost, and what was not measured
    # What compiling (FlexAttention) and autotuning (Triton) cost, for sizing the next run's budgets.
    slow: dict[tuple, list[float]] = {}
    for r in rows:
        if (r.get("first_call_s") or 0) > 2.0:
            slow.setdefault((r["stage"], r["backend"], r["pass_"]), []).append(r["first_call_s"])
    if slow:
        out.append("\nFirst calls over 2 s (FlexAttention compiling, Triton autotuning and compiling):\n")
        out.append("| stage | path | pass | first calls over 2 s | seconds in all | longest |")
        out.append("|---|---|---|---:|---:|---:|")
        for (stage, backend, pass_), secs in slow.items():
            name = BACKEND_NAMES.get(backend, backend)
            out.append(f"| {stage} | {name} | {pass_} | {len(secs)} | {sum(secs):.0f} | {max(secs):.0f} |")
    if problems:
        # The same failure at several densities or shapes is listed once, with where it happened.
        grouped: dict[tuple, list[str]] = {}
        for r in problems:
            key = (r["stage"], r.get("backend", ""), r.get("pass_", ""), r["text"])
            grouped.setdefault(key, []).append(_case_label(r) if len(r) > 3 else "")
        out.append("\nNot measured, or flagged:\n")
        for (stage, backend, pass_, text), where in grouped.items():
            what = " ".join(x for x in (BACKEND_NAMES.get(backend, backend), pass_) if x)
            places = "; ".join(w for w in where if w)
            out.append(f"- {stage}{': ' + what if what else ''}: {text}" + (f" ({places})" if places else ""))
    missing = [s for s in args.stages if s not in ends]
    if missing:
        out.append(
            f"\nStages that did not report an end (killed at their budget, or not started): {', '.join(missing)}."
        )
    return "\n".join(out), summary


def tests_summary(log: Path, status: str | None) -> str:
    """One line for the CUDA tests from pytest's log: its final summary line and exit status."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln.strip(" =") for ln in text.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", ln)]
    last = lines[-1] if lines else "no summary line (killed at its time limit?)"
    meaning = {"0": "passed", "5": "no tests ran", "124": "timed out", "137": "killed"}.get(str(status), "FAILED")
    return (
        f"CUDA tests (`tests/kernels/test_block_sparse_attention_cuda.py`, fp16/bf16, autotuned launches): {last}"
        + (f"; exit status {status} ({meaning})" if status not in (None, "") else "")
        + "."
    )


# ----------------------------------------------------------------------------------------------- parent


def splice(path: Path) -> None:
    """Copy the attention_gpu section of another BENCHMARKS.md (a device run's) into this tree's, verbatim."""
    from benchmarks._harness import BENCHMARKS_MD

    pattern = re.compile(rf"<!-- begin {SECTION} -->.*?<!-- end {SECTION} -->", re.S)
    found = pattern.search(path.read_text())
    if not found:
        raise SystemExit(f"{path} has no {SECTION} section")
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    body = found.group(0)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    BENCHMARKS_MD.write_text(text)
    print(f"spliced the {SECTION} section of {path} into {BENCHMARKS_MD}")


class _Terminated(Exception):
    """The parent was sent SIGTERM (gpu.sh's own time limit): stop, but still render what was measured."""


def _run_child(cmd: list[str], env: dict, timeout: float, results: Path, name: str, holder: list) -> None:
    """Run one stage's process; at its budget SIGTERM it (it stops and keeps its records), then SIGKILL."""
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    holder[:] = [child]
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        with open(results, "a") as f:
            f.write(json.dumps({"stage": name, "kind": "note", "text": f"killed at its budget of {timeout:.0f} s"}))
            f.write("\n")
    finally:
        _kill_group(holder)


def _kill_group(holder: list) -> None:
    """Kill what is left of the stage's process group (compile workers it started, say)."""
    if holder:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(holder[0].pid, signal.SIGKILL)
        holder.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="a fast subset (about 3 minutes on an H100)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: every code path, writes nothing")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--budget", type=float, default=None, help="seconds for all stages (default: their sum)")
    parser.add_argument("--block-q", type=int, default=None, help="sweep: query block size (default 128)")
    parser.add_argument("--block-k", type=int, default=None, help="sweep: key block size (default 128)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or None, help="log files go here (default $OUT)")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--fingerprint", action="store_true", help="print the code fingerprint and exit")
    parser.add_argument("--splice", type=Path, default=None, help="copy a device run's section into BENCHMARKS.md")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    plan = dataclasses.replace(plan, block_q=args.block_q or plan.block_q, block_k=args.block_k or plan.block_k)

    if args.fingerprint:
        print(fingerprint())
        return 0
    if args.splice:
        splice(args.splice)
        return 0
    if args.stage:
        return run_stage(args.stage, plan, args.results, args.deadline)

    if plan.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("No CUDA device: this benchmark needs one (`--smoke` runs tiny shapes on the CPU).", flush=True)
            return 2
    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "out" / "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / f"{SECTION}.jsonl"
    results.write_text("")
    write = not (args.no_write or args.smoke)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.time()
    total = args.budget if args.budget is not None else sum(plan.budgets[s] for s in args.stages)
    scale = min(1.0, total / sum(plan.budgets[s] for s in args.stages))
    budgets = {s: plan.budgets[s] * scale for s in args.stages}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The interpreter runs Triton on CPU tensors (smoke runs); on a GPU it would run the kernels on the host.
    env["TRITON_INTERPRET"] = "1" if plan.device == "cpu" else "0"
    env.pop("ZOO_KERNELS", None)
    holder: list = []

    def on_sigterm(signum, frame):
        _kill_group(holder)
        raise _Terminated

    signal.signal(signal.SIGTERM, on_sigterm)
    text, summary = "", []

    def publish() -> None:
        nonlocal text, summary
        text, summary = render(load(results), plan, args, started, time.time() - t_start)
        (out_dir / f"{SECTION}.md").write_text(text + "\n")
        if write:
            from benchmarks._harness import write_section

            write_section(
                SECTION, text, title="Block-sparse attention on the GPU: Triton vs dense SDPA and FlexAttention"
            )

    try:
        for i, name in enumerate(args.stages):
            left = total - (time.time() - t_start)
            # This stage's share plus whatever earlier stages left unused; later stages keep theirs.
            timeout = max(10.0, left - sum(budgets[s] for s in args.stages[i + 1 :]))
            print(f"== stage {name}: up to {timeout:.0f} s", flush=True)
            cmd = [sys.executable, "-m", "benchmarks.attention_gpu", "--stage", name, "--results", str(results)]
            cmd += ["--deadline", str(time.time() + timeout - 8.0)]  # it stops itself before it would be killed
            cmd += ["--quick"] if args.quick else ["--smoke"] if args.smoke else []
            cmd += ["--block-q", str(plan.block_q), "--block-k", str(plan.block_k)]
            _run_child(cmd, env, timeout, results, name, holder)
            publish()
    except _Terminated:
        with open(results, "a") as f:
            f.write(json.dumps({"stage": "run", "kind": "note", "text": "terminated from outside (SIGTERM)"}) + "\n")
        publish()
    print("\n" + text + "\n", flush=True)
    print(f"Summary ({TARGETS}):")
    for line in summary:
        print("  " + line)
    print(f"Records: {results}; section: {out_dir / (SECTION + '.md')}" + ("; BENCHMARKS.md written" if write else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
