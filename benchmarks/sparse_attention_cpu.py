"""Sparse attention on the CPU against dense `scaled_dot_product_attention`, both sides alternated in one process.

    flock /tmp/bench.lock python -m benchmarks.sparse_attention_cpu [--threads 2] [--rounds 7] [--no-write]

fp32; the attention rows at batch 1. Rows:

- the block-sparse op (`zoo.kernels.block_sparse_attention`, backend `auto` and each PyTorch backend) at 10% of the
  key blocks (distinct random blocks per query block and head), 8,192 tokens, 4 heads of 64, blocks of 64;
- Pyramid Sparse Attention with the default `PSAConfig` (blocks 128/64, 10% full, 5% at 2x, 20% at 8x) on
  video grids of 8 x 24 x 32 = 6,144 and 16 x 24 x 32 = 12,288 tokens, 4 heads of 64: the module end to end
  (token reorder, planning, op, restore) and the op alone on the planned levels;
- a training step of the video DiT digits recipe (configs/video/video_dit_digits.yaml: its model, PSA config
  and batch; random weights and clips) with PSA against the same model with dense attention;
- floors: SDPA alone on keys already gathered as PSA gathers them (6,144 tokens; the digits recipe's 32-query blocks)
  and PSA's planning alone, each against dense SDPA: what the gathered form cannot go below.

Inference runs under `torch.no_grad()`; forward+backward sums the output and calls backward. Speed is dense
time / sparse time (above 1: sparse is faster); each cell is the median of `--rounds` alternated pairs.
Writes the "sparse_attention_cpu" section of BENCHMARKS.md.
"""

from __future__ import annotations

if not __package__:  # run as a file, `benchmarks` and `tests` would not import
    raise SystemExit("run from the repository root as: python -m benchmarks.sparse_attention_cpu [args]")

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._harness import alternate, write_section

HEADS, HEAD_DIM = 4, 64


def _passes(fn, inputs, train: bool):
    if not train:

        def run():
            with torch.no_grad():
                fn(*inputs)

        return run

    leaves = [t.detach().requires_grad_() for t in inputs]

    def run():
        fn(*leaves).sum().backward()

    return run


def _random_index(mq: int, mk: int, density: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = max(1, round(density * mk))
    return torch.rand(1, HEADS, mq, mk, generator=gen).argsort(-1)[..., :keep].sort(-1).values


def block_sparse_rows(rounds: int) -> list[tuple]:
    from zoo.kernels import block_sparse_attention

    length, block = 8192, 64
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM) for _ in range(3))
    index = _random_index(length // block, length // block, 0.10)
    rows = []
    for train in (False, True):
        for backend in ("auto", "flex", "gather"):
            if train and backend == "flex":
                continue  # torch 2.14: no FlexAttention backward on the CPU
            os.environ["ZOO_KERNELS"] = backend
            sparse = _passes(lambda q, k, v: block_sparse_attention(q, k, v, index, block_q=block, block_k=block),
                             (q, k, v), train)  # fmt: skip
            dense = _passes(F.scaled_dot_product_attention, (q, k, v), train)
            ts, td = alternate(sparse, dense, rounds)
            name = f"block-sparse op, 10% of blocks, {length} tokens, `{backend}`"
            rows.append((name, "fwd+bwd" if train else "inference", ts, td))
    os.environ.pop("ZOO_KERNELS", None)
    return rows


def psa_rows(rounds: int) -> list[tuple]:
    from zoo.blocks.pyramid_sparse import PSAConfig, PyramidSparseAttention, plan_levels, pyramid_sparse_attention

    rows = []
    for grid in ((8, 24, 32), (16, 24, 32)):
        length = grid[0] * grid[1] * grid[2]
        q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM) for _ in range(3))
        psa = PyramidSparseAttention(PSAConfig())
        with torch.no_grad():
            levels = plan_levels(q, k, psa.config)
        density = float((levels > 0).float().div(levels.clamp_min(1).float()).mean())
        cases = [
            ("PSA module (reorder, plan, op)", lambda q, k, v, g=grid, m=psa: m(q, k, v, grid=g)),
            ("PSA op on planned levels", lambda q, k, v, lv=levels: pyramid_sparse_attention(q, k, v, lv, 128, 64)),
        ]
        for train in (False, True):
            for name, fn in cases:
                sparse = _passes(fn, (q, k, v), train)
                dense = _passes(F.scaled_dot_product_attention, (q, k, v), train)
                ts, td = alternate(sparse, dense, rounds)
                label = f"{name}, {length} tokens ({grid[0]}x{grid[1]}x{grid[2]}), density {density:.3f}"
                rows.append((label, "fwd+bwd" if train else "inference", ts, td))
    return rows


