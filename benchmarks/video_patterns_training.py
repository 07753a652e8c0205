"""Training the digits video DiT with each sparse-attention pattern at one density, against dense at the same steps.

    flock /tmp/bench.lock python -m benchmarks.video_patterns_training [--steps 400] [--density 0.4] [--no-write]

Each run is the recipe (configs/video/video_dit_digits.yaml: its model, data, optimizer and schedule, one CPU
thread) from the same seed for `--steps` updates, with `--model.attention` set to dense, PSA (full-resolution
quota at the density, blocks of 32 x 16), STA, GNA, Radial or VMoBA (`--model.pattern_config`, tiles of 1 x 2 x 2
tokens, VMoBA at its default threshold 0.25 whatever the density). Reported: the flow-matching loss averaged over
the last quarter of the steps, training steps/s, the attention density reached, and the frame accuracy of the
EMA weights' samples (20 clips, two per digit, the recipe's 25 steps and guidance 8) by the project's evaluator
(`zoo.evaluation`). A short run is a comparison at equal steps, not a trained model: the shipped
checkpoint took 18,000 steps.
"""

from __future__ import annotations

if not __package__:  # run as a file, `benchmarks` and `tests` would not import
    raise SystemExit("run from the repository root as: python -m benchmarks.video_patterns_training [args]")

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks._harness import write_section

ROOT = Path(__file__).resolve().parent.parent

RUNS = ("dense", "psa", "sta", "neighborhood", "radial", "vmoba")


def _read_losses(path: Path) -> list[float]:
    import csv

    with open(path) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def train(attention: str, steps: int, density: float, root: Path) -> dict:
    from zoo.training import MovingDigitsData, VideoDiTTask
    from zoo.training.cli import main as launch

    args = [
        f"--config={ROOT / 'configs/video/video_dit_digits.yaml'}",
        f"--model.attention={attention}",
        f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=1000",
        "--samples.every_n_epochs=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
    ]
    if attention == "psa":
        args.append(
            "--model.psa_config={block_q: 32, block_k: 16, assignment: quota, "
            f"level_bounds: [{density}, {density}, {density}, {density}], warmup_steps: 0}}"
        )
    elif attention != "dense":
        args.append(f"--model.pattern_config={{density: {density}, tile: [1, 2, 2], chunk: [2, 4, 4]}}")
    launch(VideoDiTTask, MovingDigitsData, args)
    run = root / "lightning_logs" / "version_0"
    losses = _read_losses(run / "metrics.csv")
    summary = json.loads((run / "training_summary.json").read_text())
    return {"losses": losses, "steps_per_second": summary["steps_per_second"], "pipeline": run / "pipeline"}


def evaluate(pipeline: Path, classifier) -> tuple[float, float]:
    """(frame accuracy, mean attention density) of 20 clips sampled from the exported pipeline."""
    from zoo.evaluation import clip_metrics
    from zoo.video import VideoDiTPipeline

    pipe = VideoDiTPipeline.from_pretrained(str(pipeline))
    pipe.set_progress_bar_config(disable=True)
    labels = [d for d in range(10) for _ in range(2)]
    densities = []

    def record(module, args, output):  # the mean over the blocks of this forward
        values = []
        for block in module.blocks:
            processor = block.attn.processor
            if hasattr(processor, "state"):  # PSA's processors share a per-layer record
                values = [float(d) for d in processor.state.densities.values()]
                break
            density = getattr(processor, "last_density", None)
            values.append(1.0 if density is None else float(density))
        densities.append(sum(values) / max(1, len(values)))

    pipe.transformer.register_forward_hook(record)
    video = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").frames  # (B, T, 1, S, S)
    accuracy = clip_metrics(classifier, video[:, :, 0] * 2 - 1, torch.tensor(labels))["frame_accuracy"]
    return accuracy, sum(densities) / max(1, len(densities))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--density", type=float, default=0.4)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from zoo.evaluation import train_frame_classifier

    torch.set_num_threads(1)
    classifier, _ = train_frame_classifier(size=16, digit_size=8)
    rows = []
    for attention in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            result = train(attention, args.steps, args.density, Path(tmp))
            accuracy, density = evaluate(result["pipeline"], classifier)
        tail = result["losses"][-max(1, len(result["losses"]) // 4) :]
        rows.append(
            f"| {attention} | {density:.3f} | {sum(tail) / len(tail):.4f} | {result['steps_per_second']:.2f} "
            f"| {accuracy:.3f} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            f"The digits recipe trained {args.steps} steps from the same seed with each attention at density "
            f"{args.density} (`python -m benchmarks.video_patterns_training`; method in its docstring); one CPU "
            "thread per run.",
            "",
            "| attention | density (sampling) | loss, last quarter | train steps/s | frame accuracy |",
            "|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(text)
    if not args.no_write:
        write_section("video_patterns_training", text, title="Training the digits video DiT with each pattern (CPU)")


if __name__ == "__main__":
    main()
