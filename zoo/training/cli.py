"""The launcher of every recipe: `TaskCLI`, LightningCLI over a `TrainingTask` and its data module.

    python train/cls.py --config configs/cls/zoo_biformer_t_digits.yaml
    python train/cls.py --config configs/cls/models/zoo_biformer_t.yaml --config configs/cls/data/digits.yaml \\
        --trainer.max_epochs 5 --model.lr 1e-3
    python train/cls.py --config configs/cls/zoo_biformer_t_in1k.yaml --data.root /data/imagenet
    python train/cls.py --config ... --ckpt_path last          # resume the newest run in default_root_dir
    python train/cls.py validate --config ... --model.pretrained_file best.safetensors [--data.root DIR]
    python train/seg.py --config configs/seg/zoo_biformer_t_digits.yaml
    python train/video_dit.py --config configs/video/video_dit_digits.yaml

Later `--config` files and flags override earlier ones; `--print_config` shows the resolved whole. A config file
may start from others: `config: [models/x.yaml, data/y.yaml]` (paths relative to the file) reads those in
order, as that many `--config` flags would, and the file's own keys override theirs key by key. A bad key,
type, data directory or class folder stops the run before training with one line naming it.

Metrics go to `<default_root_dir>/lightning_logs/version_N/metrics.csv`; checkpoints under `.../checkpoints/`:
`last.ckpt`, rewritten every epoch, and, for a task with a `monitor`, the best by it; at the end of a fit the
task's `export` (the best weights as `.../best.safetensors`; the video DiT's diffusers folder). A fit resumed
from a checkpoint of `version_N` (`--ckpt_path last`, or a path there) logs on into `version_N`: its metrics.csv
keeps the steps before the checkpoint and gets the rest, so one run's history is one file.

`validate` (the classification task's) evaluates only (Lightning's validate): it loads
`--model.pretrained_file` and reports top-1, top-5 and loss on the val split, as timm's validate.py does. The
eval transform (image size, crop pct, interpolation, mean/std) is the model's `pretrained_cfg` where the data
settings are left at their defaults.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import sys
import warnings
from typing import Any

import torch
import yaml
from jsonargparse import get_loader, set_loader
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .checkpointing import AtomicCheckpointIO, ContinuedCSVLogger
from .data import DataError
from .task import TrainingTask

__all__ = ["TaskCLI", "find_last_checkpoint", "load_composed_yaml", "main"]

# jsonargparse's parser mode for YAML whose files may start from other files.
COMPOSED_YAML = "zoo_composed_yaml"


class _OneLineErrorParser(LightningArgumentParser):
    """Reports a parse error as a single `error: ...` line (no usage dump), then exits with status 2."""

    def error(self, message: str, *args, **kwargs):  # noqa: D102
        message = " ".join(str(message).split())
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def _merge(base: dict, override: dict) -> dict:
    """`override` over `base`, key by key into mappings; a class spec naming another class_path replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        current = out.get(key)
        same_class = isinstance(value, dict) and value.get("class_path") in (None, (current or {}).get("class_path"))
        out[key] = _merge(current, value) if isinstance(current, dict) and same_class else copy.deepcopy(value)
    return out


def _read_composed(path: str, seen: tuple[str, ...] = ()) -> dict:
    """The mapping of the YAML file at `path` after its `config:` parts, read in order, relative to it."""
    path = os.path.abspath(path)
    if path in seen:
        raise ValueError(f"config files include each other: {' -> '.join([*seen, path])}")
    if not os.path.isfile(path):
        where = f" (named in {seen[-1]})" if seen else ""
        raise FileNotFoundError(f"config file {path!r} does not exist{where}")
    with open(path) as f:
        data = get_loader("yaml")(f.read())
    return _compose(data, os.path.dirname(path), (*seen, path))


def _compose(data: Any, directory: str, seen: tuple[str, ...]) -> Any:
    if not isinstance(data, dict) or "config" not in data:
        return data
    data = dict(data)
    parts = data.pop("config")
    parts = [parts] if isinstance(parts, str) else parts
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"config: expected a path or a list of paths, got {parts!r} in {seen[-1]}")
    merged: dict = {}
    for part in parts:
        merged = _merge(merged, _read_composed(os.path.join(directory, part), seen))
    return _merge(merged, data)


def load_composed_yaml(value: str, path: str | os.PathLike = "") -> Any:
    """jsonargparse's YAML loader, and for a config file whose mapping has a `config` key (a path or a list of
    paths, relative to the file), those files merged in order under the file's own keys.

    jsonargparse reads a config file from the file's directory and passes its name as `path`; values given on
    the command line come without one and load as plain YAML.
    """
    data = get_loader("yaml")(value)
    if not path:
        return data
    return _compose(data, os.getcwd(), (os.path.abspath(os.fspath(path)),))


