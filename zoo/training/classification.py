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
import os
import sys
from typing import Any, ClassVar

import timm
import torch
import torch.nn as nn
from timm.data import Mixup, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from torchmetrics.classification import MulticlassAccuracy

from .task import TrainingTask, export_safetensors, lr_scale_by_pattern

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


class ImageClassifier(TrainingTask):
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

    monitor: ClassVar[str | None] = "val/acc1"

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
        self.init_ema(ema_decay, ema_warmup)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, num_classes)."""
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"mixup needs an even batch per process, got {x.shape[0]}: change data.batch_size")
            x, y = self.mixup(x, y)
        loss = self.train_loss(self.model(x), y)
        self.log_train_loss(loss, x.shape[0], batch_idx)
        return loss

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

    @classmethod
    def configure_validation(cls, config: Any, data_defaults: dict[str, Any]) -> None:
        """`validate` evaluates `--model.pretrained_file`; eval transform settings left at their defaults take the
        model's own cfg, as timm's validate.py does. Edits the parsed `config` (model and data) in place."""
        model, data = config["model"], config["data"]
        if model.get("pretrained_file"):
            model["pretrained"] = True
        elif not model.get("pretrained"):
            raise ValueError("validate: give the weights to evaluate with --model.pretrained_file FILE")
        cfg = _model_data_config(model["model_name"], model.get("model_kwargs"))
        for key, value in (
            ("image_size", cfg["input_size"][-1]),
            ("crop_pct", cfg["crop_pct"]),
            ("interpolation", cfg["interpolation"]),
            ("mean", tuple(cfg["mean"])),
            ("std", tuple(cfg["std"])),
        ):
            current, default = data.get(key), data_defaults.get(key)
            if current == default or (isinstance(current, list) and tuple(current) == default):
                data[key] = value

    def report_validation(self, metrics: dict[str, Any], weights: str | None) -> dict[str, Any]:
        """Print timm validate.py's line and a JSON line of top-1/top-5 (%), loss and the eval settings; return them."""
        data = self.trainer.datamodule
        results = {
            "model": self.hparams.model_name,
            "weights": weights,
            "top1": round(100 * float(metrics["val/acc1"]), 4),
            "top5": round(100 * float(metrics["val/acc5"]), 4),
            "loss": round(float(metrics["val/loss"]), 6),
            "images": len(data.val_dataset),
            "img_size": data.hparams.image_size,
            "crop_pct": data.hparams.crop_pct,
            "interpolation": data.hparams.interpolation,
        }
        print(f" * Acc@1 {results['top1']:.3f} Acc@5 {results['top5']:.3f} loss {results['loss']:.4f}")
        print(json.dumps(results))
        return results

    def optimizer_params(self) -> nn.Module | list[dict]:
        if not self.hparams.lr_scales:
            return self.model
        return self.param_groups(lr_scale_by_pattern(self.hparams.lr_scales))

    def export(self, log_dir: str | None) -> str | None:
        """`best.safetensors` (the base's), and beside it a hub-style folder `hub/` that timm loads by name."""
        out = super().export(log_dir)
        if out is None:
            return None
        folder = os.path.join(os.path.dirname(out), "hub")
        score = getattr(self.best_checkpoint()[0], "best_model_score", None)
        metrics = {"val top-1 (%)": round(100 * float(score), 3)} if score is not None else None
        datamodule = self.trainer.datamodule
        data_config = _data_config(datamodule) if hasattr(getattr(datamodule, "hparams", None), "image_size") else None
        try:
            export_hub_folder(out, folder, self.hparams.model_kwargs, data_config, metrics)
        except (ValueError, TypeError, RuntimeError, OSError) as err:  # best.safetensors stands; say why not the folder
            log.warning("no hub folder written: %s: %s", type(err).__name__, err)
            print(f"no hub folder written ({type(err).__name__}: {err}); {out} holds the weights", file=sys.stderr)
            return out
        print(f"and as a hub folder: timm.create_model('local-dir:{folder}', pretrained=True)")
        return out


def _model_data_config(model_name: str, model_kwargs: dict | None) -> dict:
    # Built on the meta device: only the cfg is needed, not the weights.
    with torch.device("meta"):
        model = timm.create_model(model_name, **dict(model_kwargs or {}))
    config = resolve_data_config({}, model=model)
    size = getattr(model, "img_size", None)
    if size:  # a model created at another size (model_kwargs img_size) is evaluated at that size
        config["input_size"] = (config["input_size"][0], *size)
    return config


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
