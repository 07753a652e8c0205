"""1x1 convolutions of channels-last maps as the GEMMs they are, with autograd (training and any device).

PyTorch sends 1x1 convs on small single-threaded batches to its slow im2col path and may change the
memory layout; a linear layer on the (B, H, W, C) rows is one GEMM whatever the thread count. Only for
plain `nn.Conv2d` 1x1 convs (the dispatch checks): a subclass or a hooked conv takes the reference,
which calls the module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["bn_pointwise_conv_bn_gelu", "pointwise_conv", "pointwise_conv_add"]


def pointwise_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv (1x1, stride 1) of a channels-last map; x: (B, H, W, C_in) -> (B, H, W, C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def pointwise_conv_add(x: torch.Tensor, conv: nn.Conv2d, other: torch.Tensor) -> torch.Tensor:
    """other + pointwise_conv(x, conv); x: (B, H, W, C_in), other: (B, H, W, C_out)."""
    return other + pointwise_conv(x, conv)


def _channels_last_bn(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The NCHW view of a contiguous (B, H, W, C) map has channels_last strides: no layout copy.
    return bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def bn_pointwise_conv_bn_gelu(
    x: torch.Tensor, pre_bn: nn.Module, conv: nn.Conv2d, bn: nn.Module, approximate: str = "none"
) -> torch.Tensor:
    """gelu(bn(conv(pre_bn(x)))), the BatchNorms called as modules; x: (B, H, W, C_in) -> (B, H, W, C_out)."""
    y = pointwise_conv(_channels_last_bn(pre_bn, x), conv)
    return F.gelu(_channels_last_bn(bn, y), approximate=approximate)