def video_dit_rows(rounds: int) -> list[tuple]:
    """One training step (forward, loss, backward, AdamW) of the digits recipe's VideoDiT, PSA vs dense."""
    import yaml

    from zoo.video.dit import VideoDiT

    recipe = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "configs/video/video_dit_digits.yaml").read_text()
    )
    cfg = recipe["model"]
    kwargs = dict(cfg["model_kwargs"], in_channels=1, patch_size=tuple(cfg["patch_size"]))
    dense = VideoDiT.from_size(cfg["size"], **kwargs, attention="dense")
    psa = VideoDiT.from_size(cfg["size"], **kwargs, attention="psa", psa_config=cfg["psa_config"])
    psa.load_state_dict(dense.state_dict())
    frames, size = recipe["data"]["num_frames"], recipe["data"]["frame_size"]
    x = torch.randn(recipe["data"]["batch_size"], 1, frames, size, size)
    t, labels = torch.rand(x.shape[0]) * 1000, torch.randint(0, 10, (x.shape[0],))

    def step(model, opt):
        def run():
            opt.zero_grad()
            model(x, t, labels).sample.square().mean().backward()
            opt.step()

        return run

    ts, td = alternate(
        step(psa, torch.optim.AdamW(psa.parameters())), step(dense, torch.optim.AdamW(dense.parameters())), rounds * 3
    )
    tokens = frames // cfg["patch_size"][0] * (size // cfg["patch_size"][1]) ** 2
    name = f"video DiT digits recipe, training step (batch {x.shape[0]}, {tokens} tokens, PSA density 0.67)"
    return [(name, "fwd+bwd+AdamW", ts, td)]


# Issue 16's CPU targets: (label, row name prefix, pass, least speed over dense SDPA).
TARGETS = (
    ("block-sparse op, 10%, 8192 tokens", "block-sparse op, 10% of blocks, 8192 tokens, `auto`", "inference", 5.0),
    ("block-sparse op, 10%, 8192 tokens", "block-sparse op, 10% of blocks, 8192 tokens, `auto`", "fwd+bwd", 3.0),
    ("PSA module, default config, 6144 tokens", "PSA module (reorder, plan, op), 6144 tokens", "inference", 4.0),
    ("PSA module, default config, 6144 tokens", "PSA module (reorder, plan, op), 6144 tokens", "fwd+bwd", 2.0),
    ("video DiT digits recipe, PSA training", "video DiT digits recipe", "fwd+bwd+AdamW", 1.0),
)


def _targets(rows: list[tuple]) -> list[str]:
    out = ["Against the targets (default backend, `auto`):", ""]
    for label, prefix, mode, least in TARGETS:
        for name, row_mode, ts, td in rows:
            if name.startswith(prefix) and row_mode == mode:
                verdict = "met" if td / ts >= least else "**not met**"
                out.append(f"- {label}, {mode}: {td / ts:.2f}x, target >= {least:g}x: {verdict}.")
    return out


