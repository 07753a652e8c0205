"""Zoo backbones in their dense-prediction form: multi-scale feature maps for detection/segmentation.

The form follows the authors' detection/segmentation code: no classifier or final norm, optional
per-stage output norms where the authors add them (BiFormer's `extra_norms`, a LayerNorm2d per
stage), frozen stages, BatchNorm kept in eval mode (`norm_eval`), any input size, and gradient
checkpointing for memory.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from ..checkpoint import load_state_dict_file

__all__ = ["DenseBackbone", "OUT_NORMS"]

# Families whose authors' dense-prediction backbones normalize every output stage.
OUT_NORMS = {"biformer": "layernorm2d"}


def _family(arch: str) -> str:
    return arch.split("_")[1] if arch.startswith("zoo_") else arch


class DenseBackbone(nn.Module):
    """A timm-registered backbone returning one (B, C_i, H_i, W_i) map per requested stage.

    Args:
        arch: model name, e.g. "zoo_biformer_s" (any timm model with `forward_intermediates` works).
        out_indices: stages to return.
        drop_path_rate: stochastic depth of the backbone.
        frozen_stages: -1 freezes nothing; k >= 0 freezes the stem and the first k stages.
        norm_eval: keep BatchNorm layers in eval mode (running statistics frozen) during training.
        out_norm: "auto" (the family's authors' choice, see OUT_NORMS), "layernorm2d" or None.
        with_cp: gradient checkpointing inside the stages.
        pretrained: path of a checkpoint: a classification release file of the family (converted by its
            `checkpoint_filter_fn`), a file with the zoo's keys, or a dense-prediction checkpoint whose
            backbone keys start with "backbone." (as mmdet/mmseg save them).
        model_kwargs: further arguments of the model constructor.
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
        pretrained: str | None = None,
        **model_kwargs,
    ):
        super().__init__()
        if not timm.is_model(arch):
            raise ValueError(f"unknown arch {arch!r}; registered zoo models: {timm.list_models('zoo_*')}")
        self.arch, self.out_indices = arch, tuple(out_indices)
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.body = timm.create_model(arch, num_classes=0, drop_path_rate=drop_path_rate, **model_kwargs)
        self.body.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        info = self.body.feature_info
        self.channels = [info[i]["num_chs"] for i in self.out_indices]
        self.strides = [info[i]["reduction"] for i in self.out_indices]
        norm = OUT_NORMS.get(_family(arch)) if out_norm == "auto" else out_norm
        if norm not in (None, "layernorm2d"):
            raise ValueError(f"out_norm must be 'auto', 'layernorm2d' or None, got {out_norm!r}")
        self.out_norms = nn.ModuleList(LayerNorm2d(c) if norm else nn.Identity() for c in self.channels)
        if with_cp:
            self.body.set_grad_checkpointing(True)
        if pretrained:
            self.load_pretrained(pretrained)
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.body.stem, *list(self.body.stages)[: self.frozen_stages]]

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> DenseBackbone:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def load_pretrained(self, path: str) -> None:
        """Load a checkpoint (see the class docstring) strictly into the backbone, without running its code."""
        state_dict = load_state_dict_file(path, keys=("model", "state_dict", "module"))
        dense = any(k.startswith("backbone.") for k in state_dict)
        if dense:
            dense = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            # The authors' dense checkpoints keep the classification keys plus per-stage "extra_norms".
            norms = {re.sub(r"^extra_norms\.", "out_norms.", k): v for k, v in dense.items() if "extra_norms." in k}
            state_dict = {k: v for k, v in dense.items() if "extra_norms." not in k}
            _, unexpected = self.out_norms.load_state_dict(
                {k[len("out_norms.") :]: v for k, v in norms.items()}, strict=False
            )
            if unexpected:
                raise KeyError(f"{path}: unexpected output-norm keys {unexpected[:8]}")
        filter_fn = getattr(importlib.import_module(type(self.body).__module__), "checkpoint_filter_fn", None)
        if dense:
            target = self.body  # the authors' dense checkpoints drop the final norm and head, as the body does
        else:
            with torch.device("meta"):  # only the key names and shapes are needed
                target = timm.create_model(self.arch, num_classes=0)
        converted = filter_fn(state_dict, target) if filter_fn else state_dict
        own = self.body.state_dict()
        missing = [k for k in own if k not in converted]
        if missing:
            raise KeyError(f"{path}: missing backbone keys {missing[:8]}")
        self.body.load_state_dict({k: converted[k] for k in own}, strict=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (B, C, H, W) -> one (B, C_i, ceil(H / s_i), ceil(W / s_i)) map per out index."""
        feats = self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        return tuple(norm(f) for norm, f in zip(self.out_norms, feats, strict=True))
