"""Backbones registered with timm, one file per family."""

from . import biformer, cswin, davit, focalnet, litv2  # noqa: F401
from .biformer import BiFormer
from .maxvit import MaxViT  # noqa: F401

__all__ = ["BiFormer", "biformer"]
