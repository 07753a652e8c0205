"""Class-conditional video generation as a LightningModule: the zoo's `VideoDiT` trained by flow matching.

    from zoo.training.video_dit import VideoDiTTask
    from zoo.training.video_data import MovingDigitsData
    task = VideoDiTTask(size="xs", attention="psa")
    lightning.Trainer(max_epochs=2).fit(task, MovingDigitsData())

The objective is rectified flow as diffusers' `FlowMatchEulerDiscreteScheduler` integrates it: a clip x0
and noise n mix as x_s = (1 - s) x0 + s n at a noise level s (timestep 1000 s), and the model regresses the
velocity n - x0. Noise levels are drawn by diffusers' `compute_density_for_timestep_sampling` (uniform or
SD3's logit-normal). Labels are replaced by the null label at `class_dropout_prob` (inside diffusers'
label embedding) so that sampling can use classifier-free guidance. timm's `ModelEmaV3` keeps an average
of the weights; samples, the exported pipeline and the shipped checkpoint use it.

At the end of a fit the EMA weights leave as a diffusers folder, `<log_dir>/pipeline/` (`model_index.json`,
`transformer/`, `scheduler/`; the clip size it was trained on in the transformer's `sample_frames` and
`sample_size`, the pipeline's defaults), that
`VideoDiTPipeline.from_pretrained` loads; `<log_dir>/training_summary.json` records steps and wall time.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils import export_to_gif
from lightning.pytorch import Callback, LightningModule, Trainer

from ..video.dit import VIDEO_DIT_SIZES, VideoDiT
from ..video.pipeline import VideoDiTPipeline
from ..video.psa import psa_state
from .task import TrainingTask

__all__ = ["VideoDiTTask", "VideoSamples", "export_pipeline"]

WEIGHTINGS = ("uniform", "logit_normal")


class VideoSamples(Callback):
    """Writes sample GIFs from the sampling weights every `every_n_epochs` epochs (and after the last).

    Files: `<log_dir>/samples/epoch=<E>-label=<L>.gif`, one per label, same noise every time so that
    epochs compare.

    Args:
        every_n_epochs: epochs between samples; 0 for none.
        labels: class labels to sample.
        num_inference_steps: Euler steps.
        guidance_scale: classifier-free guidance.
        fps: GIF frame rate.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        labels: list[int] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        fps: int = 8,
    ):
        if every_n_epochs < 0:
            raise ValueError(f"samples.every_n_epochs must be >= 0, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.labels = list(labels) if labels is not None else [0, 3, 7]
        self.num_inference_steps, self.guidance_scale, self.fps = num_inference_steps, guidance_scale, fps

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if not self.every_n_epochs or not trainer.is_global_zero or not isinstance(pl_module, VideoDiTTask):
            return
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        if trainer.log_dir is None:
            return
        data = trainer.datamodule
        frames, size = (data.hparams.num_frames, data.hparams.frame_size) if data is not None else (16, 32)
        pipe = pl_module.pipeline()
        pipe.set_progress_bar_config(disable=True)
        videos = pipe(
            self.labels,
            num_frames=frames,
            height=size,
            width=size,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pil",
        ).frames
        out = os.path.join(trainer.log_dir, "samples")
        os.makedirs(out, exist_ok=True)
        for label, video in zip(self.labels, videos, strict=True):
            export_to_gif(video, os.path.join(out, f"epoch={epoch}-label={label}.gif"), fps=self.fps)


class VideoDiTTask(TrainingTask):
    """Flow-matching training of a class-conditional `VideoDiT`.

    Logs `train/loss`, `train/lr` and, with PSA, `train/psa_density` (the fraction of dense attention's
    arithmetic the first block's attention cost). A non-finite loss raises `FloatingPointError`. The schedule
    counts optimizer updates; no validation loop, no best checkpoint (a generator is judged by its samples);
    at the end of a fit `export` writes the pipeline folder and the training summary.

    Args:
        size: a `VIDEO_DIT_SIZES` name ("xs", "s", ...), the starting point of the architecture.
        model_kwargs: `VideoDiT` config entries that override the size's (hidden_size, num_layers, ...).
        in_channels: video channels (1 for the moving digits).
        patch_size: (t, h, w) patch of the 3-D patch embedding.
        num_classes: class labels; the CLI links it to the data's.
        attention: "psa" (pyramid sparse attention), "dense" (SDPA) or a video sparse-attention pattern ("sta",
            "neighborhood", "radial", "vmoba"); the weights are the same either way.
        psa_config: `zoo.blocks.pyramid_sparse.PSAConfig` fields; None for the official defaults.
        pattern_config: `zoo.video.patterns.PatternConfig` fields (density, tile, chunk, threshold) of a pattern.
        class_dropout_prob: share of labels replaced by the null label (classifier-free guidance).
        weighting: noise-level density: "uniform" or "logit_normal" (SD3).
        logit_mean, logit_std: parameters of the logit-normal density.
        opt: timm optimizer name.
        lr: peak learning rate.
        weight_decay: decoupled weight decay (timm leaves norms and biases out).
        opt_betas: Adam betas; None for the optimizer's default.
        sched: timm scheduler name, stepped on every update.
        warmup_steps: linear warm-up, in optimizer updates.
        warmup_lr: learning rate at the first update.
        min_lr: floor of the decay.
        ema_decay: timm `ModelEmaV3` decay; None for no EMA (then the trained weights are exported).
        ema_warmup: ramp the EMA decay up from 0 (short runs).
        cpu_threads: torch intra-op threads when training on a CPU; None keeps torch's default. One thread is
            the fastest on a shared machine, where a second thread mostly waits for its partner.
        condition_init: "unit" re-initialises the timestep and label embeddings at PyTorch's unit scale, so the
            condition reaches the adaLN modulation within a short run; "dit" keeps DiT's std-0.02 init.
    """

    cli_callbacks: ClassVar[dict[str, type[Callback]]] = {"samples": VideoSamples}
    # The shipped checkpoint's run drew its noise from the global generators as they ran on; reseeding every
    # epoch would change every draw after the first epoch.
    reseed_epochs: ClassVar[bool] = False

    def __init__(
        self,
        size: str = "xs",
        model_kwargs: dict[str, Any] | None = None,
        in_channels: int = 1,
        patch_size: tuple[int, int, int] = (4, 4, 4),
        num_classes: int = 10,
        attention: str = "psa",
        psa_config: dict[str, Any] | None = None,
        pattern_config: dict[str, Any] | None = None,
        class_dropout_prob: float = 0.1,
        weighting: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        opt: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        opt_betas: tuple[float, float] | None = None,
        sched: str = "cosine",
        warmup_steps: int = 50,
        warmup_lr: float = 1e-5,
        min_lr: float = 1e-5,
        ema_decay: float | None = 0.999,
        ema_warmup: bool = True,
        cpu_threads: int | None = None,
        condition_init: str = "unit",
    ):
        super().__init__()
        if size not in VIDEO_DIT_SIZES:
            raise ValueError(f"model.size must be one of {sorted(VIDEO_DIT_SIZES)}, got {size!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"model.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"model.class_dropout_prob must lie in [0, 1), got {class_dropout_prob}")
        if condition_init not in ("unit", "dit"):
            raise ValueError(f"model.condition_init must be 'unit' or 'dit', got {condition_init!r}")
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"model.cpu_threads must be >= 1 or null, got {cpu_threads}")
        self.save_hyperparameters()
        self.model = VideoDiT.from_size(
            size,
            **{
                "in_channels": in_channels,
                "patch_size": tuple(patch_size),
                "num_classes": num_classes,
                "class_dropout_prob": class_dropout_prob,
                "attention": attention,
                "psa_config": dict(psa_config) if psa_config is not None else None,
                "pattern_config": dict(pattern_config) if pattern_config is not None else None,
                **(model_kwargs or {}),
            },
        )
        if condition_init == "unit":
            self._unit_condition_init()
        self.init_ema(ema_decay, ema_warmup)
        # Wall time spent in training steps, carried across resumes through the checkpoint.
        self.train_seconds = 0.0
        self._batch_start: float | None = None

    def _unit_condition_init(self) -> None:
        # DiT's init (std 0.02 label table and timestep MLP) leaves the timestep + label vector ~0.05 in size;
        # the zero-initialised adaLN projections then see almost no condition, which a 400k-step run outgrows
        # but a 1k-step CPU run does not (the label barely moved the loss). PyTorch's own defaults instead:
        # unit-variance label vectors, Xavier timestep MLP (as every other linear layer of the model).
        condition = self.model.condition
        nn.init.normal_(condition.class_embedder.embedding_table.weight, std=1.0)
        for layer in (condition.timestep_embedder.linear_1, condition.timestep_embedder.linear_2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def sampling_model(self) -> VideoDiT:
        """The weights samples and exports use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.cpu_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(self.hparams.cpu_threads)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W), timestep: (B,) in [0, 1000], labels: (B,) -> velocity (B, C, T, H, W)."""
        return self.model(x, timestep, labels).sample

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0, labels = batch
        h = self.hparams
        u = compute_density_for_timestep_sampling(
            "logit_normal" if h.weighting == "logit_normal" else "none",
            batch_size=x0.shape[0],
            logit_mean=h.logit_mean,
            logit_std=h.logit_std,
        ).to(x0.device)
        sigma = u.view(-1, *([1] * (x0.dim() - 1)))
        noise = torch.randn_like(x0)
        x_t = (1.0 - sigma) * x0 + sigma * noise
        velocity = self(x_t, u * 1000.0, labels)
        loss = F.mse_loss(velocity.float(), (noise - x0).float())
        self.log_train_loss(loss, x0.shape[0], batch_idx)
        state = psa_state(self.model)
        density = state.densities.get(0) if state is not None else None
        if density is not None:
            self.log("train/psa_density", density.float(), on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # the EMA update
        # Training time is the steps' own (forward, backward, update, EMA), without sampling or checkpointing.
        if self._batch_start is not None:
            self.train_seconds += time.perf_counter() - self._batch_start
            self._batch_start = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["train_seconds"] = self.train_seconds

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_seconds = float(checkpoint.get("train_seconds", 0.0))

    def schedule(self) -> dict[str, Any]:
        """In optimizer updates: timm's schedulers count in "epochs", and here one update is one epoch."""
        h = self.hparams
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return dict(
            num_epochs=total,
            warmup_epochs=min(h.warmup_steps, total - 1) if total > 1 else 0,
            warmup_lr=h.warmup_lr,
            min_lr=h.min_lr,
            step_on_epochs=False,
            updates_per_epoch=1,
        )

    def pipeline(self) -> VideoDiTPipeline:
        """A `VideoDiTPipeline` around the sampling weights (shared, not copied)."""
        return VideoDiTPipeline(transformer=self.sampling_model, scheduler=FlowMatchEulerDiscreteScheduler())

    def export(self, log_dir: str | None) -> str | None:
        """The sampling weights as a diffusers folder `<log_dir>/pipeline/` and `<log_dir>/training_summary.json`;
        returns the folder."""
        if log_dir is None:
            return None
        folder = os.path.join(log_dir, "pipeline")
        data = self.trainer.datamodule
        clip = {}
        if data is not None:
            h = data.hparams
            clip = {
                "num_frames": h.num_frames,
                "size": h.frame_size,
                "digit_size": h.digit_size,
                "max_speed": h.max_speed,
            }
        export_pipeline(self, folder, clip)
        summary = {
            "attention": self.hparams.attention,
            "steps": int(self.global_step),
            "train_seconds": round(self.train_seconds, 1),
            "steps_per_second": round(self.global_step / max(self.train_seconds, 1e-9), 4),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "precision": str(self.trainer.precision),
        }
        loss = self.trainer.callback_metrics.get("train/loss")
        if loss is not None:
            summary["last_train_loss"] = round(float(loss), 5)
        with open(os.path.join(log_dir, "training_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"pipeline exported to {folder}; {summary}")
        return folder


def export_pipeline(task: VideoDiTTask, folder: str | os.PathLike, clip: dict[str, int] | None = None) -> None:
    """Save the task's sampling weights (EMA when kept) as a diffusers folder `VideoDiTPipeline` loads.

    The transformer is saved in float32 and in dense-or-PSA form as trained; `clip` (`num_frames`, `size`: the
    clip trained on) becomes the transformer's `sample_frames` and `sample_size`, the pipeline's default size.
    """
    source = task.sampling_model
    clip = clip or {}
    trained = {"sample_frames": clip["num_frames"]} if "num_frames" in clip else {}
    if "size" in clip:
        trained["sample_size"] = clip["size"]
    # A fresh model from the config: the EMA copy may sit under a precision plugin's dtype or on a device.
    # As keyword arguments: entries the source took by default are listed in its `_use_default_values`, and
    # from_config would drop an override of them that came inside the dict.
    model = VideoDiT.from_config(source.config, **trained)
    model.load_state_dict({k: v.detach().float().cpu() for k, v in source.state_dict().items()})
    pipe = VideoDiTPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
