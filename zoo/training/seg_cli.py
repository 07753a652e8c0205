"""The segmentation launcher: LightningCLI over `SemanticSegmentation` and `SegmentationData`.

    python train/seg.py --config configs/seg/zoo_biformer_t_digits.yaml
    python train/seg.py --config configs/seg/models/zoo_biformer_t.yaml --config configs/seg/data/digits.yaml \\
        --trainer.max_epochs 2 --model.lr 1e-3
    python train/seg.py --config configs/seg/zoo_biformer_t_digits.yaml --data.root /data/my_set --data.num_classes 5
    python train/seg.py --config ... --ckpt_path last          # resume the newest run in default_root_dir

The conventions of the classification launcher (`zoo.training.cli`), whose CLI class this one extends:
later `--config` files and flags override earlier ones, `--print_config` shows the resolved whole, a bad key,
type, data directory or image/annotation pairing stops the run before training with one line naming it.
Metrics go to `<default_root_dir>/lightning_logs/version_N/metrics.csv` (train/loss, val/loss, val/miou,
val/pixel_acc), checkpoints (best by val/miou and last) under `.../checkpoints/`, and the best weights to
`.../best.safetensors`.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .cli import ClassificationCLI, _OneLineErrorParser
from .seg_data import SegmentationData
from .segmentation import SemanticSegmentation

__all__ = ["SegmentationCLI", "main"]


class SegmentationCLI(ClassificationCLI):
    """`ClassificationCLI`'s parser, checkpointing, CSV logging, resume and one-line errors, for segmentation."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        self._run_fit = run
        # LightningCLI's own constructor: ClassificationCLI's names the classification task and data.
        LightningCLI.__init__(
            self,
            SemanticSegmentation,
            SegmentationData,
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
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.ignore_index", "model.ignore_index", apply_on="instantiate")
        parser.set_defaults(
            {"checkpoint.monitor": "val/miou", "checkpoint.filename": "epoch={epoch}-miou={val/miou:.4f}"}
        )


def main(args: list[str] | None = None) -> None:
    """Parse `args` (default: the command line), build the task, data and trainer, and fit."""
    SegmentationCLI(args=args)
