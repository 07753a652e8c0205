"""Lightning recipes: the tasks, their data, and the launchers behind `train/cls.py` and `train/video_dit.py`.

Importing this package imports `zoo`, which registers every `zoo_*` model with timm.
"""

from .checkpointing import AtomicCheckpointIO
from .classification import ImageClassifier, export_safetensors
from .data import DigitsDataset, ImageClassificationData
from .video_data import MovingDigits, MovingDigitsData
from .video_dit import VideoDiTTask, VideoSamples, export_pipeline

__all__ = [
    "AtomicCheckpointIO",
    "DigitsDataset",
    "ImageClassificationData",
    "ImageClassifier",
    "MovingDigits",
    "MovingDigitsData",
    "VideoDiTTask",
    "VideoSamples",
    "export_pipeline",
    "export_safetensors",
]
