"""Routed attention on the CPU: the chunked reference against the straightforward gather (official form).

    python benchmarks/routed_attention.py [--batch 8] [--threads 2]

Shapes are BiFormer-T's three routing stages (7x7 regions, head dim 32; 2/4/8 heads; topk 1/4/16) at
224x224, batch 8 (classification), and at 896x896, batch 2 (detection-sized maps, larger regions). Each
measurement runs in a fresh process; peak memory is the resident high-water mark of one call above the
level after the inputs exist. Writes the "routed_attention" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import measure_in_subprocess, write_section  # noqa: E402

# (image size, batch) -> stage -> (heads, tokens per region, topk)
CASES = {
    (224, 8): {"stage 1": (2, 64, 1), "stage 2": (4, 16, 4), "stage 3": (8, 4, 16)},
    (896, 2): {"stage 1": (2, 1024, 1), "stage 2": (4, 256, 4), "stage 3": (8, 64, 16)},
}


def _setup(impl: str, heads: int, tokens: int, topk: int, batch: int, backward: bool):
    import torch

    from kernels.routed_attention import routed_attention_gather, routed_attention_reference

    regions = 49
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, regions, tokens, 32, generator=gen).requires_grad_(backward) for _ in range(3))
    index = torch.stack([torch.randperm(regions, generator=gen)[:topk] for _ in range(batch * regions)])
    index = index.view(batch, regions, topk)
    fn = routed_attention_reference if impl == "reference" else routed_attention_gather

    def run():
        if backward:
            fn(q, k, v, index, 32**-0.5).sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v, index, 32**-0.5)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    lines = [
        "| input | stage | pass | reference ms | gather ms | speed ratio | reference peak MiB | gather peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (size, batch), stages in CASES.items():
        for stage, (heads, tokens, topk) in stages.items():
            for backward in (False, True):
                shape = (heads, tokens, topk, batch, backward)
                ref = measure_in_subprocess(functools.partial(_setup, "reference", *shape), args.threads)
                gat = measure_in_subprocess(functools.partial(_setup, "gather", *shape), args.threads)
                lines.append(
                    f"| {batch}x{size}x{size} | {stage}: {heads} heads, {tokens} tokens/region, topk {topk} "
                    f"| {'fwd+bwd' if backward else 'fwd'} "
                    f"| {ref[0] * 1e3:.2f} | {gat[0] * 1e3:.2f} | {gat[0] / ref[0]:.2f} | {ref[1]:.1f} | {gat[1]:.1f} |"
                )
                print(lines[-1], flush=True)
    text = (
        f"49 regions, head dim 32, fp32, {args.threads} threads. Speed ratio = gather time / reference time "
        "(above 1 favours the reference). fwd runs under `torch.no_grad()` (the reference works in slabs of query "
        "regions); fwd+bwd computes everything at once in both.\n\n" + "\n".join(lines)
    )
    write_section("routed_attention", text, title="Routed attention on the CPU: reference vs gather")


if __name__ == "__main__":
    main()
