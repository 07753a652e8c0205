"""The video DiT launcher: LightningCLI over `VideoDiTTask` and `MovingDigitsData`.

    python train/video_dit.py --config configs/video/video_dit_digits.yaml
    python train/video_dit.py --config configs/video/video_dit_digits.yaml --model.attention dense
    python train/video_dit.py --config configs/video/video_dit_digits.yaml --trainer.precision bf16-mixed
    python train/video_dit.py --config ... --ckpt_path last          # resume the newest run in default_root_dir

The conventions of the classification launcher (`zoo.training.cli`), whose CLI class this one extends:
later `--config` files and flags override earlier ones, `--print_config` shows the resolved whole, a bad key
or value stops the run before training with one line naming it. Metrics go to
`<default_root_dir>/lightning_logs/version_N/metrics.csv`, `last.ckpt` (rewritten every epoch) under
`.../checkpoints/`, sample GIFs under `.../samples/`, and at the end the EMA weights as a diffusers folder
`.../pipeline/` with `.../training_summary.json` (steps, wall time).
"""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .cli import ClassificationCLI, _OneLineErrorParser
from .video_data import MovingDigitsData
from .video_dit import VideoDiTTask, VideoSamples

__all__ = ["VideoDiTCLI", "main"]


class VideoDiTCLI(ClassificationCLI):
    """`ClassificationCLI`'s parser, checkpointing, CSV logging, resume and one-line errors, for the video DiT."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        self._run_fit = run
        # LightningCLI's own constructor: ClassificationCLI's names the classification task and data.
        LightningCLI.__init__(
            self,
            VideoDiTTask,
            MovingDigitsData,
            run=False,
            args=args,
            seed_everything_default=0,
            parser_class=_OneLineErrorParser,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"log_every_n_steps": 10, "num_sanity_val_steps": 0},
            auto_configure_optimizers=False,
        )
        if run:
            self.fit()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Not the classification parser's: a generator has no val/acc1 to pick a best checkpoint by.
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume from this Lightning checkpoint; 'last' takes the newest last.ckpt under default_root_dir.",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(VideoSamples, "samples")


def main(args: list[str] | None = None) -> None:
    """Parse `args` (default: the command line), build the task, data and trainer, and fit."""
    # The EMA copy is kept in eval mode on purpose; Lightning would warn about it at every start.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # No validation loop: a generator is judged by its samples (VideoSamples, benchmarks/video_dit_digits.py).
    warnings.filterwarnings("ignore", message=r".*val_dataloader.*")
    VideoDiTCLI(args=args)
