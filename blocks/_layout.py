"""Layout helpers shared by the windowed mixers: padding to a multiple, window/grid partition.

Every tensor here is channels-last, (B, H, W, C). One copy for the whole zoo: timm carries a
`window_partition` per model file; we keep a single tested one.
"""

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple", "window_partition", "window_reverse", "grid_partition", "grid_reverse"]


def pad_to_multiple(x: torch.Tensor, multiple: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad the bottom and right of x: (B, H, W, C) so H and W divide by `multiple`.

    Returns the padded tensor and the (pad_bottom, pad_right) amounts.
    """
    _, h, w, _ = x.shape
    pad_b = (multiple[0] - h % multiple[0]) % multiple[0]
    pad_r = (multiple[1] - w % multiple[1]) % multiple[1]
    if pad_b or pad_r:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    return x, (pad_b, pad_r)


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """x: (B, H, W, C) -> (B, nH * nW, wh, ww, C), windows in row-major order."""
    b, h, w, c = x.shape
    wh, ww = window
    if h % wh or w % ww:
        raise ValueError(f"window_partition: size {(h, w)} is not divisible by window {window}")
    x = x.view(b, h // wh, wh, w // ww, ww, c).transpose(2, 3)
    return x.reshape(b, (h // wh) * (w // ww), wh, ww, c)


def window_reverse(windows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """windows: (B, nH * nW, wh, ww, C) with `grid` = (nH, nW) -> (B, nH * wh, nW * ww, C)."""
    b, _, wh, ww, c = windows.shape
    nh, nw = grid
    x = windows.view(b, nh, nw, wh, ww, c).transpose(2, 3)
    return x.reshape(b, nh * wh, nw * ww, c)


def grid_partition(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Dilated partition (MaxViT's grid): x: (B, H, W, C) -> (B, (H/gh) * (W/gw), gh, gw, C).

    Each group holds the gh x gw tokens spaced H/gh and W/gw apart.
    """
    b, h, w, c = x.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"grid_partition: size {(h, w)} is not divisible by grid {grid}")
    x = x.view(b, gh, h // gh, gw, w // gw, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // gh) * (w // gw), gh, gw, c)


def grid_reverse(groups: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `grid_partition`: groups (B, (H/gh) * (W/gw), gh, gw, C) -> (B, H, W, C)."""
    b, _, gh, gw, c = groups.shape
    h, w = size
    x = groups.view(b, h // gh, w // gw, gh, gw, c).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, h, w, c)
