"""The plain statement of each fused-pointwise op: the module called as it is, then the pointwise op.

The oracle the other paths are tested against, and the path taken whenever a module is not a plain one
(a wrapper, a subclass with its own forward, a module with hooks): calling the module is what lets hooks
run and wrapped layers (LoRA, quantisation) take effect. Never tuned.

Channels-last maps are (B, H, W, C); the convolutions see their NCHW view, (B, C, H, W).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import OPS

__all__ = [*OPS]


def linear(x: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    """fc(x); x: (..., C_in) -> (..., C_out)."""
    return fc(x)


def linear_gelu(x: torch.Tensor, fc: nn.Module, approximate: str = "none") -> torch.Tensor:
    """gelu(fc(x)); x: (..., C_in) -> (..., C_out)."""
    return F.gelu(fc(x), approximate=approximate)


def linear_add(x: torch.Tensor, fc: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other + fc(x); x: (..., C_in), other broadcastable to (..., C_out)."""
    return other + fc(x)


def linear_mul(x: torch.Tensor, fc: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other * fc(x); x: (..., C_in), other broadcastable to (..., C_out)."""
    return other * fc(x)


def linear_split(x: torch.Tensor, fc: nn.Module, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """fc(x) split along its channels; x: (..., C_in) -> one (..., size) per entry of sizes."""
    return tuple(fc(x).split(list(sizes), dim=-1))


def conv_gelu(x: torch.Tensor, conv: nn.Module, approximate: str = "none") -> torch.Tensor:
    """gelu(conv(x)); x: (B, C_in, H, W) -> (B, C_out, H', W')."""
    return F.gelu(conv(x), approximate=approximate)


def conv_add(x: torch.Tensor, conv: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other + conv(x); x: (B, C_in, H, W), other: (B, C_out, H', W')."""
    return other + conv(x)


def conv_bn_gelu(x: torch.Tensor, conv: nn.Module, bn: nn.Module, approximate: str = "none") -> torch.Tensor:
    """gelu(bn(conv(x))); x: (B, C_in, H, W) -> (B, C_out, H', W')."""
    return F.gelu(bn(conv(x)), approximate=approximate)


def pointwise_conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """A 1x1 conv of a channels-last map; x: (B, H, W, C_in) -> (B, H, W, C_out)."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def pointwise_conv_add(x: torch.Tensor, conv: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other + pointwise_conv(x, conv); x: (B, H, W, C_in), other: (B, H, W, C_out)."""
    return other + pointwise_conv(x, conv)


def bn_pointwise_conv_bn_gelu(
    x: torch.Tensor, pre_bn: nn.Module, conv: nn.Module, bn: nn.Module, approximate: str = "none"
) -> torch.Tensor:
    """gelu(bn(conv(pre_bn(x)))) for a 1x1 conv between two BatchNorms; x: (B, H, W, C_in) -> (B, H, W, C_out)."""
    y = conv(pre_bn(x.permute(0, 3, 1, 2)))
    return F.gelu(bn(y), approximate=approximate).permute(0, 2, 3, 1)
