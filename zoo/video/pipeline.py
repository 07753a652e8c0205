"""Class-conditional video generation with the zoo's `VideoDiT`: a diffusers `DiffusionPipeline`.

    pipe = VideoDiTPipeline(transformer=VideoDiT.from_size("s"), scheduler=FlowMatchEulerDiscreteScheduler())
    video = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0)).frames  # (2, 8, 32, 32, 3)
    pipe.save_pretrained("my-pipe")                   # model_index.json, transformer/, scheduler/
    pipe = VideoDiTPipeline.from_pretrained("my-pipe")

Defaults come from the model, as in diffusers' pipelines: the clip size from the transformer's config
(`sample_frames`, `sample_size`: what it was trained on) and the steps and guidance from the pipeline's own
registered config (`num_inference_steps`, `guidance_scale`: what its quality was measured at), which
`save_pretrained` writes to `model_index.json` and `from_pretrained` reads back. Called with labels only, a
shipped folder samples as its model card says.

`from_pretrained` of a local folder holding `MANIFEST.sha256` (sha256sum's format, `write_manifest` writes one)
checks every file it lists, and that no file the pipeline loads is missing from it, before loading anything;
a mismatch raises `ManifestError` naming the file.

The transformer works on pixels (its `in_channels` are the video's channels); values in [-1, 1]
become frames in [0, 1] through diffusers' `VideoProcessor`, ready for `diffusers.utils.export_to_gif`
(`output_type="pil"`) or `export_to_video`.

`save_pretrained` names this class in `model_index.json`; loading goes through this class's own
`from_pretrained` (diffusers' generic `DiffusionPipeline.from_pretrained` resolves only diffusers'
classes). The transformer is recorded under its module, `zoo.video.dit`, which diffusers imports.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .dit import VideoDiT

__all__ = ["ManifestError", "VideoDiTPipeline", "VideoPipelineOutput", "verify_manifest", "write_manifest"]

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
MANIFEST = "MANIFEST.sha256"


class ManifestError(ValueError):
    """A pipeline folder's files do not match its `MANIFEST.sha256`."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write `MANIFEST.sha256` (sha256sum's format, `sha256sum -c` checks it) over every file of `folder`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{_sha256(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / MANIFEST).write_text("\n".join(lines) + "\n")
    return folder / MANIFEST


def verify_manifest(folder: str | os.PathLike) -> None:
    """Check a folder against its `MANIFEST.sha256`; no manifest, nothing to check.

    Every listed file must exist and match its digest, and every file the pipeline would load
    (`model_index.json` and everything in its components' subfolders) must be listed.

    Raises:
        ManifestError: naming the first file that fails and why.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    listed = {}
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise ManifestError(f"{manifest}: line {number} is not '<sha256>  <file>': {line!r}")
        listed[name.lstrip("*")] = digest.lower()
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{path} is listed in {MANIFEST} but missing")
        if _sha256(path) != digest:
            raise ManifestError(f"{path} does not match its sha256 in {MANIFEST} (changed or corrupted)")
    loaded = [folder / "model_index.json"] + [
        p for sub in folder.iterdir() if sub.is_dir() for p in sub.rglob("*") if p.is_file()
    ]
    for path in loaded:
        if path.is_file() and path.relative_to(folder).as_posix() not in listed:
            raise ManifestError(f"{path} is not listed in {MANIFEST}: a file the pipeline loads must be")


@dataclass
class VideoPipelineOutput(BaseOutput):
    """Output of `VideoDiTPipeline`.

    Attributes:
        frames: "np": (batch, frames, height, width, channels) float32 in [0, 1]; "pt": (batch, frames,
            channels, height, width) in [0, 1]; "pil": a list (batch) of lists (frames) of PIL images;
            "latent": the raw (batch, channels, frames, height, width) sample.
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]


