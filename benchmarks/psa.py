"""Pyramid Sparse Attention: attention time against dense SDPA, and output error against dense by token order.

    flock /tmp/bench.lock python -m benchmarks.psa                 # CPU: writes the "psa" section
    python -m benchmarks.psa --device cuda                         # GPU: writes the "psa_gpu" section

CPU: attention alone at a modest video token grid (8 x 16 x 32 = 4096 tokens, 4 heads of 64, fp32, batch 1):
dense `scaled_dot_product_attention`; PSA end to end (reorder, plan, pyramid sparse op, restore) with the
official default config; its planning alone; and the op alone on given levels. Each in a fresh process.

Quality: relative output error against dense attention, for each token order ("gilbert" as the official
code, "tiles", "none"), on (a) queries/keys with known local space-time attention (random Fourier features
of the positions, three ranges) and (b) a tiny random-weight diffusers Wan transformer on a smooth latent
video, both level assignments. Neither is a trained model: the real comparison needs Wan weights.

GPU (`--device cuda`): one denoising step of a Wan2.1-1.3B-shaped `WanTransformer3DModel` (random weights,
bf16, 81 frames at 480x832: 21 x 30 x 52 = 32760 tokens, the paper's setting) dense vs PSA, and attention
alone at that length. Until the Triton kernel lands PSA runs on the PyTorch reference there.
"""

from __future__ import annotations

if not __package__:  # run as a file, `benchmarks` and `tests` would not import
    raise SystemExit("run from the repository root as: python -m benchmarks.psa [args]")

import argparse
import functools
import math

from benchmarks._harness import measure_in_subprocess, write_section

GRID, HEADS, HEAD_DIM = (8, 16, 32), 4, 64


