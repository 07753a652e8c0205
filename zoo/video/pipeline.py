"""Class-conditional video generation with the zoo's `VideoDiT`: a diffusers `DiffusionPipeline`.

    pipe = VideoDiTPipeline(transformer=VideoDiT.from_size("s"), scheduler=FlowMatchEulerDiscreteScheduler())
    video = pipe(class_labels=[3, 7], num_frames=8, height=32, width=32, num_inference_steps=20,
                 guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).frames  # (2, 8, 32, 32, 3)
    pipe.save_pretrained("my-pipe")                   # model_index.json, transformer/, scheduler/
    pipe = VideoDiTPipeline.from_pretrained("my-pipe")

The transformer works on pixels (its `in_channels` are the video's channels); values in [-1, 1]
become frames in [0, 1] through diffusers' `VideoProcessor`, ready for `diffusers.utils.export_to_gif`
(`output_type="pil"`) or `export_to_video`.

`save_pretrained` names this class in `model_index.json`; loading goes through this class's own
`from_pretrained` (diffusers' generic `DiffusionPipeline.from_pretrained` resolves only diffusers'
classes). The transformer is recorded under its module, `zoo.video.dit`, which diffusers imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .dit import VideoDiT

__all__ = ["VideoDiTPipeline", "VideoPipelineOutput"]

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


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
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: VideoDiT, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        if not isinstance(transformer, VideoDiT):
            raise ValueError(f"transformer must be a VideoDiT, got {type(transformer).__name__}")
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"scheduler must be a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.video_processor = VideoProcessor(do_resize=False)

    def check_inputs(
        self, labels: list[int], num_frames: int, height: int, width: int, steps: int, guidance: float, output_type: str
    ) -> None:
        cfg = self.transformer.config
        pt, ph, pw = cfg.patch_size
        if not labels:
            raise ValueError("class_labels must name at least one class")
        bad = [c for c in labels if not 0 <= c < cfg.num_classes]
        if bad:
            raise ValueError(f"class_labels must lie in [0, {cfg.num_classes}), got {bad}")
        for name, value, patch in (("num_frames", num_frames, pt), ("height", height, ph), ("width", width, pw)):
            if not (isinstance(value, int) and value > 0 and value % patch == 0):
                raise ValueError(f"{name} must be a positive multiple of the patch size {patch}, got {value!r}")
        if not (isinstance(steps, int) and steps > 0):
            raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
        if guidance > 1.0 and cfg.class_dropout_prob <= 0:
            raise ValueError(
                "guidance_scale > 1 needs the null label of a transformer trained with class_dropout_prob > 0"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int],
        num_frames: int = 8,
        height: int = 32,
        width: int = 32,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> VideoPipelineOutput | tuple:
        """Generate one video per class label.

        Args:
            class_labels: class index or list of them, each in [0, num_classes).
            num_frames, height, width: video size, multiples of the transformer's patch size.
            num_inference_steps: Euler steps.
            guidance_scale: classifier-free guidance weight; 1 or less disables guidance.
            generator: torch generator(s) for the initial noise.
            latents: (B, C, T, H, W) initial noise instead of drawing it.
            output_type: "np", "pil", "pt" or "latent".
            return_dict: return a `VideoPipelineOutput` rather than a tuple.

        Returns:
            `VideoPipelineOutput` with `frames` (see its docstring for the layout of each output type).
        """
        labels = [class_labels] if isinstance(class_labels, int) else [int(c) for c in class_labels]
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
