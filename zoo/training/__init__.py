"""Lightning recipes: the tasks, their data, and the launcher behind `train/cls.py`, `train/seg.py` and
`train/video_dit.py` (`zoo.training.cli.TaskCLI`).

A task is a `TrainingTask` (optimizer, schedule, EMA, loss check and export shared), its data a
`SeededDataModule` (seeded, sharded loaders shared); a new recipe is a task class, a data class and a config.
Importing this package imports `zoo`, which registers every `zoo_*` model with timm.
"""

from .checkpointing import AtomicCheckpointIO
from .classification import ImageClassifier
from .data import DigitsDataset, ImageClassificationData, SeededDataModule
from .seg_data import SegmentationData
from .segmentation import SemanticSegmentation
from .task import TrainingTask, export_safetensors
from .video_data import MovingDigits, MovingDigitsData
from .video_dit import VideoDiTTask, VideoSamples, export_pipeline

__all__ = [
    "AtomicCheckpointIO",
    "DigitsDataset",
    "ImageClassificationData",
    "ImageClassifier",
    "MovingDigits",
    "MovingDigitsData",
    "SeededDataModule",
    "SegmentationData",
    "SemanticSegmentation",
    "TrainingTask",
    "VideoDiTTask",
    "VideoSamples",
    "export_pipeline",
    "export_safetensors",
]
