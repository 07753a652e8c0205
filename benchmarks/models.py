"""CPU inference throughput and peak memory of every registered zoo model, and BiFormer against the
official gather-based computation, in one run.

    python benchmarks/models.py [--models 'zoo_*'] [--batch 8] [--size 224] [--threads 2]

Each measurement runs in a fresh process (peak memory = resident-set high-water mark of one forward
above the level after building the model). Writes the "models" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import measure_in_subprocess, write_section  # noqa: E402


def _zoo_forward(name: str, batch: int, size: int, state_dict_size: str | None = None):
    import timm
    import torch

    import zoo  # noqa: F401

    model = timm.create_model(name).eval()
    if state_dict_size is not None:
        from benchmarks.anchors.biformer_official import random_official_state_dict
        from zoo.models.biformer import checkpoint_filter_fn

        model.load_state_dict(checkpoint_filter_fn(random_official_state_dict(state_dict_size), model))
    x = torch.randn(batch, 3, size, size)

    def run():
        with torch.inference_mode():
            return model(x)

    return run


def _official_biformer_forward(size_name: str, batch: int, size: int):
    import torch

    from benchmarks.anchors.biformer_official import official_biformer_forward, random_official_state_dict

    sd = random_official_state_dict(size_name)
    x = torch.randn(batch, 3, size, size)

    def run():
        with torch.inference_mode():
            return official_biformer_forward(sd, x, size_name)

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

    anchor = [
        "| model | zoo images/s | official images/s | speed ratio | zoo peak MiB | official peak MiB | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size_name in ("t", "s", "b"):
        name = f"zoo_biformer_{size_name}"
        if name not in selected:
            continue
        zs, zm = measure_in_subprocess(
            functools.partial(_zoo_forward, name, args.batch, args.size, size_name), args.threads
        )
        os_, om = measure_in_subprocess(
            functools.partial(_official_biformer_forward, size_name, args.batch, args.size), args.threads
        )
        anchor.append(
            f"| {name} | {args.batch / zs:.1f} | {args.batch / os_:.1f} | {os_ / zs:.2f} | {zm:.0f} | {om:.0f} "
            f"| {zm / om:.2f} |"
        )
        print(anchor[-1], flush=True)

    text = (
        f"CPU inference, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, fp32.\n\n"
        + "\n".join(rows)
        + "\n\n### BiFormer against the official computation\n\n"
        "The anchor is `benchmarks/anchors/biformer_official.py`: the official forward step by step (gather of "
        "`topk` key/value copies per region, materialized attention), same weights. Ratios above 1 favour the zoo.\n\n"
        + "\n".join(anchor)
    )
    write_section("models", text, title="Model throughput and memory (CPU)")


if __name__ == "__main__":
    main()
