"""Token mixers as nn.Modules, one per file, channels-last inside. Imports kernels, torch, timm.layers."""

from ._layout import grid_partition, grid_reverse, pad_to_multiple, window_partition, window_reverse

__all__ = ["grid_partition", "grid_reverse", "pad_to_multiple", "window_partition", "window_reverse"]
