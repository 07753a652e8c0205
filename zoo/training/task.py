"""What every recipe's task shares: `TrainingTask`, the LightningModule base of the classification, segmentation
and video DiT tasks, and `export_safetensors`, which takes a task's weights out of a Lightning checkpoint.

A task subclasses `TrainingTask`, builds `self.model` (and `self.ema` with `init_ema`), computes its loss in
`training_step` and hands it to `log_train_loss`, and says what leaves at the end of a fit in `export`. The base
brings timm's optimizer and scheduler factories (stepped as timm's train.py steps them), timm's `ModelEmaV3`
updated once per optimizer update, the non-finite-loss stop, the per-epoch reseeding that lets a resumed run
repeat an uninterrupted one, and the call to `export` on rank 0. Its class attributes tell the launcher
(`zoo.training.cli.TaskCLI`) how to checkpoint the task and what to link from the data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from ..checkpoint import load_checkpoint_file

__all__ = ["TrainingTask", "export_safetensors"]

log = logging.getLogger(__name__)


class TrainingTask(LightningModule):
    """The base of the recipes' tasks.

    Hyperparameters it reads from `self.hparams` (the subclass's constructor arguments): `opt`, `lr`,
    `weight_decay`, `sched` and, where the task has them, `momentum`, `layer_decay`, `opt_eps`, `opt_betas`,
    `warmup_epochs`, `warmup_lr`, `min_lr`, `cooldown_epochs`, `decay_rate`, `step_on_epochs`.

    Class attributes the launcher reads:
        monitor: the validation metric (higher is better) that picks the best checkpoint and the exported
            weights; None keeps only `last.ckpt`.
        linked: data-module attributes given to the task's constructor argument of the same name.
        cli_callbacks: further callbacks the launcher offers as option groups, by group name.
        reseed_epochs: reseed the global random generators at each epoch start from (seed, epoch, rank).
    """

    monitor: ClassVar[str | None] = None
    linked: ClassVar[tuple[str, ...]] = ("num_classes",)
    cli_callbacks: ClassVar[dict[str, type[Callback]]] = {}
    reseed_epochs: ClassVar[bool] = True

    model: nn.Module
    ema: ModelEmaV3 | None

    def __init__(self) -> None:
        super().__init__()
        self.ema = None
        self._ema_step = 0
        self._seed: int | None = None

    def init_ema(self, decay: float | None, warmup: bool) -> None:
        """Keep timm's `ModelEmaV3` average of `self.model` with this decay (None: no EMA)."""
        if decay is not None:
            self.ema = ModelEmaV3(self.model, decay=decay, use_warmup=warmup)
            self.ema.requires_grad_(False)  # DDP must not wait for gradients of the copy

    def setup(self, stage: str) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        self._seed = int(seed) if seed is not None else None

    def on_train_epoch_start(self) -> None:
        if not self.reseed_epochs or self._seed is None:
            return
        # The training step's own draws (mixup, drop path); the loader's follow (seed, epoch, position).
        seed = int(np.random.SeedSequence([self._seed, self.current_epoch, self.global_rank]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def log_train_loss(self, loss: torch.Tensor, batch_size: int, batch_idx: int) -> None:
        """Log `train/loss` and `train/lr`; a non-finite loss on any process raises `FloatingPointError`.

        Args:
            loss: the step's scalar loss.
            batch_size: samples in this process's batch.
            batch_idx: the batch's index in the epoch (named in the error).
        """
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); lower model.lr or use trainer.gradient_clip_val"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Once per optimizer update, also when gradients accumulate over several batches.
        if self.ema is not None and self.global_step != self._ema_step:
            self.ema.update(self.model, step=self.global_step)
            self._ema_step = self.global_step

    # Optimizer and schedule: timm's factories.

    def configure_optimizers(self) -> dict:
        h = self.hparams
        kwargs = {key: h[key] for key in ("momentum", "layer_decay") if key in h}
        if h.get("opt_eps") is not None:
            kwargs["eps"] = h.opt_eps
        if h.get("opt_betas") is not None:
            kwargs["betas"] = tuple(h.opt_betas)
        optimizer = create_optimizer_v2(
            self.optimizer_params(), opt=h.opt, lr=h.lr, weight_decay=h.weight_decay, **kwargs
        )
        # timm's schedulers multiply each group's rate by its `lr_scale` at every step.
        scheduler, _ = create_scheduler_v2(optimizer, sched=h.sched, **self.schedule())
        interval = "epoch" if h.get("step_on_epochs") else "step"
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def optimizer_params(self) -> nn.Module | list[dict]:
        """What the optimizer takes: the model (timm decides which parameters decay) or parameter groups."""
        return self.model

    def param_groups(self, lr_scale: Callable[[str], float]) -> list[dict]:
        """Groups of `self.model`'s parameters by (weight decay, lr scale): no decay for norms, biases and
        `no_weight_decay()`, as timm's optimizer factory decides; `lr_scale(name)` gives a parameter's factor."""
        h = self.hparams
        skip = set(getattr(self.model, "no_weight_decay", set)())
        groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
            groups.setdefault((decay, lr_scale(name)), []).append(param)
        return [
            {"params": params, "weight_decay": h.weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), params in groups.items()
        ]

    def schedule(self) -> dict[str, Any]:
        """`create_scheduler_v2` arguments: a schedule in epochs over this fit's length."""
        h = self.hparams
        updates_per_epoch, num_epochs = self.schedule_length()
        kwargs = {"decay_rate": h.decay_rate} if "decay_rate" in h else {}
        return dict(
            num_epochs=num_epochs - h.cooldown_epochs,
            warmup_epochs=h.warmup_epochs,
            warmup_lr=h.warmup_lr,
            min_lr=h.min_lr,
            cooldown_epochs=h.cooldown_epochs,
            step_on_epochs=h.step_on_epochs,
            updates_per_epoch=updates_per_epoch,
            **kwargs,
        )

    def schedule_length(self) -> tuple[int, int]:
        """(optimizer updates per epoch, epochs) of this fit, from the trainer's loaders and limits."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # also sizes the train loader
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            return max(int(total), 1), 1
        per_epoch = max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.ceil(total / per_epoch)
        return per_epoch, max(int(epochs), 1)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # timm schedulers take the count of updates (or epochs) done; Lightning steps them after it
        # counted the update, but before it counts the finished epoch.
        if self.hparams.get("step_on_epochs"):
            scheduler.step(epoch=self.current_epoch + 1, metric=metric)
        else:
            scheduler.step_update(num_updates=self.global_step, metric=metric)

    # The launcher's `validate` subcommand: a task that offers it overrides both.

    @classmethod
    def configure_validation(cls, config: Any, data_defaults: dict[str, Any]) -> None:
        """Check (and complete, in place) the parsed `config` of a `validate` run; a ValueError names the problem."""
        raise ValueError(f"validate: {cls.__name__} has no validate subcommand; it only fits")

    def report_validation(self, metrics: dict[str, Any], weights: str | None) -> dict[str, Any]:
        """Report the validation `metrics` of the `weights` file; return the figures. Reached only through a
        task's own `configure_validation` (the base refuses the subcommand), which a task overrides with this."""
        raise NotImplementedError(f"{type(self).__name__} overrides configure_validation but not report_validation")

    # What leaves at the end of a fit.

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank must make it
        if self.trainer.is_global_zero:
            self.export(log_dir)
        self.trainer.strategy.barrier("export")

    def best_checkpoint(self) -> tuple[ModelCheckpoint | None, str | None]:
        """(the checkpoint callback of `monitor`, or the first one; the file it kept best, else its last)."""
        callbacks = self.trainer.checkpoint_callbacks
        monitored = [c for c in callbacks if getattr(c, "monitor", None) == self.monitor]
        callback = (monitored or callbacks or [None])[0]
        path = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
        return callback, path if path and os.path.isfile(path) else None

    def export(self, log_dir: str | None) -> str | None:
        """On rank 0 after a fit: the best checkpoint's weights as `<log_dir>/best.safetensors` (with the data's
        class names); returns its path, or None when no checkpoint was written."""
        _, path = self.best_checkpoint()
        if path is None:
            return None
        out = os.path.join(log_dir or os.path.dirname(os.path.dirname(path)), "best.safetensors")
        export_safetensors(path, out, classes=getattr(self.trainer.datamodule, "classes", None))
        log.info("exported %s weights to %s", path, out)
        print(f"best model ({os.path.basename(path)}) exported to {out}")
        return out


def export_safetensors(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike,
    ema: bool | None = None,
    classes: list[str] | None = None,
) -> dict[str, str]:
    """Write the model weights of a task's Lightning checkpoint (`model.*`, or `ema.module.*`) as safetensors.

    For an `ImageClassifier` the file holds the timm model's own state dict, so `timm.create_model(name,
    pretrained=True, pretrained_cfg_overlay=dict(file=output_path, num_classes=N), num_classes=N)` loads it,
    classifier included (timm drops a classifier whose class count differs from the cfg's, hence `num_classes`
    in the overlay too); for a `SemanticSegmentation`, `SemanticSegmentationModel.load_state_dict` does.

    Args:
        checkpoint_path: a `.ckpt` written by Lightning for a `TrainingTask`.
        output_path: the `.safetensors` file to write.
        ema: take the EMA weights; None follows the run's `ema_validate` (False where the task has none).
        classes: class names, stored in the file's metadata.

    Returns:
        The metadata written: model_name, num_classes, weights ('ema' or 'model'), classes (JSON), epoch.
    """
    checkpoint = load_checkpoint_file(checkpoint_path)
    hparams = checkpoint.get("hyper_parameters", {})
    if ema is None:
        ema = bool(hparams.get("ema_validate", False))
    prefix = "ema.module." if ema else "model."
    state_dict = {k[len(prefix) :]: v.contiguous() for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state_dict:
        raise KeyError(f"{checkpoint_path} has no weights under {prefix!r} (was the run trained with EMA?)")
    metadata = {
        "model_name": str(hparams.get("model_name", "")),
        "num_classes": str(hparams.get("num_classes", "")),
        "weights": "ema" if ema else "model",
        "epoch": str(checkpoint.get("epoch", "")),
    }
    if classes is not None:
        metadata["classes"] = json.dumps(list(classes))
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = f"{output_path}.tmp"
    save_file(state_dict, tmp, metadata=metadata)
    os.replace(tmp, output_path)
    return metadata


def lr_scale_by_pattern(patterns: dict[str, float]) -> Callable[[str], float]:
    """`TrainingTask.param_groups`' `lr_scale` from regex -> factor (first match wins; 1.0 where none does)."""
    compiled = [(re.compile(k), float(v)) for k, v in patterns.items()]
    return lambda name: next((v for pattern, v in compiled if pattern.search(name)), 1.0)
