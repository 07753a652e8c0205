"""Video DiT on moving digits: PSA vs dense attention, judged by a classifier that never saw the training digits.

    python -m benchmarks.video_dit_digits --psa RUN_DIR --dense RUN_DIR

RUN_DIR is a training run's log directory (`.../lightning_logs/version_N`, holding `pipeline/` and
`training_summary.json`, as `train/video_dit.py` leaves them). For each run the script loads the exported
diffusers folder, generates `--per-class` clips of every digit, and has an independent evaluator label
every frame: a small CNN trained here on the *held-back* digits (the classification recipe's val split,
which the video model never saw), rendered by the same `render_clip` at random positions. It reports:

- frame accuracy: the fraction of generated frames the evaluator labels as the requested digit;
- label consistency: the fraction of consecutive frame pairs that get the same label;
- shape consistency: the mean, over consecutive frame pairs, of the best normalised correlation of the two
  frames over shifts of up to 3 pixels (1.0 for a rigid moving digit, as the real clips are);
- training speed (optimizer steps per second and wall time, from the run's summary) and PSA's density.

The same figures on real clips of the train digits calibrate the evaluator (`zoo.evaluation`, which the shipped
checkpoint's quality test uses too). The section goes to BENCHMARKS.md through
`benchmarks._harness.write_section("video_dit_digits", ...)`; `--ship DIR` also copies the PSA run's pipeline
to DIR with a model card (how `checkpoints/zoo-video-dit-digits` was made).
"""

from __future__ import annotations

if not __package__:  # run as a file, `benchmarks` and `tests` would not import
    raise SystemExit("run from the repository root as: python -m benchmarks.video_dit_digits [args]")

import argparse
import json
from pathlib import Path

import torch