def find_last_checkpoint(root_dir: str) -> str:
    """The newest `last.ckpt` under `root_dir/lightning_logs/version_*/checkpoints/`."""
    found = glob.glob(os.path.join(root_dir, "lightning_logs", "version_*", "checkpoints", "last*.ckpt"))
    if not found:
        raise FileNotFoundError(f"ckpt_path last: no last.ckpt under {os.path.join(root_dir, 'lightning_logs')}")
    return max(found, key=os.path.getmtime)


class TaskCLI(LightningCLI):
    """LightningCLI for a `TrainingTask` and its data module, with this project's checkpointing, CSV logging,
    resume conventions and one-line errors.

    The task class says what differs between recipes: `monitor` (the metric of the best checkpoint),
    `linked` (data attributes passed to the task), `cli_callbacks` (further option groups) and, for `validate`,
    `configure_validation` and `report_validation`.

    Args:
        model_class: the task, a `TrainingTask` subclass.
        datamodule_class: its data module.
        args: the command line without the subcommand; None reads `sys.argv`.
        run: fit or validate now; False only builds the parser, config, task, data and trainer.
        mode: 'fit' or 'validate'.
    """

    def __init__(
        self,
        model_class: type[TrainingTask],
        datamodule_class: type[LightningDataModule],
        args: list[str] | None = None,
        run: bool = True,
        mode: str = "fit",
    ):
        if mode not in ("fit", "validate"):
            raise ValueError(f"mode must be 'fit' or 'validate', got {mode!r}")
        self.mode = mode
        super().__init__(
            model_class,
            datamodule_class,
            run=False,
            args=args,
            seed_everything_default=0,
            parser_class=_OneLineErrorParser,
            parser_kwargs={"parser_mode": COMPOSED_YAML},
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"log_every_n_steps": 10, "num_sanity_val_steps": 0},
            auto_configure_optimizers=False,
        )
        if run:
            self.fit() if mode == "fit" else self.validate()

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        set_loader(COMPOSED_YAML, load_composed_yaml, exceptions=(yaml.YAMLError, OSError, ValueError))
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        task = self.model_class
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume from this Lightning checkpoint; 'last' takes the newest last.ckpt under default_root_dir.",
        )
        for name in task.linked:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        # Two checkpoint callbacks: Lightning's `save_last` rewrites last.ckpt only in epochs that also saved
        # a top-k file, so a run whose metric stalls would resume from far back. `last_checkpoint` keeps
        # one monitor-free file, last.ckpt, rewritten every epoch; `checkpoint` keeps the best by the monitor.
        if task.monitor is not None:
            short = task.monitor.rsplit("/", 1)[-1]
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": task.monitor,
                    "checkpoint.mode": "max",
                    "checkpoint.save_last": False,
                    "checkpoint.save_top_k": 1,
                    "checkpoint.filename": f"epoch={{epoch}}-{short}={{{task.monitor}:.4f}}",
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
        for name, callback in task.cli_callbacks.items():
            parser.add_lightning_class_args(callback, name)

    def before_instantiate_classes(self) -> None:
        if self.mode == "validate":
            try:
                self.model_class.configure_validation(self.config, self.parser.get_defaults()["data"])
            except (ValueError, TypeError) as e:
                self.parser.error(str(e))

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
        ckpt_path = self._resolve_ckpt_path(root) if self.mode == "fit" else None
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

    def validate(self) -> dict[str, Any]:
        """Evaluate the loaded weights on the val split; the task reports (and returns) the figures."""
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path is not None and not os.path.isfile(ckpt_path):
            self.parser.error(f"ckpt_path: file {ckpt_path!r} does not exist")
        metrics = self.trainer.validate(self.model, self.datamodule, ckpt_path=ckpt_path, verbose=False)[0]
        return self.model.report_validation(metrics, self.config["model"].get("pretrained_file") or ckpt_path)


def main(
    model_class: type[TrainingTask], datamodule_class: type[LightningDataModule], args: list[str] | None = None
) -> None:
    """Parse `args` (default: the command line), build the task, data and trainer, and fit or validate.

    A first argument `fit` or `validate` picks the subcommand (`fit` when there is none).
    """
    # An EMA copy is kept in eval mode on purpose; Lightning would warn about it at every start.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    if datamodule_class.val_dataloader is LightningDataModule.val_dataloader:
        # No validation loop by design (a generator is judged by its samples): Lightning's note about it is noise.
        warnings.filterwarnings("ignore", message=r".*val_dataloader.*")
    args = list(sys.argv[1:] if args is None else args)
    mode = args.pop(0) if args and args[0] in ("fit", "validate") else "fit"
    TaskCLI(model_class, datamodule_class, args=args, mode=mode)
