"""Zoo backbones in their dense-prediction form: multi-scale feature maps for detection/segmentation.

The form follows the authors' detection/segmentation code: no classifier or final norm, per-stage
output norms where the authors add them (see `OUT_NORMS`), frozen stages, BatchNorm kept in eval mode
(`norm_eval`), any input size, and gradient checkpointing for memory.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from ..checkpoint import load_state_dict_file

__all__ = ["DenseBackbone", "OUT_NORMS", "OutNorm"]


@dataclass(frozen=True)
class OutNorm:
    """A family's per-stage output norm as its authors' detection/segmentation backbone adds it.

    Every one is a LayerNorm over the channels of one stage's output.

    Attributes:
        key: the norm's name in the authors' dense checkpoints, "{}" standing for its number.
        eps: the norm's epsilon.
        first: the number the authors give to stage 0.
    """

    key: str
    eps: float = 1e-5
    first: int = 0

    def pattern(self) -> re.Pattern:
        """Matches an authors' norm key, e.g. "norm2.weight"; group 1 is the number, group 2 the tensor."""
        return re.compile("^" + re.escape(self.key).replace(r"\{\}", r"(\d+)") + r"\.(weight|bias)$")


# The authors' dense backbones normalize each output stage (MaxViT has no official dense code, so timm's
# form, without output norms, stands): BiFormer's `extra_norms` (timm's LayerNorm2d), CSWin's
# `norm1..norm4`, DaViT's, FocalNet's and LITv2's `norm{i}` per out index (nn.LayerNorm). LITv2's
# detection backbone leaves stage 0 unnormalized, its segmentation backbone does not: the default
# follows the segmentation code, and a detection checkpoint without `norm0` loads with no norm there.
OUT_NORMS = {
    "biformer": OutNorm("extra_norms.{}", eps=1e-6),
    "cswin": OutNorm("norm{}", first=1),
    "davit": OutNorm("norm{}"),
    "focalnet": OutNorm("norm{}"),
    "litv2": OutNorm("norm{}"),
}


def _family(arch: str) -> str:
    return arch.split("_")[1] if arch.startswith("zoo_") else arch


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stage_indices(out_indices: Sequence[int], num_stages: int) -> tuple[int, ...]:
    """out_indices as non-negative stage numbers; a ValueError names them unless each lies in [-n, n)."""
    if not isinstance(out_indices, Sequence) or isinstance(out_indices, str):
        raise TypeError(f"out_indices must be a sequence of stage indices, got {out_indices!r}")
    indices = tuple(out_indices)
    if not indices or not all(_is_int(i) and -num_stages <= i < num_stages for i in indices):
        raise ValueError(f"out_indices must be stage indices in [-{num_stages}, {num_stages}), got {out_indices!r}")
    return tuple(i % num_stages for i in indices)


