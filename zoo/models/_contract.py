"""Pieces every zoo backbone shares on top of timm's builder: input checks, safe weight loading,
and a strict key comparison that names what does not match."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from ..checkpoint import load_state_dict_file

__all__ = ["StagedBackbone", "check_image_input", "load_pretrained_file_safely", "strict_key_check"]


def check_image_input(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Raise a ValueError naming the expected and received shape unless x is (B, in_chans, H, W), H, W >= min_size."""
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"expected input of shape (B, {in_chans}, H, W) with H, W >= {min_size}, got {tuple(x.shape)}")


def load_pretrained_file_safely(pretrained: bool, kwargs: dict, state_dict_keys: tuple[str, ...]) -> dict:
    """Read the weight file a user names (or the release URL) without executing code from it.

    timm's own file loader uses `weights_only=True`, which refuses the authors' release files (they
    pickle an argparse Namespace beside the weights) and prefers an EMA copy over the weights the
    authors evaluate. So the file is read here and handed to timm as an in-memory `state_dict`
    source: timm then runs `checkpoint_filter_fn`, adapts the classifier and input conv, and loads.

    Args:
        pretrained: whether weights are requested at all.
        kwargs: the model entrypoint's kwargs (`pretrained_cfg_overlay`, `pretrained_cfg`).
        state_dict_keys: where the authors' checkpoint keeps the model's tensors, in order.

    Returns:
        kwargs with `pretrained_cfg_overlay` pointing at the loaded state dict.
    """
    if not pretrained:
        return kwargs
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("state_dict") is not None:
        return kwargs
    path = overlay.pop("file", None)
    if not path:
        cfg = kwargs.get("pretrained_cfg")
        url = overlay.get("url") or (getattr(cfg, "url", None) if cfg is not None else None)
        if not url:
            return kwargs  # let timm report that no weights exist
        name = getattr(cfg, "architecture", None) or "checkpoint"
        path = os.path.join(torch.hub.get_dir(), "checkpoints", f"{name}.pth")
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=True)
    state_dict = load_state_dict_file(path, keys=state_dict_keys)
    # timm re-initializes a classifier whose class count differs from the cfg's (1000). A file whose
    # classifier already has the requested classes (a fine-tuned export) must keep it.
    cfg = kwargs.get("pretrained_cfg")
    classifier = getattr(cfg, "classifier", None) or "head.fc"
    head = state_dict.get(f"{classifier}.weight")
    if head is not None and "num_classes" not in overlay and kwargs.get("num_classes") == head.shape[0]:
        overlay["num_classes"] = head.shape[0]
    overlay["state_dict"] = state_dict
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def strict_key_check(state_dict: dict[str, torch.Tensor], model: nn.Module, classifier: str, source: str) -> None:
    """Compare converted keys and shapes with the model's; raise naming the first mismatches.

    Classifier keys may differ in shape or be absent from the model: timm adapts the classifier
    when `num_classes` differs from the checkpoint's.
    """
    expected = model.state_dict()
    is_head = lambda k: k.startswith(classifier + ".")
    missing = [k for k in expected if k not in state_dict and not is_head(k)]
    unexpected = [k for k in state_dict if k not in expected and not is_head(k)]
    if missing or unexpected:
        raise KeyError(
            f"{source} does not match {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and not is_head(k) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(f"{source} has {len(wrong)} tensors of the wrong shape, first: {wrong[:4]}")


class StagedBackbone(nn.Module):
    """timm's model contract for the zoo's four-stage backbones, written once.

    A subclass builds `stem`, `stages` (an nn.Sequential whose stages carry a `grad_checkpointing`
    flag), `norm` (the final norm, applied in `stage_format`), `head` (timm's `ClassifierHead`, NCHW),
    `feature_info`, `in_chans` and `min_input_size`, and sets `stage_format` to the layout its stages
    return: "NCHW" or "NHWC" (channels-last).
    """

    stage_format = "NCHW"
    grad_checkpointing = False

    def _to_format(self, x: torch.Tensor, fmt: str) -> torch.Tensor:
        if fmt == self.stage_format:
            return x
        return x.permute(0, 3, 1, 2) if self.stage_format == "NHWC" else x.permute(0, 2, 3, 1)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # No position tables or tokens; timm's optimizer factory already spares norms and biases.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        if coarse:
            return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")
        return dict(
            stem=r"^stem",
            blocks=[
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs, (B, C_i, H_i, W_i) each at stride `feature_info[i]["reduction"]`, as timm defines the call.

        Args:
            x: (B, C, H, W) images.
            indices: last n stages if int, all if None, else the stage indices to return.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list of stage outputs.

        Returns:
            The list of stage outputs, or (final features as `forward_features` returns them, the list).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        check_image_input(x, self.in_chans, self.min_input_size)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early and not torch.jit.is_scripting() else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                x_out = self.norm(x) if norm and i == last_idx else x
                intermediates.append(self._to_format(x_out, output_fmt))
        if intermediates_only:
            return intermediates
        if i == last_idx:
            x = self.norm(x)
        return self._to_format(x, "NCHW"), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm/head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        truncated = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or truncated:
            self.norm = nn.Identity()
        if prune_head or truncated:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C4, H / 32, W / 32) after the final norm."""
        check_image_input(x, self.in_chans, self.min_input_size)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self._to_format(self.norm(x), "NCHW")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, C4, h, w) -> logits (B, num_classes), or pooled features (B, C4) if pre_logits."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
