"""Image classification as a LightningModule: any timm model (every `zoo_*` one included), trained with
timm's mixup/cutmix, optimizer and scheduler factories and model EMA, measured with torchmetrics.

    from zoo.training import ImageClassifier, ImageClassificationData
    data = ImageClassificationData(image_size=64)  # scikit-learn's digits
    task = ImageClassifier("zoo_biformer_t", num_classes=data.num_classes, lr=1e-3)
    lightning.Trainer(max_epochs=10).fit(task, data)

The best weights leave as a safetensors file that `timm.create_model` loads (see `export_safetensors`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import sys
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
from lightning.pytorch import LightningModule
from safetensors.torch import save_file
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torchmetrics.classification import MulticlassAccuracy

from ..checkpoint import load_checkpoint_file

__all__ = ["ImageClassifier", "export_hub_folder", "export_safetensors"]

log = logging.getLogger(__name__)


def _check_ranges(**values: tuple[float | None, str]) -> None:
    """Each name -> (value, interval such as "[0, 1)" or "(0, inf)"): a ValueError names the first value outside
    its interval, NaN included; None passes. These used to surface as NaN losses or optimizer errors mid-run."""
    for name, (value, interval) in values.items():
        if value is None:
            continue
        low, high = (float(v) for v in interval[1:-1].split(","))
        above = low <= value if interval[0] == "[" else low < value
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):  # also for NaN
            raise ValueError(f"model.{name} must lie in {interval}, got {value}")


class ImageClassifier(LightningModule):
    """Single-label image classification with a `timm.create_model` backbone.

    Logs `train/loss`, `train/lr`, `val/loss`, `val/acc1`, `val/acc5`. A non-finite training loss raises
    `FloatingPointError` naming the step. When the run is seeded (`seed_everything`), every epoch reseeds
    the global random generators from (seed, epoch, rank), so an epoch's shuffling, augmentation, mixup and
    drop-path draws do not depend on what ran before it, and a run resumed from an epoch-end checkpoint
    repeats the uninterrupted run.

    Args:
        model_name: any name `timm.create_model` knows (`zoo_biformer_t`, `resnet50`, ...).
        num_classes: classifier outputs; the CLI links it to the data's class count.
        pretrained: start from the weights of `pretrained_file` (or the model's default release).
        pretrained_file: a weight file for `pretrained_cfg_overlay=dict(file=...)`.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate.
        model_kwargs: further keyword arguments for `timm.create_model`.
        grad_checkpointing: recompute each stage's activations in the backward (timm's
            `set_grad_checkpointing`, like train.py's --grad-checkpointing), trading time for memory.
        opt: timm optimizer name ('adamw', 'sgd', 'lamb', ...).
        lr: peak learning rate (not scaled by batch size: give the one for your global batch).
        weight_decay: decoupled weight decay; norms, biases and `no_weight_decay()` get none.
        momentum: SGD-family momentum.
        opt_eps: optimizer epsilon; None for the optimizer's default.
        opt_betas: Adam-family betas; None for the optimizer's default.
        layer_decay: layer-wise learning-rate decay; None for none.
        lr_scales: parameter-name regex -> learning-rate factor for the parameters it matches (first match
            wins), e.g. `{'downsample\\.offset\\.weight$': 0.01}` as LITv2 trains its offset convs; timm's
            schedulers apply the factor at every step.
        sched: timm scheduler name ('cosine', 'step', 'multistep', 'plateau', 'poly', 'tanh', 'wsd').
        warmup_epochs: linear warm-up length in epochs (fractions allowed when the schedule steps on updates).
        warmup_lr: learning rate at the first update.
        min_lr: floor of the decay.
        cooldown_epochs: epochs at `min_lr` after the decay; the decay ends `cooldown_epochs` before max_epochs.
        step_on_epochs: set the learning rate once per epoch (as DeiT and timm's train.py do) instead of
            after every optimizer update.
        mixup: mixup alpha; 0 for none.
        cutmix: cutmix alpha; 0 for none.
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        mixup_mode: 'batch', 'pair' or 'elem'.
        label_smoothing: label smoothing of the training targets.
        ema_decay: decay of timm's ModelEmaV3 copy of the weights, updated every step; None for no EMA.
        ema_warmup: ramp the EMA decay up from 0 (useful for short runs).
        ema_validate: validate, checkpoint-select and export the EMA weights instead of the trained ones.
    """

    def __init__(
        self,
        model_name: str = "zoo_biformer_t",
        num_classes: int = 1000,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
        opt: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        opt_eps: float | None = None,
        opt_betas: tuple[float, float] | None = None,
        layer_decay: float | None = None,
        lr_scales: dict[str, float] | None = None,
        sched: str = "cosine",
        warmup_epochs: float = 0.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        cooldown_epochs: int = 0,
        step_on_epochs: bool = False,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        label_smoothing: float = 0.0,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        ema_validate: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {num_classes}")
        _check_ranges(
            lr=(lr, "(0, inf)"),
            warmup_lr=(warmup_lr, "[0, inf)"),
            min_lr=(min_lr, "[0, inf)"),
            weight_decay=(weight_decay, "[0, inf)"),
            warmup_epochs=(warmup_epochs, "[0, inf)"),
            mixup=(mixup, "[0, inf)"),
            cutmix=(cutmix, "[0, inf)"),
            mixup_prob=(mixup_prob, "[0, 1]"),
            label_smoothing=(label_smoothing, "[0, 1)"),
            ema_decay=(ema_decay, "[0, 1)"),
        )
        if ema_validate and ema_decay is None:
            raise ValueError("model.ema_validate needs model.ema_decay")
        if lr_scales and layer_decay is not None:
            raise ValueError("model.lr_scales and model.layer_decay cannot be combined")
        self.save_hyperparameters()
        if not timm.is_model(model_name.split(".")[0]):
            raise ValueError(f"model.model_name: timm has no model {model_name!r} (after `import zoo`)")
        kwargs = dict(model_kwargs or {})
        if pretrained_file is not None:
            kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=pretrained_file)
        self.model = timm.create_model(
            model_name,
            pretrained=pretrained,
            num_classes=num_classes,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.ema: ModelEmaV3 | None = None
        if ema_decay is not None:
            self.ema = ModelEmaV3(self.model, decay=ema_decay, use_warmup=ema_warmup)
            self.ema.requires_grad_(False)  # DDP must not wait for gradients of the copy
        self.mixup: Mixup | None = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode=mixup_mode,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            self.train_loss = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.val_loss = nn.CrossEntropyLoss()
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self._seed: int | None = None
        self._ema_step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, num_classes)."""
        return self.model(x)

    def setup(self, stage: str) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        self._seed = int(seed) if seed is not None else None

    def on_train_epoch_start(self) -> None:
        if self._seed is None:
            return
        # The training step's own draws (mixup, drop path); the loader's follow (seed, epoch, position).
        seed = int(np.random.SeedSequence([self._seed, self.current_epoch, self.global_rank]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"mixup needs an even batch per process, got {x.shape[0]}: change data.batch_size")
            x, y = self.mixup(x, y)
        loss = self.train_loss(self.model(x), y)
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); lower model.lr or use trainer.gradient_clip_val"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Once per optimizer update, also when gradients accumulate over several batches.
        if self.ema is not None and self.global_step != self._ema_step:
            self.ema.update(self.model, step=self.global_step)
            self._ema_step = self.global_step

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        model = self.ema.module if self.hparams.ema_validate else self.model
        logits = model(x)
        self.val_acc1(logits, y)
        self.val_acc5(logits, y)
        batch_size = x.shape[0]
        self.log("val/loss", self.val_loss(logits, y), sync_dist=True, batch_size=batch_size)
        self.log("val/acc1", self.val_acc1, prog_bar=True, batch_size=batch_size)
        self.log("val/acc5", self.val_acc5, batch_size=batch_size)

    def configure_optimizers(self) -> dict:
        h = self.hparams
        opt_kwargs = {}
        if h.opt_eps is not None:
            opt_kwargs["eps"] = h.opt_eps
        if h.opt_betas is not None:
            opt_kwargs["betas"] = tuple(h.opt_betas)
        optimizer = create_optimizer_v2(
            self._param_groups() if h.lr_scales else self.model,
            opt=h.opt,
            lr=h.lr,
            weight_decay=h.weight_decay,
            momentum=h.momentum,
            layer_decay=h.layer_decay,
            **opt_kwargs,
        )
        updates_per_epoch, num_epochs = self._schedule_length()
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=h.sched,
            num_epochs=num_epochs - h.cooldown_epochs,
            warmup_epochs=h.warmup_epochs,
            warmup_lr=h.warmup_lr,
            min_lr=h.min_lr,
            cooldown_epochs=h.cooldown_epochs,
            step_on_epochs=h.step_on_epochs,
            updates_per_epoch=updates_per_epoch,
        )
        interval = "epoch" if h.step_on_epochs else "step"
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _param_groups(self) -> list[dict]:
        """Parameter groups by (weight decay, lr scale), with timm's rule for which parameters decay."""
        h = self.hparams
        patterns = [(re.compile(k), float(v)) for k, v in h.lr_scales.items()]
        skip = set(getattr(self.model, "no_weight_decay", set)())
        groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
            scale = next((v for pattern, v in patterns if pattern.search(name)), 1.0)
            groups.setdefault((decay, scale), []).append(param)
        return [
            {"params": params, "weight_decay": h.weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), params in groups.items()
        ]

    def _schedule_length(self) -> tuple[int, int]:
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
        if self.hparams.step_on_epochs:
            scheduler.step(epoch=self.current_epoch + 1, metric=metric)
        else:
            scheduler.step_update(num_updates=self.global_step, metric=metric)

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank must make it
        if self.trainer.is_global_zero:
            self._export_best(log_dir)
        self.trainer.strategy.barrier("export_best")

    def _export_best(self, log_dir: str | None) -> None:
        callbacks = self.trainer.checkpoint_callbacks
        monitored = [c for c in callbacks if getattr(c, "monitor", None) == "val/acc1"]
        callback = (monitored or callbacks or [None])[0]
        path = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
        if not path or not os.path.isfile(path):
            return
        out = os.path.join(log_dir or os.path.dirname(os.path.dirname(path)), "best.safetensors")
        classes = getattr(self.trainer.datamodule, "classes", None)
        export_safetensors(path, out, classes=classes)
        log.info("exported %s weights to %s", path, out)
        print(f"best model ({os.path.basename(path)}) exported to {out}")
        folder = os.path.join(os.path.dirname(out), "hub")
        score = getattr(callback, "best_model_score", None)
        metrics = {"val top-1 (%)": round(100 * float(score), 3)} if score is not None else None
        datamodule = self.trainer.datamodule
        data_config = _data_config(datamodule) if hasattr(getattr(datamodule, "hparams", None), "image_size") else None
        try:
            export_hub_folder(out, folder, self.hparams.model_kwargs, data_config, metrics)
        except (ValueError, TypeError, RuntimeError, OSError) as err:  # best.safetensors stands; say why not the folder
            log.warning("no hub folder written: %s: %s", type(err).__name__, err)
            print(f"no hub folder written ({type(err).__name__}: {err}); {out} holds the weights", file=sys.stderr)
            return
        print(f"and as a hub folder: timm.create_model('local-dir:{folder}', pretrained=True)")


def _data_config(datamodule: Any) -> dict:
    """The eval transform of an `ImageClassificationData`, in timm's data-config keys."""
    h = datamodule.hparams
    return {
        "input_size": (3, h.image_size, h.image_size),
        "crop_pct": h.crop_pct,
        "interpolation": "bicubic" if h.interpolation == "random" else h.interpolation,
        "mean": tuple(h.mean),
        "std": tuple(h.std),
    }


def export_hub_folder(
    weights_path: str | os.PathLike,
    folder: str | os.PathLike,
    model_kwargs: dict[str, Any] | None = None,
    data_config: dict | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """A `best.safetensors` written by `export_safetensors` as a hub-style folder (`zoo.hub.save_hub_folder`):
    `timm.create_model("local-dir:FOLDER", pretrained=True)` loads it with its classes and eval transform.

    Args:
        weights_path: the safetensors file (its metadata names the model, classes and class names).
        folder: the folder to write.
        model_kwargs: the further `timm.create_model` arguments the run used.
        data_config: the eval transform the run validated with (timm's keys); None for the model's cfg.
        metrics: figures for the model card.
    """
    from safetensors import safe_open

    from ..hub import save_hub_folder

    with safe_open(os.fspath(weights_path), "pt") as f:
        meta = f.metadata() or {}
    classes = json.loads(meta["classes"]) if meta.get("classes") else None
    model = timm.create_model(
        meta["model_name"],
        pretrained=True,
        num_classes=int(meta["num_classes"]),
        pretrained_cfg_overlay=dict(file=os.fspath(weights_path), num_classes=int(meta["num_classes"])),
        **dict(model_kwargs or {}),
    )
    description = f"`{meta['model_name']}` trained with the zoo's Lightning recipe (`train/cls.py`)."
    save_hub_folder(model, folder, classes, description=description, metrics=metrics, data_config=data_config)
    return os.fspath(folder)


def export_safetensors(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike,
    ema: bool | None = None,
    classes: list[str] | None = None,
) -> dict[str, str]:
    """Write the backbone weights of an `ImageClassifier` Lightning checkpoint as safetensors.

    The file holds the timm model's own state dict, so `timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=output_path, num_classes=N), num_classes=N)` loads it, classifier
    included (timm drops a classifier whose class count differs from the cfg's, hence `num_classes` in
    the overlay too).

    Args:
        checkpoint_path: a `.ckpt` written by Lightning for an `ImageClassifier`.
        output_path: the `.safetensors` file to write.
        ema: take the EMA weights; None follows the run's `ema_validate`.
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
