"""The classification launcher: LightningCLI over `ImageClassifier` and `ImageClassificationData`.

    python train/cls.py --config configs/cls/zoo_biformer_t_digits.yaml
    python train/cls.py --config configs/cls/models/zoo_biformer_t.yaml --config configs/cls/data/digits.yaml \\
        --trainer.max_epochs 5 --model.lr 1e-3
    python train/cls.py --config configs/cls/zoo_biformer_t_in1k.yaml --data.root /data/imagenet
    python train/cls.py --config ... --ckpt_path last          # resume the newest run in default_root_dir
    python train/cls.py validate --config ... --model.pretrained_file best.safetensors [--data.root DIR]

`validate` evaluates only (Lightning's validate): it loads `--model.pretrained_file` and reports top-1, top-5
and loss on the val split, as timm's validate.py does. The eval transform (image size, crop pct, interpolation,
mean/std) is the model's `pretrained_cfg` where the data settings are left at their defaults.

Later `--config` files and flags override earlier ones; `--print_config` shows the resolved whole. A bad
key, type, data directory or class folder stops the run before training with one line naming it.
Metrics go to `<default_root_dir>/lightning_logs/version_N/metrics.csv`, checkpoints (best by val/acc1
and last) under `.../checkpoints/`, and the best weights to `.../best.safetensors`. A fit resumed from a checkpoint
of `version_N` (`--ckpt_path last`, or a path there) logs on into `version_N`: its metrics.csv keeps the epochs
before the checkpoint and gets the rest, so one run's history is one file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import warnings

import timm
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from timm.data import resolve_data_config

from .checkpointing import AtomicCheckpointIO, ContinuedCSVLogger
from .classification import ImageClassifier
from .data import DataError, ImageClassificationData

__all__ = ["ClassificationCLI", "find_last_checkpoint", "main"]


class _OneLineErrorParser(LightningArgumentParser):
    """Reports a parse error as a single `error: ...` line (no usage dump), then exits with status 2."""

    def error(self, message: str, *args, **kwargs):  # noqa: D102
        message = " ".join(str(message).split())
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def find_last_checkpoint(root_dir: str) -> str:
    """The newest `last.ckpt` under `root_dir/lightning_logs/version_*/checkpoints/`."""
    found = glob.glob(os.path.join(root_dir, "lightning_logs", "version_*", "checkpoints", "last*.ckpt"))
    if not found:
        raise FileNotFoundError(f"ckpt_path last: no last.ckpt under {os.path.join(root_dir, 'lightning_logs')}")
    return max(found, key=os.path.getmtime)


class ClassificationCLI(LightningCLI):
    """LightningCLI with the checkpointing, CSV logging and resume conventions of this project."""

    # The segmentation and video launchers extend this class with LightningCLI's own constructor: they only fit.
    mode = "fit"

    def __init__(self, args: list[str] | None = None, run: bool = True, mode: str = "fit"):
        if mode not in ("fit", "validate"):
            raise ValueError(f"mode must be 'fit' or 'validate', got {mode!r}")
        self._run_fit = run
        self.mode = mode
        super().__init__(
            ImageClassifier,
            ImageClassificationData,
            run=False,
            args=args,
            seed_everything_default=0,
            parser_class=_OneLineErrorParser,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"log_every_n_steps": 10, "num_sanity_val_steps": 0},
            auto_configure_optimizers=False,
        )
        if run:
            self.fit() if mode == "fit" else self.validate()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume from this Lightning checkpoint; 'last' takes the newest last.ckpt under default_root_dir.",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # Two checkpoint callbacks: Lightning's `save_last` rewrites last.ckpt only in epochs that also saved
        # a top-k file, so a run whose val/acc1 stalls would resume from far back. `last_checkpoint` keeps
        # one monitor-free file, last.ckpt, rewritten every epoch; `checkpoint` keeps the best by val/acc1.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "epoch={epoch}-acc1={val/acc1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        if self.mode != "validate":
            return
        model, data = self.config["model"], self.config["data"]
        if model.get("pretrained_file"):
            model["pretrained"] = True
        elif not model.get("pretrained"):
            self.parser.error("validate: give the weights to evaluate with --model.pretrained_file FILE")
        # Eval transform settings left at their defaults take the model's own cfg, as timm's validate.py does.
        defaults = self.parser.get_defaults()["data"]
        cfg = _model_data_config(model["model_name"], model.get("model_kwargs"))
        for key, value in (
            ("image_size", cfg["input_size"][-1]),
            ("crop_pct", cfg["crop_pct"]),
            ("interpolation", cfg["interpolation"]),
            ("mean", tuple(cfg["mean"])),
            ("std", tuple(cfg["std"])),
        ):
            current = data.get(key)
            if current == defaults.get(key) or (isinstance(current, list) and tuple(current) == defaults.get(key)):
                data[key] = value

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError) as e:
            # Bad paths and settings found while building the data, model or trainer: one line, no traceback.
            self.parser.error(f"{type(e).__name__}: {e}")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.config_init.get("trainer", {})
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = self._csv_logger(root)
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _resolve_ckpt_path(self, root: str) -> str | None:
        """`--ckpt_path`, with 'last' resolved under root; a missing file stops the run with one line."""
        if not hasattr(self, "_ckpt_path"):
            ckpt_path = self.config.get("ckpt_path")
            if ckpt_path == "last":
                try:
                    ckpt_path = find_last_checkpoint(root)
                except FileNotFoundError as e:
                    self.parser.error(str(e))
            elif ckpt_path is not None and not os.path.isfile(ckpt_path):
                self.parser.error(f"ckpt_path: file {ckpt_path!r} does not exist")
            self._ckpt_path = ckpt_path
        return self._ckpt_path

    def _csv_logger(self, root: str) -> CSVLogger:
        """A new `version_N`; for a fit resumed from `root/lightning_logs/version_N/checkpoints/`, that version,
        its metrics.csv continued from the checkpoint's step."""
        ckpt_path = self._resolve_ckpt_path(root) if getattr(self, "mode", "fit") == "fit" else None
        if ckpt_path is not None:
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
            match = re.fullmatch(r"version_(\d+)", os.path.basename(run_dir))
            if match and os.path.dirname(run_dir) == os.path.join(os.path.abspath(root), "lightning_logs"):
                return ContinuedCSVLogger(
                    root, "lightning_logs", version=int(match.group(1)), resume_step=self._resume_step(ckpt_path)
                )
        return CSVLogger(save_dir=root, name="lightning_logs")

    def _resume_step(self, ckpt_path: str) -> int:
        """The `step` metrics.csv had reached when ckpt_path was saved (optimizer steps taken)."""
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a damaged or foreign file: say which, in one line
            self.parser.error(f"ckpt_path: cannot read {ckpt_path!r} as a Lightning checkpoint ({type(e).__name__})")
        loop = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        return int(loop.get("_batches_that_stepped", ckpt.get("global_step", 0)))

    def fit(self) -> None:
        ckpt_path = self._resolve_ckpt_path(self.trainer.default_root_dir)
        try:
            self.trainer.fit(self.model, self.datamodule, ckpt_path=ckpt_path)
        except FloatingPointError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(1)
        except DataError as e:
            # Raised in a loader worker, the message carries the worker's traceback: its last line is the error.
            sys.stderr.write(f"error: {str(e).strip().splitlines()[-1].removeprefix(DataError.__module__ + '.')}\n")
            sys.exit(2)

    def validate(self) -> dict[str, float]:
        """Evaluate the loaded weights on the val split; print and return top-1/top-5 (%) and loss."""
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path is not None and not os.path.isfile(ckpt_path):
            self.parser.error(f"ckpt_path: file {ckpt_path!r} does not exist")
        metrics = self.trainer.validate(self.model, self.datamodule, ckpt_path=ckpt_path, verbose=False)[0]
        data = self.datamodule.hparams
        results = {
            "model": self.config["model"]["model_name"],
            "weights": self.config["model"].get("pretrained_file") or ckpt_path,
            "top1": round(100 * float(metrics["val/acc1"]), 4),
            "top5": round(100 * float(metrics["val/acc5"]), 4),
            "loss": round(float(metrics["val/loss"]), 6),
            "images": len(self.datamodule.val_dataset),
            "img_size": data.image_size,
            "crop_pct": data.crop_pct,
            "interpolation": data.interpolation,
        }
        print(f" * Acc@1 {results['top1']:.3f} Acc@5 {results['top5']:.3f} loss {results['loss']:.4f}")
        print(json.dumps(results))
        return results


def _model_data_config(model_name: str, model_kwargs: dict | None) -> dict:
    # Built on the meta device: only the cfg is needed, not the weights.
    with torch.device("meta"):
        model = timm.create_model(model_name, **dict(model_kwargs or {}))
    config = resolve_data_config({}, model=model)
    size = getattr(model, "img_size", None)
    if size:  # a model created at another size (model_kwargs img_size) is evaluated at that size
        config["input_size"] = (config["input_size"][0], *size)
    return config


def main(args: list[str] | None = None) -> None:
    """Parse `args` (default: the command line), build the task, data and trainer, and fit or validate.

    A first argument `fit` or `validate` picks the subcommand (`fit` when there is none).
    """
    # The EMA copy is kept in eval mode on purpose; Lightning would warn about it at every start.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    args = list(sys.argv[1:] if args is None else args)
    mode = args.pop(0) if args and args[0] in ("fit", "validate") else "fit"
    ClassificationCLI(args=args, mode=mode)