def _qkv(grid, heads, head_dim, device="cpu", dtype=None, seed=0, sigma=2.0, time_scale=1.0):
    """Queries = keys = random Fourier features of the token positions (plus a little noise): attention falls
    off with space-time distance, over about `sigma` tokens in space and `sigma / time_scale` frames."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    pos = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in grid], indexing="ij"), -1)
    pos = pos.view(-1, 3) * torch.tensor([time_scale, 1.0, 1.0])
    angles = pos @ (torch.randn(3, head_dim // 2, generator=g) / sigma)
    feats = torch.cat([angles.cos(), angles.sin()], -1) * head_dim**0.25
    qk = feats.expand(1, heads, -1, -1).contiguous() + 0.1 * torch.randn(
        1, heads, math.prod(grid), head_dim, generator=g
    )
    v = torch.randn(1, heads, math.prod(grid), head_dim, generator=g)
    to = {"device": device, "dtype": dtype or torch.float32}
    return qk.to(**to), qk.clone().to(**to), v.to(**to)


def _setup(mode: str):
    import torch
    import torch.nn.functional as F
    from zoo.blocks.pyramid_sparse import PSAConfig, PyramidSparseAttention, plan_levels, pyramid_sparse_attention
    from zoo.blocks.video_order import video_token_order

    q, k, v = _qkv(GRID, HEADS, HEAD_DIM)
    psa = PyramidSparseAttention(PSAConfig())
    video_token_order(GRID)  # the curve is cached after its first use

    def run():
        with torch.no_grad():
            if mode == "dense":
                F.scaled_dot_product_attention(q, k, v)
            elif mode == "psa":
                psa(q, k, v, grid=GRID)
            elif mode == "plan":
                plan_levels(q, k, psa.config)
            else:
                pyramid_sparse_attention(q, k, v, levels, 128, 64)

    levels = plan_levels(q, k, psa.config)
    return run


def cpu_timing(threads: tuple[int, ...] = (1, 2)) -> str:
    seconds = {
        (mode, n): measure_in_subprocess(functools.partial(_setup, mode), threads=n, warmup=1, iters=3)
        for n in threads
        for mode in MODES
    }
    lines = [
        f"Attention alone, {GRID[0]} x {GRID[1]} x {GRID[2]} = {math.prod(GRID)} tokens, {HEADS} heads of "
        f"{HEAD_DIM}, fp32, batch 1; PSA with the official defaults (blocks 128/64, 10% full, 5% 2x, 20% 8x, 65% "
        "skipped: 14% of dense arithmetic). Speed is dense time / path time.",
        "",
        "| path | " + " | ".join(f"ms ({n} thr) | speed ({n} thr)" for n in threads) + " | peak MiB |",
        "|---|" + "---:|---:|" * len(threads) + "---:|",
    ]
    for mode, label in MODES.items():
        cells = []
        for n in threads:
            s, _ = seconds[mode, n]
            cells.append(f"{s * 1e3:.1f} | {seconds['dense', n][0] / s:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds[mode, threads[-1]][1]:.0f} |")
    return "\n".join(lines)


MODES = {
    "dense": "dense `scaled_dot_product_attention`",
    "psa": "PSA end to end (reorder, plan, op, restore)",
    "plan": "PSA planning only (importance + levels)",
    "op": "PSA op only (`pyramid_sparse_attention`, backend auto)",
}
ASSIGNMENTS = {"quota": (0.10, 0.15, 0.15, 0.35), "threshold": (0.6, 0.7, 0.7, 0.8)}


FIELDS = {
    "local, 2 tokens": dict(sigma=2.0),
    "local, 4 tokens": dict(sigma=4.0),
    "4 tokens, 13 frames": dict(sigma=4.0, time_scale=0.3),
}


def _field_errors() -> dict:
    import torch.nn.functional as F
    from zoo.blocks.pyramid_sparse import PSAConfig, PyramidSparseAttention

    grid = (6, 24, 48)
    out = {}
    for name, kwargs in FIELDS.items():
        q, k, v = _qkv(grid, 2, 64, **kwargs)
        dense = F.scaled_dot_product_attention(q, k, v)
        for reorder in ("gilbert", "tiles", "none"):
            psa = PyramidSparseAttention(PSAConfig(reorder=reorder))
            out[name, reorder] = float((psa(q, k, v, grid=grid) - dense).norm() / dense.norm())
    return out


def _wan_errors() -> dict:
    import torch
    from diffusers import WanTransformer3DModel
    from zoo.blocks.pyramid_sparse import PSAConfig

    from zoo.video import disable_psa, enable_psa

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=64, ffn_dim=256, num_layers=4, rope_max_seq_len=64,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    latents = torch.nn.functional.interpolate(
        torch.randn(1, 4, 3, 9, 9, generator=g), size=(8, 32, 32), mode="trilinear", align_corners=True
    )
    inputs = dict(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 8, 32))
    out = {}
    with torch.no_grad():
        dense = model(**inputs).sample
        for reorder in ("gilbert", "tiles", "none"):
            for assignment, bounds in ASSIGNMENTS.items():
                cfg = PSAConfig(
                    block_q=64, block_k=32, reorder=reorder, assignment=assignment, level_bounds=bounds, warmup_steps=0
                )
                state = enable_psa(model, cfg)
                err = float((model(**inputs).sample - dense).norm() / dense.norm())
                density = sum(float(d) for d in state.densities.values()) / len(state.densities)
                out[reorder, assignment] = (err, density)
        disable_psa(model)
    return out


def quality() -> str:
    field, wan = _field_errors(), _wan_errors()
    names = list(FIELDS)
    lines = [
        "Relative output error against dense attention (lower is better) by token order. (a) Attention with "
        "known locality on a 6 x 24 x 48 grid (2 heads of 64; official defaults: blocks 128/64, quota 10/5/0/20%, "
        "14% of dense arithmetic): queries = keys = random Fourier features of the positions, attending over "
        "about 2 or 4 tokens in space and as far, or over 13 frames, in time.",
        "",
        "| order | " + " | ".join(f"(a) {n}" for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for reorder in ("gilbert", "tiles", "none"):
        lines.append(f"| {reorder} | " + " | ".join(f"{field[n, reorder]:.4f}" for n in names) + " |")
    lines += [
        "",
        "(b) A 4-layer random-weight diffusers Wan transformer on a smooth latent video (8 x 16 x 16 tokens after "
        "patching; blocks 64/32), error of the whole model's output, and the fraction of dense attention "
        "arithmetic kept.",
        "",
        "| order | assignment | (b) error | (b) density |",
        "|---|---|---:|---:|",
    ]
    for (reorder, assignment), (err, density) in wan.items():
        lines.append(f"| {reorder} | {assignment} | {err:.4f} | {density:.3f} |")
    return "\n".join(lines)


def gpu() -> str:
    import time

    import torch
    import torch.nn.functional as F
    from diffusers import WanTransformer3DModel
    from zoo.blocks.pyramid_sparse import PSAConfig, PyramidSparseAttention

    from zoo.video import disable_psa, enable_psa

    def timed(fn, iters=5):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters

    dev, dt = "cuda", torch.bfloat16
    grid = (21, 30, 52)
    q, k, v = _qkv(grid, 12, 128, device=dev, dtype=dt)
    psa = PyramidSparseAttention(PSAConfig())
    with torch.no_grad():
        attn_dense = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        attn_psa = timed(lambda: psa(q, k, v, grid=grid))
    with torch.device(dev):
        model = WanTransformer3DModel(
            num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096
        )
    model = model.to(dt).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 16, 21, 60, 104, device=dev, dtype=dt),
        timestep=torch.tensor([500.0], device=dev),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=dev, dtype=dt),
    )
    with torch.no_grad():
        step_dense = timed(lambda: model(**inputs), iters=2)
        enable_psa(model, PSAConfig(warmup_steps=0))
        step_psa = timed(lambda: model(**inputs), iters=2)
        disable_psa(model)
    return "\n".join(
        [
            f"`python -m benchmarks.psa --device cuda` on {torch.cuda.get_device_name()}, bf16, Wan2.1-1.3B shape, "
            "81 frames at 480x832 (32760 tokens), random "
            "weights; PSA on the PyTorch reference (no Triton kernel yet).",
            "",
            "| what | dense ms | PSA ms | speed-up |",
            "|---|---:|---:|---:|",
            f"| attention alone (12 heads of 128) | {attn_dense * 1e3:.1f} | {attn_psa * 1e3:.1f} | "
            f"{attn_dense / attn_psa:.2f}x |",
            f"| one denoising step (30 blocks) | {step_dense * 1e3:.0f} | {step_psa * 1e3:.0f} | "
            f"{step_dense / step_psa:.2f}x |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        text = gpu()
        print(text)
        write_section("psa_gpu", text, title="Pyramid Sparse Attention on a GPU")
        return
    import torch

    torch.set_num_threads(2)
    parts = [cpu_timing()]
    if not args.skip_quality:
        parts.append(quality())
    text = "\n\n".join(parts)
    print(text)
    write_section("psa", text, title="Pyramid Sparse Attention (CPU)")


if __name__ == "__main__":
    main()
