"""Zoo backbones in torchvision's detection models: a backbone with torchvision's FeaturePyramidNetwork.

from torchvision.models.detection import FasterRCNN
from zoo.integrations.torchvision import backbone_with_fpn
model = FasterRCNN(backbone_with_fpn("zoo_biformer_t", out_channels=256), num_classes=91)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .dense import DenseBackbone

__all__ = ["BackboneWithFPN", "backbone_with_fpn"]


class BackboneWithFPN(nn.Module):
    """A zoo backbone followed by an FPN; `out_channels` is what torchvision's detectors read.

    Returns an OrderedDict "0".."n-1" (+ "pool" with the default extra block) of (B, out_channels, H_i, W_i).
    """

    def __init__(self, body: DenseBackbone, out_channels: int = 256, extra_blocks: ExtraFPNBlock | None = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=extra_blocks or LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def backbone_with_fpn(
    arch: str,
    out_channels: int = 256,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    extra_blocks: ExtraFPNBlock | None = None,
    **backbone_kwargs,
) -> BackboneWithFPN:
    """Build `BackboneWithFPN` for any registered model; `backbone_kwargs` go to `DenseBackbone`
    (drop_path_rate, frozen_stages, norm_eval, out_norm, with_cp, pretrained=PATH, ...)."""
    return BackboneWithFPN(DenseBackbone(arch, out_indices, **backbone_kwargs), out_channels, extra_blocks)