class VideoDiTPipeline(DiffusionPipeline):
    """Class-conditional video sampling: flow-matching Euler steps with classifier-free guidance.

    Args:
        transformer: the `VideoDiT` that predicts the velocity.
        scheduler: a `FlowMatchEulerDiscreteScheduler`.
        num_inference_steps: the default number of Euler steps of a call (registered config).
        guidance_scale: the default classifier-free guidance of a call (registered config).
    """

    model_cpu_offload_seq = "transformer"

    def __init__(
        self,
        transformer: VideoDiT,
        scheduler: FlowMatchEulerDiscreteScheduler,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
    ):
        super().__init__()
        if not isinstance(transformer, VideoDiT):
            raise ValueError(f"transformer must be a VideoDiT, got {type(transformer).__name__}")
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"scheduler must be a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        _check_steps(num_inference_steps)
        _check_guidance(guidance_scale)
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.register_to_config(num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale))
        self.video_processor = VideoProcessor(do_resize=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> VideoDiTPipeline:
        """diffusers' `from_pretrained`, after checking a local folder against its `MANIFEST.sha256` (if any)."""
        if os.path.isdir(pretrained_model_name_or_path):
            verify_manifest(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def default_size(self) -> tuple[int, int, int]:
        """(num_frames, height, width) the transformer was trained on: a call's defaults."""
        cfg = self.transformer.config
        size = cfg.get("sample_size", 32)
        height, width = (size, size) if isinstance(size, int) else size
        return int(cfg.get("sample_frames", 8)), int(height), int(width)

    def check_inputs(
        self, labels: list[int], num_frames: int, height: int, width: int, steps: int, guidance: float, output_type: str
    ) -> None:
        cfg = self.transformer.config
        pt, ph, pw = cfg.patch_size
        if not labels:
            raise ValueError("class_labels must name at least one class")
        _check_guidance(guidance)
        bad = [c for c in labels if not 0 <= c < cfg.num_classes]
        if bad:
            raise ValueError(f"class_labels must lie in [0, {cfg.num_classes}), got {bad}")
        for name, value, patch in (("num_frames", num_frames, pt), ("height", height, ph), ("width", width, pw)):
            if not (isinstance(value, int) and value > 0 and value % patch == 0):
                raise ValueError(f"{name} must be a positive multiple of the patch size {patch}, got {value!r}")
        _check_steps(steps)
        if guidance > 1.0 and cfg.class_dropout_prob <= 0:
            raise ValueError(
                "guidance_scale > 1 needs the null label of a transformer trained with class_dropout_prob > 0"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | np.ndarray,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> VideoPipelineOutput | tuple:
        """Generate one video per class label.

        Args:
            class_labels: class index or list of them (ints, or an integer array/tensor), each in [0, num_classes).
            num_frames, height, width: video size, multiples of the transformer's patch size; None for the size
                the transformer was trained on (its config's `sample_frames`, `sample_size`).
            num_inference_steps: Euler steps; None for the pipeline's registered default.
            guidance_scale: classifier-free guidance weight, finite and >= 0; 1 or less disables guidance. None
                for the pipeline's registered default.
            generator: torch generator(s) for the initial noise.
            latents: (B, C, T, H, W) initial noise instead of drawing it.
            output_type: "np", "pil", "pt" or "latent".
            return_dict: return a `VideoPipelineOutput` rather than a tuple.

        Returns:
            `VideoPipelineOutput` with `frames` (see its docstring for the layout of each output type).
        """
        labels = _labels(class_labels)
        frames, h, w = self.default_size
        num_frames = frames if num_frames is None else num_frames
        height = h if height is None else height
        width = w if width is None else width
        if num_inference_steps is None:
            num_inference_steps = self.config.num_inference_steps
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(labels, num_frames, height, width, num_inference_steps, guidance_scale, output_type)
        device, dtype = self._execution_device, self.transformer.dtype
        shape = (len(labels), self.transformer.config.in_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)

        guided = guidance_scale > 1.0
        cond = torch.tensor(labels, device=device)
        if guided:
            null = torch.full_like(cond, self.transformer.config.num_classes)
            cond = torch.cat([cond, null])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Sampling must not drop labels at random, as the label embedding does in training mode.
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                model_in = torch.cat([latents, latents]) if guided else latents
                velocity = self.transformer(model_in, t.expand(model_in.shape[0]), cond, denoising_step=i).sample
                if guided:
                    v_cond, v_null = velocity.chunk(2)
                    velocity = v_null + guidance_scale * (v_cond - v_null)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
        finally:
            self.transformer.train(was_training)

        if output_type == "latent":
            frames = latents
        else:
            frames = self.video_processor.postprocess_video(latents.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return VideoPipelineOutput(frames=frames) if return_dict else (frames,)


def _check_steps(steps) -> None:
    if isinstance(steps, bool) or not (isinstance(steps, numbers.Integral) and steps > 0):
        raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")


def _check_guidance(guidance) -> None:
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance!r}")
    if guidance < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 or less disables guidance), got {guidance!r}")


def _labels(class_labels) -> list[int]:
    """class_labels as a list of Python ints; anything but integers is an error that names it."""
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        dtype = class_labels.dtype
        integral = (
            (not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool)
            if isinstance(class_labels, torch.Tensor)
            else np.issubdtype(dtype, np.integer)
        )
        if not integral or class_labels.ndim > 1:
            raise ValueError(f"class_labels must be integers, got a {tuple(class_labels.shape)} {dtype} array")
        return [int(c) for c in class_labels.reshape(-1).tolist()]
    items = [class_labels] if not isinstance(class_labels, (list, tuple)) else list(class_labels)
    for c in items:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise ValueError(f"class_labels must be integers, got {c!r} ({type(c).__name__})")
    return [int(c) for c in items]
