"""Lightning recipes: the classification task, its data, and the launcher behind `train/cls.py`.

Importing this package imports `zoo`, which registers every `zoo_*` model with timm.
"""

from .checkpointing import AtomicCheckpointIO
from .classification import ImageClassifier, export_safetensors
from .data import DigitsDataset, ImageClassificationData

__all__ = ["AtomicCheckpointIO", "DigitsDataset", "ImageClassificationData", "ImageClassifier", "export_safetensors"]