from benchmarks._harness import write_section
from zoo.evaluation import clip_metrics, generate_clips, train_frame_classifier
from zoo.training.video_data import MovingDigits

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--psa", type=Path, required=True, help="log directory of the PSA run")
    parser.add_argument("--dense", type=Path, required=True, help="log directory of the dense run")
    parser.add_argument("--per-class", type=int, default=10, help="clips generated per digit")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated clips' noise")
    parser.add_argument(
        "--extra-seeds", type=int, nargs="*", default=[], help="more noise seeds: frame accuracy of both models"
    )
    parser.add_argument(
        "--also",
        type=Path,
        nargs="*",
        default=[],
        help="more run directories (the same recipe on other training seeds, PSA or dense): rows of their own",
    )
    parser.add_argument(
        "--evaluator-steps", type=int, default=600, help="training steps of the digit reader (fewer: a quick look)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--ship", type=Path, default=None, help="copy the PSA run's pipeline here, with README")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one thread is the fastest on the shared CPU these runs were made on
    clip = {**_run_config(args.psa)["data"]}
    clip["size"] = clip["frame_size"]
    classifier, evaluator_acc = train_frame_classifier(clip["size"], clip["digit_size"], steps=args.evaluator_steps)
    print(f"evaluator accuracy on frames of unseen (train-split) digits: {evaluator_acc:.4f}", flush=True)
    real = MovingDigits(
        "train", 100, clip["num_frames"], clip["size"], clip["digit_size"], clip.get("max_speed", 1.0), seed=123
    )
    real_clips = torch.stack([real[i][0][0] for i in range(len(real))])
    real_labels = torch.tensor([real[i][1] for i in range(len(real))])
    rows = {"real clips (train digits)": {**clip_metrics(classifier, real_clips, real_labels)}}
    runs = {"PSA": args.psa, "dense": args.dense}
    for run in args.also:
        runs[run_name(run)] = run
    for name, run in runs.items():
        summary = json.loads((run / "training_summary.json").read_text())
        clips, labels, seconds, density = generate_clips(
            run / "pipeline", args.per_class, args.steps, args.guidance, seed=args.seed
        )
        rows[name] = {**clip_metrics(classifier, clips, labels), "summary": summary, "sample_s": seconds}
        rows[name]["density"] = density
        model_config = _run_config(run)["model"]
        rows[name]["attention"] = model_config["attention"]
        rows[name]["psa_config"] = model_config.get("psa_config") if model_config["attention"] == "psa" else None
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "summary"}), flush=True)

    # The same models on other noise seeds: is the PSA/dense gap larger than the sampling noise?
    extra = {}
    for seed in args.extra_seeds:
        extra[seed] = {
            name: clip_metrics(
                classifier, *generate_clips(run / "pipeline", args.per_class, args.steps, args.guidance, seed=seed)[:2]
            )["frame_accuracy"]
            for name, run in runs.items()
        }
        print("seed", seed, json.dumps(extra[seed]), flush=True)
    rows["PSA"]["extra_seeds"] = extra

    def fmt(row: dict, key: str, spec: str = ".3f") -> str:
        return format(row[key], spec) if row.get(key) is not None else "-"

    lines = [
        "| model | frame accuracy | clip accuracy | label consistency | shape consistency | train steps/s "
        "| train wall time | PSA density | sampling s/clip |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        s = row.get("summary")
        speed = f"{s['steps'] / s['train_seconds']:.3f}" if s else "-"
        wall = f"{s['train_seconds'] / 60:.1f} min ({s['steps']} steps)" if s else "-"
        density = fmt(row, "density", ".3f") if row.get("attention") == "psa" else ("1.000" if s else "-")
        sample = fmt(row, "sample_s", ".2f") if s else "-"
        lines.append(
            f"| {name} | {fmt(row, 'frame_accuracy')} | {fmt(row, 'clip_accuracy')} | {fmt(row, 'label_consistency')} "
            f"| {fmt(row, 'shape_consistency')} | {speed} | {wall} | {density} | {sample} |"
        )
    psa_s, dense_s = rows["PSA"]["summary"], rows["dense"]["summary"]
    ratio = (psa_s["steps"] / psa_s["train_seconds"]) / (dense_s["steps"] / dense_s["train_seconds"])
    seeds_line = []
    if extra:
        # Frame accuracy of every run on every noise seed; the PSA/dense gap both against the dense run of the
        # same training seed and, where other training seeds ran, against the mean over them.
        by_seed = {args.seed: {n: r["frame_accuracy"] for n, r in rows.items() if "summary" in r}, **extra}
        dense_names = [n for n, r in rows.items() if r.get("attention") == "dense"]
        # Training seeds of the shipped PSA recipe only: rows of other PSA settings are not averaged in.
        psa_names = [n for n, r in rows.items() if r.get("psa_config") and r["psa_config"] == rows["PSA"]["psa_config"]]
        gaps = [e["PSA"] - e["dense"] for e in by_seed.values()]
        seeds_line = [
            "",
            "Frame accuracy on every noise seed ("
            + ", ".join(runs)
            + "): "
            + "; ".join(f"seed {k}: " + " / ".join(f"{e[n]:.3f}" for n in runs) for k, e in by_seed.items())
            + f". PSA minus dense (same training seed) over {len(gaps)} noise seeds: mean "
            f"{100 * sum(gaps) / len(gaps):+.1f} points (from {100 * min(gaps):+.1f} to {100 * max(gaps):+.1f}).",
        ]
        if len(dense_names) > 1 or len(psa_names) > 1:
            mean = {
                kind: sum(e[n] for e in by_seed.values() for n in names) / (len(by_seed) * len(names))
                for kind, names in (("psa", psa_names), ("dense", dense_names))
            }
            seeds_line[-1] += (
                f" Mean over training runs and noise seeds: PSA {mean['psa']:.3f} ({len(psa_names)} training "
                f"seed(s)), dense {mean['dense']:.3f} ({len(dense_names)} training seed(s)); per dense training "
                "seed: "
                + ", ".join(f"{n} {sum(e[n] for e in by_seed.values()) / len(by_seed):.3f}" for n in dense_names)
                + "."
            )
    markdown = "\n".join(
        [
            "The zoo's `VideoDiT` trained by `python train/video_dit.py --config configs/video/video_dit_digits.yaml`"
            " (PSA self-attention) and the same command with `--model.attention dense`, same steps, seed and data; "
            f"{args.per_class} clips generated per digit with {args.steps} Euler steps, guidance {args.guidance}. "
            "Frames are labelled by a small CNN trained only on the held-back digits (the classification recipe's "
            f"val split), never on the digits the video model learned from; its accuracy on frames of those unseen "
            f"digits is {evaluator_acc:.3f}. Shape consistency: best normalised correlation of consecutive frames "
            "over shifts of up to 3 pixels. PSA settings of the PSA run: "
            f"`{json.dumps(rows['PSA']['psa_config'])}`."
            + (
                " Rows named by a training seed are the same command with `--seed_everything N` (and, for dense, "
                "`--model.attention dense`), evaluated the same way."
                if args.also
                else ""
            ),
            "",
            *lines,
            "",
            f"PSA / dense training speed: {ratio:.2f}x (steps/s ratio of each run's own training-step time; each "
            "run shared the 2-core CPU with one other training run, one thread each, `model.cpu_threads: 1`). "
            "Run summaries: "
            f"PSA `{json.dumps(psa_s)}`, dense `{json.dumps(dense_s)}`.",
            *seeds_line,
        ]
    )
    if args.no_write:
        print(markdown)
    else:
        write_section("video_dit_digits", markdown, title="Video DiT on moving digits: PSA vs dense")
        print(markdown)
    if args.ship is not None:
        ship(args.psa, args.ship, rows, evaluator_acc, args)
        print(f"shipped {args.psa / 'pipeline'} to {args.ship}")


def _run_config(run: Path) -> dict:
    """The LightningCLI config a run saved (`config.yaml` in its log directory)."""
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def run_name(run: Path) -> str:
    """A row name for a run from its saved config, e.g. "dense, training seed 1" or
    "PSA level_bounds [0.5, 0.75, 0.875, 1.0], training seed 1"."""
    config = _run_config(run)
    if config["model"]["attention"] == "dense":
        kind = "dense"
    else:
        kind = f"PSA level_bounds {list(config['model']['psa_config']['level_bounds'])}"
    return f"{kind}, training seed {config['seed_everything']}"


def ship(run: Path, target: Path, rows: dict, evaluator_acc: float, args: argparse.Namespace) -> None:
    """Copy a run's exported pipeline to `target` with a README (command, time, figures) and a sha256 manifest
    (`sha256sum -c MANIFEST.sha256` checks it)."""
    import shutil

    import yaml

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run / "pipeline", target)
    # The sampling settings the figures below were measured at become the pipeline's registered defaults.
    from zoo.video import VideoDiTPipeline, write_manifest

    pipe = VideoDiTPipeline.from_pretrained(str(target))
    pipe.register_to_config(num_inference_steps=args.steps, guidance_scale=args.guidance)
    pipe.save_pretrained(str(target), safe_serialization=True)
    row, dense = rows["PSA"], rows["dense"]
    summary = row["summary"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    command = "python train/video_dit.py --config configs/video/video_dit_digits.yaml"
    if row["frame_accuracy"] >= 0.9:
        status = "It meets the project's bar: at least 90% of generated frames show the requested digit."
    else:
        status = (
            f"**It does not meet the project's bar** (at least 90% of generated frames showing the requested digit): "
            f"{row['frame_accuracy']:.1%} do, and {row['clip_accuracy']:.0%} of the clips show it in most of their "
            "frames; the misses are frames whose digit breaks up or changes shape within a clip (label consistency "
            f"{row['label_consistency']:.3f}, real clips {rows['real clips (train digits)']['label_consistency']:.3f})."
        )
    gap = row["frame_accuracy"] - dense["frame_accuracy"]
    status += (
        f" Against the same run with dense attention PSA is {abs(gap) * 100:.1f} points "
        f"{'above' if gap >= 0 else 'below'} in frame accuracy ({row['frame_accuracy']:.3f} vs "
        f"{dense['frame_accuracy']:.3f})"
    )
    extra = row.get("extra_seeds") or {}
    status += (
        "; on noise seeds "
        + ", ".join(str(k) for k in extra)
        + ": "
        + ", ".join(f"{e['PSA']:.3f} vs {e['dense']:.3f}" for e in extra.values())
        + "."
        if extra
        else "."
    )
    others = [n for n, r in rows.items() if n not in ("PSA", "dense") and "summary" in r]
    if others:
        status += (
            " The same command on other training seeds (noise seed "
            f"{args.seed}): " + ", ".join(f"{n} {rows[n]['frame_accuracy']:.3f}" for n in others) + "."
        )
    readme = f"""# zoo-video-dit-digits

A class-conditional video diffusion transformer (the zoo's `VideoDiT`, {summary["parameters"] / 1e6:.2f} M parameters,
Pyramid Sparse Attention as its self-attention) trained from scratch by flow matching on moving digits:
{config["data"]["num_frames"]}-frame {config["data"]["frame_size"]}x{config["data"]["frame_size"]} clips of
scikit-learn's handwritten digits (the classification recipe's train split) bouncing around a black canvas.
The weights are the EMA weights at the end of training, float32 safetensors, in a diffusers folder.

Made by exactly this command (seed 0, on a 2-core CPU, beside a dense-attention run on the other core):

    {command}

Training: {summary["steps"]} optimizer steps of {config["data"]["batch_size"]} clips in
{summary["train_seconds"] / 60:.1f} minutes of training-step time ({summary["steps_per_second"]:.2f} steps/s,
precision {summary["precision"]}, last training loss {summary.get("last_train_loss", float("nan")):.4f}).

Quality ({args.per_class} clips per digit, {args.steps} Euler steps, guidance {args.guidance}; evaluator: a CNN
trained only on the held-back digits, {evaluator_acc:.1%} accurate on frames of unseen digits;
`python -m benchmarks.video_dit_digits`, BENCHMARKS.md section video_dit_digits):

| model | frame accuracy | clip accuracy | label consistency | shape consistency | attention density | train steps/s |
|---|---|---|---|---|---|---|
| this (PSA) | {row["frame_accuracy"]:.3f} | {row["clip_accuracy"]:.3f} | {row["label_consistency"]:.3f} | \
{row["shape_consistency"]:.3f} | {row["density"] if row["density"] is None else format(row["density"], ".3f")} | \
{summary["steps_per_second"]:.2f} |
| same run, dense attention | {dense["frame_accuracy"]:.3f} | {dense["clip_accuracy"]:.3f} | \
{dense["label_consistency"]:.3f} | {dense["shape_consistency"]:.3f} | 1.000 | \
{dense["summary"]["steps_per_second"]:.2f} |
| real clips (reference) | {rows["real clips (train digits)"]["frame_accuracy"]:.3f} | - | - | \
{rows["real clips (train digits)"]["shape_consistency"]:.3f} | - | - |

{status}

Use (the defaults of a call are the settings above: {config["data"]["num_frames"]} frames of \
{config["data"]["frame_size"]}x{config["data"]["frame_size"]} from the transformer's config,
`sample_frames` and `sample_size`; {args.steps} steps and guidance {args.guidance:g} from the pipeline's config in \
`model_index.json`):

    from zoo.video import VideoDiTPipeline
    pipe = VideoDiTPipeline.from_pretrained("checkpoints/zoo-video-dit-digits")
    frames = pipe([3, 7]).frames   # (2, {config["data"]["num_frames"]}, {config["data"]["frame_size"]}, \
{config["data"]["frame_size"]}, 1) in [0, 1]

or `python -m zoo.generate checkpoints/zoo-video-dit-digits --labels 3 7 --out samples/`. The evaluator above
judges any generations of it (`zoo.evaluation`: `train_frame_classifier({config["data"]["frame_size"]}, \
{config["data"]["digit_size"]})`, `generate_clips`, `clip_metrics`).
`from_pretrained` checks the files against `MANIFEST.sha256` first (as `sha256sum -c MANIFEST.sha256` in this
folder does) and names any file that does not match.
"""
    (target / "README.md").write_text(readme)
    write_manifest(target)


if __name__ == "__main__":
    main()