def floor_rows(rounds: int) -> list[tuple]:
    """What the gathered form cannot go below, measured: its SDPA alone on keys already gathered, without a mask,
    and PSA's planning alone, each against dense SDPA on the same tokens."""
    from zoo.blocks.pyramid_sparse import _OP_LEVEL, PSAConfig, plan_levels

    rows = []
    length, config = 8 * 24 * 32, PSAConfig()
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM) for _ in range(3))
    with torch.no_grad():
        levels = plan_levels(q, k, config)
    op_level = torch.tensor(_OP_LEVEL)[levels.long()]
    # Keys per query block: every kept block at its pooled size (quota: the same count in every row).
    kept = int((op_level >= 0).mul(config.block_k // (1 << op_level.clamp_min(0))).sum(-1).max())
    mq = length // config.block_q
    gathered = (torch.randn(1, HEADS * mq, n, HEAD_DIM) for n in (config.block_q, kept, kept))
    dense = _passes(F.scaled_dot_product_attention, (q, k, v), False)
    sdpa = _passes(F.scaled_dot_product_attention, tuple(gathered), False)
    plan = _passes(lambda q, k: plan_levels(q, k, config), (q, k), False)
    shape = f"{mq} x {HEADS} blocks of {config.block_q} x {kept}"
    name = f"{length} tokens: SDPA alone on PSA's pre-gathered keys ({shape})"
    rows.append((name, "inference", *alternate(sdpa, dense, rounds)))
    rows.append((f"{length} tokens: PSA planning alone", "inference", *alternate(plan, dense, rounds)))
    # The digits recipe's attention: 256 tokens, 4 heads of 24, batch 16, blocks of 32 queries, 172 keys kept.
    b, heads, tokens, dim, bq, keep = 16, 4, 256, 24, 32, 172
    full = tuple(torch.randn(b, heads, tokens, dim) for _ in range(3))
    blocks = tuple(torch.randn(b, heads * tokens // bq, n, dim) for n in (bq, keep, keep))
    shape = f"{tokens // bq} x {heads} blocks of {bq} x {keep}"
    name = f"digits recipe attention: SDPA alone on pre-gathered keys ({shape})"
    dense = _passes(F.scaled_dot_product_attention, full, True)
    rows.append((name, "fwd+bwd", *alternate(_passes(F.scaled_dot_product_attention, blocks, True), dense, rounds)))
    return rows


def _bounds(floors: list[tuple]) -> list[str]:
    """What the floor rows say about the targets."""
    if not floors:
        return []
    (_, _, t_sdpa, t_dense), (_, _, t_plan, t_dense2), (_, _, t_small, t_full) = floors
    ceiling = 1 / (t_sdpa / t_dense + t_plan / t_dense2)
    return [
        "Floors (the last three rows). The gathered form cannot beat its own SDPA on keys already gathered; PSA's "
        "module adds its plan (the authors' importance estimate from every 4th query and key). Together they cap "
        f"the PSA module at {ceiling:.1f}x dense on 6,144 tokens on this CPU before any gathering is paid, against "
        f"the 4x target. At the digits recipe's size, SDPA on the gathered blocks of 32 queries alone runs at "
        f"{t_full / t_small:.2f}x dense attention's forward+backward (the CPU kernel's cost per logit is higher on "
        "32-query rows than on 256-query rows, which eats the 0.67 density), so PSA's attention cannot train faster "
        "than dense there; what it adds (plan, gather, pooling) is the recipe's shortfall.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["op", "psa", "video", "floors"], default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    if args.only in (None, "op"):
        rows += block_sparse_rows(args.rounds)
    if args.only in (None, "psa"):
        rows += psa_rows(args.rounds)
    if args.only in (None, "video"):
        rows += video_dit_rows(args.rounds)
    floors = floor_rows(args.rounds) if args.only in (None, "floors") else []
    lines = [
        f"fp32, batch 1, {HEADS} heads of {HEAD_DIM}, {args.threads} threads; each side alternated in one process "
        f"({args.rounds} rounds, medians). Speed = dense SDPA time / sparse time.",
        "",
        "| case | pass | sparse ms | dense SDPA ms | speed |",
        "|---|---|---:|---:|---:|",
    ]
    for name, mode, ts, td in rows + floors:
        lines.append(f"| {name} | {mode} | {ts * 1e3:.1f} | {td * 1e3:.1f} | {td / ts:.2f}x |")
    lines += ["", *_targets(rows), "", *_bounds(floors)]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("sparse_attention_cpu", text, title="Sparse attention on the CPU vs dense SDPA")


if __name__ == "__main__":
    main()
