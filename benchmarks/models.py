"""CPU inference throughput and peak memory of every registered zoo model (BiFormer against the authors'
computation: benchmarks/biformer_vs_official.py).

    python -m benchmarks.models [--models 'zoo_*'] [--batch 8] [--size 224] [--threads 2]

Each measurement runs in a fresh process (peak memory = resident-set high-water mark of one forward
above the level after building the model). Writes the "models" section of BENCHMARKS.md.
"""

from __future__ import annotations

if not __package__:  # run as a file, `benchmarks` and `tests` would not import
    raise SystemExit("run from the repository root as: python -m benchmarks.models [args]")

import argparse
import functools

from benchmarks._harness import measure_in_subprocess, write_section


def _zoo_forward(name: str, batch: int, size: int):
    import timm
    import torch

    import zoo  # noqa: F401

    model = timm.create_model(name).eval()
    x = torch.randn(batch, 3, size, size)

    def run():
        with torch.inference_mode():
            return model(x)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="zoo_*")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import timm

    import zoo  # noqa: F401

    selected = timm.list_models(args.models)
    rows = ["| model | images/s | peak memory (MiB) |", "|---|---:|---:|"]
    for name in selected:
        sec, mem = measure_in_subprocess(functools.partial(_zoo_forward, name, args.batch, args.size), args.threads)
        rows.append(f"| {name} | {args.batch / sec:.1f} | {mem:.0f} |")
        print(rows[-1], flush=True)

    text = f"CPU inference, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, fp32.\n\n" + "\n".join(
        rows
    )
    write_section("models", text, title="Model throughput and memory (CPU)")


if __name__ == "__main__":
    main()
