"""BiFormer T/S/B against the authors' computation, same weights, both sides alternated in one process (CPU).

    flock /tmp/bench.lock python -m benchmarks.biformer_vs_official [--sizes t s b] [--batch 8] [--rounds 5]

The anchor is `tests/anchors/biformer_official.py`: the official forward step by step (the authors'
models/biformer.py: gather of `topk` key/value copies per region, materialized attention). Inference runs
under `torch.no_grad()`; a training step is forward, mean-square loss and backward (no optimizer step) with
every parameter requiring grad on both sides. Speed = official time / zoo time (above 1 favours the zoo).
Writes the "biformer_vs_official" section of BENCHMARKS.md.
"""

from __future__ import annotations

if not __package__:  # run as a file, `benchmarks` and `tests` would not import
    raise SystemExit("run from the repository root as: python -m benchmarks.biformer_vs_official [args]")

import argparse

import torch

from benchmarks._harness import alternate, write_section


def measure(size: str, batch: int, resolution: int, rounds: int) -> list[tuple]:
    import timm

    import zoo  # noqa: F401
    from tests.anchors.biformer_official import official_biformer_forward, random_official_state_dict
    from zoo.models.biformer import checkpoint_filter_fn

    sd = random_official_state_dict(size)
    model = timm.create_model(f"zoo_biformer_{size}")
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    x = torch.randn(batch, 3, resolution, resolution)
    rows = []

    model.eval()

    def zoo_inference():
        with torch.no_grad():
            model(x)

    def official_inference():
        with torch.no_grad():
            official_biformer_forward(sd, x, size)

    rows.append((size, "inference", *alternate(zoo_inference, official_inference, rounds)))

    # Training step: eval mode on both sides (the official functional forward has no dropout or
    # drop-path), so the two compute the same function and gradients.
    sd_grad = {k: v.clone().requires_grad_(v.is_floating_point() and "running" not in k) for k, v in sd.items()}

    def zoo_step():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    def official_step():
        for v in sd_grad.values():
            v.grad = None
        official_biformer_forward(sd_grad, x, size).square().mean().backward()

    rows.append((size, "training step", *alternate(zoo_step, official_step, max(3, rounds // 2))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["t", "s", "b"], choices=["t", "s", "b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [
        f"CPU, fp32, batch {args.batch}, {args.resolution}x{args.resolution}, {args.threads} threads; zoo and official "
        f"alternated in one process, medians of {args.rounds} rounds (training: of {max(3, args.rounds // 2)}). "
        "Speed = official time / zoo time.",
        "",
        "| model | pass | zoo ms | official ms | speed | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    # Issue 16's targets: inference >= 1.5x the authors' code, a training step >= 1.2x.
    least = {"inference": 1.5, "training step": 1.2}
    for size in args.sizes:
        for s, mode, tz, to in measure(size, args.batch, args.resolution, args.rounds):
            verdict = "met" if to / tz >= least[mode] else "**not met**"
            lines.append(
                f"| zoo_biformer_{s} | {mode} | {tz * 1e3:.0f} | {to * 1e3:.0f} | {to / tz:.2f}x "
                f"| >= {least[mode]:g}x: {verdict} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("biformer_vs_official", text, title="BiFormer against the authors' computation (CPU)")


if __name__ == "__main__":
    main()
