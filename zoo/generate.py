"""Generate class-conditional clips from an exported `VideoDiTPipeline` folder, one GIF or MP4 per sample.

    python -m zoo.generate checkpoints/zoo-video-dit-digits --labels 3 7 --out samples/
    python -m zoo.generate FOLDER --labels 0 1 2 --steps 30 --guidance 4 --seed 1 --format mp4 --out OUT

Files are `OUT/<index>-label=<label>.gif` (or `.mp4`). The defaults are the pipeline's: the clip size the
model was trained on (the transformer's `sample_frames` and `sample_size`) and the steps and guidance its
figures were measured at (the pipeline's registered `num_inference_steps` and `guidance_scale`, in
`model_index.json`). Bad arguments (a label that is not a class, a guidance that is not a finite number >= 0,
an `--out` that is an existing file) are reported before any sampling. The pipeline shows diffusers' progress
bar over the denoising steps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from diffusers.utils import export_to_gif, export_to_video

__all__ = ["generate", "main"]


def generate(
    folder: str | os.PathLike,
    labels: list[int],
    out: str | os.PathLike,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    num_frames: int | None = None,
    size: int | None = None,
    fmt: str = "gif",
    fps: int = 8,
) -> list[Path]:
    """Sample one clip per label and write each to `out`.

    Args:
        folder: a diffusers folder saved by `VideoDiTPipeline.save_pretrained` (model_index.json, ...).
        labels: class labels, one clip each.
        out: output directory (created).
        steps: Euler steps; None for the pipeline's default.
        guidance: classifier-free guidance scale (1 disables it); None for the pipeline's default.
        seed: seed of the initial noise.
        num_frames, size: clip frames and side; None for the size the model was trained on.
        fmt: "gif" or "mp4".
        fps: frames per second of the files.

    Returns:
        The paths written.
    """
    from .video import VideoDiTPipeline

    if fmt not in ("gif", "mp4"):
        raise ValueError(f"format must be 'gif' or 'mp4', got {fmt!r}")
    folder, out = Path(folder), Path(out)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} holds no model_index.json: not a saved VideoDiTPipeline folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; it must be a directory (created if missing)")
    pipe = VideoDiTPipeline.from_pretrained(str(folder))
    videos = pipe(
        list(labels),
        num_frames=num_frames,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil" if fmt == "gif" else "np",
    ).frames
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (label, video) in enumerate(zip(labels, videos, strict=True)):
        path = out / f"{i}-label={label}.{fmt}"
        if fmt == "gif":
            export_to_gif(video, str(path), fps=fps)
        else:
            export_to_video(list(video), str(path), fps=fps)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m zoo.generate FOLDER --labels 3 7 --out OUT`: parse, generate, print the paths."""
    parser = argparse.ArgumentParser(prog="python -m zoo.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="saved VideoDiTPipeline folder (e.g. checkpoints/zoo-video-dit-digits)")
    parser.add_argument("--labels", type=int, nargs="+", required=True, help="class labels, one clip each")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    parser.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: the pipeline's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: as trained)")
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default: as trained)")
    parser.add_argument("--format", choices=("gif", "mp4"), default="gif", help="file format (default gif)")
    parser.add_argument("--fps", type=int, default=8, help="frames per second (default 8)")
    args = parser.parse_args(argv)
    try:
        paths = generate(
            args.folder,
            args.labels,
            args.out,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            num_frames=args.frames,
            size=args.size,
            fmt=args.format,
            fps=args.fps,
        )
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
