"""Backbones registered with timm, one file per family."""

from . import biformer
from .biformer import BiFormer

__all__ = ["BiFormer", "biformer"]