class DenseBackbone(nn.Module):
    """A timm-registered backbone returning one (B, C_i, H_i, W_i) map per requested stage.

    Args:
        arch: model name, e.g. "zoo_biformer_s" (any timm model with `forward_intermediates` works).
        out_indices: stages to return.
        drop_path_rate: stochastic depth of the backbone.
        frozen_stages: -1 freezes nothing; k >= 0 freezes the stem and the first k stages.
        norm_eval: keep BatchNorm layers in eval mode (running statistics frozen) during training.
        out_norm: "auto" (the family's authors' choice, see OUT_NORMS), "layernorm2d" (a norm on every
            stage) or None (none).
        with_cp: gradient checkpointing inside the stages.
        pretrained: path of a checkpoint: a classification release file of the family (converted by its
            `checkpoint_filter_fn`), a file with the zoo's keys, or a dense-prediction checkpoint whose
            backbone keys start with "backbone.": the authors' (as mmdet/mmseg save them) or the zoo's own
            (train/seg.py's `best.safetensors`).
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
        self.arch = arch
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.body = timm.create_model(arch, num_classes=0, drop_path_rate=drop_path_rate, **model_kwargs)
        num_stages = len(self.body.feature_info)
        self.out_indices = _stage_indices(out_indices, num_stages)
        if not _is_int(frozen_stages) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(
                f"frozen_stages must be -1 (none) or 0..{num_stages} (the stem and that many stages), "
                f"got {frozen_stages!r}"
            )
        self.body.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        info = self.body.feature_info
        self.channels = [info[i]["num_chs"] for i in self.out_indices]
        self.strides = [info[i]["reduction"] for i in self.out_indices]
        if out_norm not in ("auto", "layernorm2d", None):
            raise ValueError(f"out_norm must be 'auto', 'layernorm2d' or None, got {out_norm!r}")
        spec = OUT_NORMS.get(_family(arch))
        self.out_norm_spec = spec
        use_norm = spec is not None if out_norm == "auto" else out_norm is not None
        eps = spec.eps if spec else 1e-6
        self.out_norms = nn.ModuleList(LayerNorm2d(c, eps=eps) if use_norm else nn.Identity() for c in self.channels)
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
        """Load a checkpoint (see the class docstring) strictly into the backbone, without running its code.

        Dense checkpoints come in two layouts under "backbone.": the zoo's own (`body.*` and `out_norms.*`,
        as train/seg.py exports them) and the authors' (their classification keys beside the per-stage norms
        named as in `OUT_NORMS`). Stages whose norm a dense checkpoint lacks ran without one (LITv2's
        detection backbone at stage 0), so their norm becomes the identity.
        """
        state_dict = load_state_dict_file(path, keys=("model", "state_dict", "module"))
        dense = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        if not dense:
            self._load_body(self._convert(state_dict, dense=False), path)
            return
        if any(k.startswith("body.") for k in dense):
            body = {k[len("body.") :]: v for k, v in dense.items() if k.startswith("body.")}
            norms = {k[len("out_norms.") :]: v for k, v in dense.items() if k.startswith("out_norms.")}
            unexpected = sorted(k for k in dense if not k.startswith(("body.", "out_norms.")))
            if unexpected:
                raise KeyError(f"{path}: unexpected backbone keys {unexpected[:8]}")
            self._load_body(body, path, strict=True)
        else:
            body, norms = self._split_authors_norms(dense, path)
            self._load_body(self._convert(body, dense=True), path)
        self._load_out_norms(norms, path)

    def _split_authors_norms(
        self, dense: dict[str, torch.Tensor], path: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Separates the authors' output norms from the body keys; the norms are keyed "<position>.<tensor>"."""
        if self.out_norm_spec is None:
            return dense, {}
        pattern, body, norms = self.out_norm_spec.pattern(), {}, {}
        for key, value in dense.items():
            match = pattern.match(key)
            if match is None:
                body[key] = value
                continue
            stage = int(match.group(1)) - self.out_norm_spec.first
            # A norm of a stage this backbone does not return has nothing to normalize here.
            if stage in self.out_indices:
                norms[f"{self.out_indices.index(stage)}.{match.group(2)}"] = value
        return body, norms

    def _convert(self, state_dict: dict[str, torch.Tensor], dense: bool) -> dict[str, torch.Tensor]:
        """The family's `checkpoint_filter_fn` applied to a release file's (or the authors' dense) keys."""
        filter_fn = getattr(importlib.import_module(type(self.body).__module__), "checkpoint_filter_fn", None)
        if filter_fn is None:
            return state_dict
        if dense:
            target = self.body  # the authors' dense checkpoints drop the final norm and head, as the body does
        else:
            with torch.device("meta"):  # only the key names and shapes are needed
                target = timm.create_model(self.arch, num_classes=0)
        return filter_fn(state_dict, target)

    def _load_body(self, converted: dict[str, torch.Tensor], path: str, strict: bool = False) -> None:
        own = self.body.state_dict()
        missing = [k for k in own if k not in converted]
        if missing:
            raise KeyError(f"{path}: missing backbone keys {missing[:8]}")
        unexpected = [k for k in converted if k not in own]
        if strict and unexpected:
            raise KeyError(f"{path}: unexpected backbone keys {unexpected[:8]}")
        self.body.load_state_dict({k: converted[k] for k in own}, strict=True)

    def _load_out_norms(self, norms: dict[str, torch.Tensor], path: str) -> None:
        positions = {k: int(k.split(".")[0]) for k in norms}
        unexpected = [
            k for k, i in positions.items() if i >= len(self.out_norms) or isinstance(self.out_norms[i], nn.Identity)
        ]
        if unexpected:
            raise KeyError(f"{path}: unexpected output-norm keys {unexpected[:8]} (this backbone has no norm there)")
        for position in range(len(self.out_norms)):
            if position not in positions.values():
                self.out_norms[position] = nn.Identity()
        self.out_norms.load_state_dict(norms, strict=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (B, C, H, W) -> one (B, C_i, ceil(H / s_i), ceil(W / s_i)) map per out index."""
        feats = self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        return tuple(norm(f) for norm, f in zip(self.out_norms, feats, strict=True))
