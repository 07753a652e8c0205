"""Zoo backbones in OpenMMLab: registers `ZooBackbone` in mmengine's MODELS registry (and in mmdet's
and mmseg's when they are installed), so a config can say

    custom_imports = dict(imports=["zoo.integrations.mmengine"], allow_failed_imports=False)
    model = dict(backbone=dict(type="ZooBackbone", arch="zoo_biformer_s", out_indices=(0, 1, 2, 3),
                               drop_path_rate=0.3, frozen_stages=-1, norm_eval=False,
                               init_cfg=dict(type="Pretrained", checkpoint="biformer_small.pth")))

`init_cfg=dict(type="Pretrained", ...)` is served by the zoo's own safe loader: mmengine's
`load_checkpoint` fails under torch >= 2.6 on release files that pickle non-tensors
(open-mmlab/mmengine#1655), and would otherwise unpickle them with code execution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    from mmengine.model import BaseModule
    from mmengine.registry import MODELS
except ImportError as exc:  # an optional extra: say which one
    raise ImportError(
        "zoo.integrations.mmengine needs mmengine, an optional dependency: pip install 'zoo[openmmlab]'"
    ) from exc

from .dense import DenseBackbone

__all__ = ["ZooBackbone"]


class ZooBackbone(BaseModule):
    """mmengine module around `DenseBackbone`; returns a tuple of (B, C_i, H_i, W_i) maps.

    Args: as `DenseBackbone`, plus mmengine's `init_cfg` (only `type="Pretrained"` with `checkpoint`
    is taken, and loaded when the runner calls `init_weights()`).
    """

    def __init__(
        self,
        arch: str,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        drop_path_rate: float = 0.0,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        out_norm: str | None = "auto",
        with_cp: bool = False,
        init_cfg: dict | None = None,
        **model_kwargs,
    ):
        self._checkpoint = None
        if init_cfg is not None:
            if init_cfg.get("type") != "Pretrained" or "checkpoint" not in init_cfg:
                raise ValueError(
                    f"ZooBackbone supports init_cfg=dict(type='Pretrained', checkpoint=PATH), got {init_cfg}"
                )
            self._checkpoint = init_cfg["checkpoint"]
        super().__init__(init_cfg=None)
        self.backbone = DenseBackbone(
            arch, out_indices, drop_path_rate, frozen_stages, norm_eval, out_norm, with_cp, **model_kwargs
        )
        self.channels, self.strides = self.backbone.channels, self.backbone.strides

    def init_weights(self) -> None:
        if self._checkpoint:
            self.backbone.load_pretrained(self._checkpoint)
            self._is_init = True
        else:
            super().init_weights()

    def train(self, mode: bool = True) -> ZooBackbone:
        super().train(mode)
        self.backbone.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.backbone(x)


MODELS.register_module(name="ZooBackbone", module=ZooBackbone, force=True)
for _package in ("mmdet", "mmseg"):
    try:
        _registry = __import__(f"{_package}.registry", fromlist=["MODELS"]).MODELS
    except ImportError:
        continue
    _registry.register_module(name="ZooBackbone", module=ZooBackbone, force=True)
