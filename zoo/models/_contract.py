"""Pieces every zoo backbone shares on top of timm's builder: input checks, safe weight loading,
key conversion with a strict comparison that names what does not match, the pretrained-cfg fields
and the builder call, and the timm model contract (`StagedBackbone`)."""

import numbers
import os
import re
from collections.abc import Callable, Sequence
from typing import Final

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._input import update_model_input_size

from ..checkpoint import load_state_dict_file

__all__ = [
    "StagedBackbone",
    "backbone_cfg",
    "check_image_input",
    "convert_state_dict",
    "create_backbone",
    "expected_weight_path",
    "load_pretrained_file_safely",
    "rename_keys",
    "strict_key_check",
]

KeyRule = tuple[str, str | Callable[[re.Match], str]]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _dtype_fits(x: torch.Tensor, dtype: torch.dtype) -> bool:
    # Autocast casts every floating input but float64 to its own dtype for the model's matmuls and convs.
    return x.dtype == dtype or (x.dtype != torch.float64 and _autocast_on(x.device.type))


@register_notrace_function  # torch.fx records the check as one call instead of tracing into it
def check_image_input(x: torch.Tensor, in_chans: int, min_size: int, dtype: torch.dtype | None = None) -> None:
    """Check a backbone's input before any work is done.

    Raises:
        TypeError: x is not a floating-point tensor, or its dtype is not the model's `dtype` (under autocast,
            which casts for the model, any floating dtype but float64).
        ValueError: naming the expected and received shape unless x is (B, in_chans, H, W), H, W >= min_size.
            B may be 0: the output is then empty, as timm's models return it.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"expected input of shape (B, {in_chans}, H, W) with H, W >= {min_size}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images (convert with x.float() and normalize), got {x.dtype}")
    if dtype is not None and not _dtype_fits(x, dtype):
        raise TypeError(
            f"input dtype {x.dtype} differs from the model's {dtype}: convert the input (x.to({dtype})) or the "
            f"model (model.to({x.dtype})), or run under torch.autocast"
        )


# Weight files of a hub-style folder, in timm's order of preference (`timm.models._hub`).
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def _cfg_get(cfg: object, key: str) -> object:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def _folder_weights(folder: str) -> str:
    """The weight file of a hub-style folder (`local-dir:PATH`)."""
    for name in _FOLDER_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"local-dir:{folder} holds no weight file (one of {', '.join(_FOLDER_WEIGHTS)})")


def expected_weight_path(cfg: object) -> str:
    """Where `pretrained=True` without a file looks for a release file: torch's hub checkpoint folder."""
    name = _cfg_get(cfg, "architecture") or "checkpoint"
    tag = _cfg_get(cfg, "tag")
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{name}.{tag}.pth" if tag else f"{name}.pth")


def load_pretrained_file_safely(
    pretrained: bool, kwargs: dict, state_dict_keys: tuple[str, ...], variant: str | None = None
) -> dict:
    """Read the weight file a user names (or a hub-style folder's) without executing code from it.

    timm's own file loader uses `weights_only=True`, which refuses the authors' release files (they
    pickle an argparse Namespace beside the weights) and prefers an EMA copy over the weights the
    authors evaluate. So the file is read here and handed to timm as an in-memory `state_dict`
    source: timm then runs `checkpoint_filter_fn`, adapts the classifier and input conv, and loads.
    Nothing is downloaded: without a file, the release file must already be at `expected_weight_path`.

    Args:
        pretrained: whether weights are requested at all.
        kwargs: the model entrypoint's kwargs (`pretrained_cfg_overlay`, `pretrained_cfg`).
        state_dict_keys: where the authors' checkpoint keeps the model's tensors, in order.
        variant: the registered name, whose default cfg (release URL) applies when kwargs name none.

    Returns:
        kwargs with `pretrained_cfg_overlay` pointing at the loaded state dict.

    Raises:
        FileNotFoundError: no file given and none at the expected path; the message names the release URL and
            where to put the file.
        ValueError: naming the path of a file that is empty, truncated or not a checkpoint.
    """
    if not pretrained:
        return kwargs
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("state_dict") is not None:
        return kwargs
    cfg = kwargs.get("pretrained_cfg")
    if variant is not None and (cfg is None or isinstance(cfg, str)):
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=cfg)
    path = overlay.pop("file", None)
    if not path and cfg is not None and _cfg_get(cfg, "source") == "local-dir":
        path = _folder_weights(str(_cfg_get(cfg, "file")))  # timm.create_model("local-dir:PATH", pretrained=True)
    if not path:
        url = overlay.get("url") or (_cfg_get(cfg, "url") if cfg is not None else None)
        if not url:
            return kwargs  # let timm report that no weights exist
        path = expected_weight_path(cfg)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{_cfg_get(cfg, 'architecture') or 'this model'}: pretrained=True needs the weight file, and nothing "
                f"is downloaded. Download {url} yourself and pass pretrained_cfg_overlay=dict(file=PATH), or put "
                f"it at {path}"
            )
    state_dict = load_state_dict_file(path, keys=state_dict_keys)
    # timm re-initializes a classifier whose class count differs from the cfg's (1000). A file whose
    # classifier already has the requested classes (a fine-tuned export) must keep it.
    classifier = _cfg_get(cfg, "classifier") if cfg is not None else None
    head = state_dict.get(f"{classifier or 'head.fc'}.weight")
    if head is not None and "num_classes" not in overlay and kwargs.get("num_classes") == head.shape[0]:
        overlay["num_classes"] = head.shape[0]
    overlay["state_dict"] = state_dict
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def rename_keys(state_dict: dict[str, torch.Tensor], rules: Sequence[KeyRule]) -> dict[str, torch.Tensor]:
    """A copy of state_dict with every key rewritten by each (pattern, replacement) of rules, in order."""
    converted = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        converted[key] = value
    return converted


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, rules: Sequence[KeyRule], own_key: str, source: str
) -> dict[str, torch.Tensor]:
    """An official checkpoint's state dict renamed to the model's keys by rules, strictly checked.

    A state dict that holds own_key (one of the model's own keys) is already in the model's layout
    (e.g. a safetensors export of ours) and is only checked.

    Raises:
        KeyError: naming the keys the model needs but the checkpoint lacks, or the checkpoint's keys
            the model has no place for.
        ValueError: naming the first keys whose shapes differ (e.g. a checkpoint of another size).
    """
    converted = dict(state_dict) if own_key in state_dict else rename_keys(state_dict, rules)
    strict_key_check(converted, model, classifier="head.fc", source=source)
    return converted


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
    # timm adapts the stem to the model's input channels after this filter (`adapt_input_conv`, in_chans != 3).
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    stem = f"{first_conv}.weight" if isinstance(first_conv, str) else None

    def other_channels(k: str, v: torch.Tensor) -> bool:
        w = expected[k]
        return k == stem and v.dim() == w.dim() == 4 and v.shape[:1] + v.shape[2:] == w.shape[:1] + w.shape[2:]

    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and not is_head(k) and tuple(v.shape) != tuple(expected[k].shape) and not other_channels(k, v)
    ]
    if wrong:
        raise ValueError(f"{source} has {len(wrong)} tensors of the wrong shape, first: {wrong[:4]}")


def backbone_cfg(
    url: str,
    *,
    crop_pct: float,
    first_conv: str,
    paper_ids: str,
    paper_name: str,
    origin_url: str,
    license: str,
    **kwargs,
) -> dict:
    """A pretrained cfg for an ImageNet-1k classifier at 224 x 224 (stride 32, ImageNet mean/std,
    bicubic, inputs from 32 x 32, classifier `head.fc`); kwargs override or add fields."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 32, 32),
        "pool_size": (7, 7),
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head.fc",
        "paper_ids": paper_ids,
        "paper_name": paper_name,
        "origin_url": origin_url,
        "license": license,
        **kwargs,
    }


def check_num_classes(num_classes: object) -> None:
    """Raise unless num_classes is an int >= 0 (0: no classifier, as in timm)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an int >= 0 (0 for no classifier), got {num_classes!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0 for no classifier), got {num_classes}")


def _check_rate(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:  # also false for NaN
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


def check_backbone_args(variant: str, kwargs: dict) -> None:
    """Check the arguments every zoo backbone shares before anything is built or loaded.

    Raises:
        TypeError, ValueError: naming the argument, the value and the range it must lie in: `num_classes`
            an int >= 0, `in_chans` an int >= 1, dropout and stochastic-depth rates in [0, 1) (a rate of 1
            would drop every sample; outside the range they failed only once training started).
    """
    if "num_classes" in kwargs:
        check_num_classes(kwargs["num_classes"])
    in_chans = kwargs.get("in_chans", 3)
    if isinstance(in_chans, bool) or not isinstance(in_chans, numbers.Integral):
        raise TypeError(f"{variant}: in_chans must be an int >= 1, got {in_chans!r}")
    if in_chans < 1:
        raise ValueError(f"{variant}: in_chans must be an int >= 1, got {in_chans}")
    for name in ("drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate"):
        if kwargs.get(name) is not None:
            _check_rate(f"{variant}: {name}", kwargs[name])


def create_backbone(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    checkpoint_filter_fn: Callable[[dict, nn.Module], dict],
    state_dict_keys: tuple[str, ...],
    /,
    **kwargs,
) -> nn.Module:
    """Build a four-stage backbone with timm's builder: weights read by `load_pretrained_file_safely`
    and converted by checkpoint_filter_fn, `features_only` through the model's `forward_intermediates`.

    Args:
        model_cls: the backbone class.
        variant: the registered name (`zoo_<family>_<size>`).
        pretrained: whether to load weights.
        checkpoint_filter_fn: converts a checkpoint's state dict to the model's keys, strictly.
        state_dict_keys: where the authors' checkpoint keeps the model's tensors, in order.
        kwargs: the model's arguments and timm's (`out_indices`, `pretrained_cfg_overlay`, ...).
    """
    check_backbone_args(variant, kwargs)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    kwargs = load_pretrained_file_safely(pretrained, kwargs, state_dict_keys=state_dict_keys, variant=variant)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


class StagedBackbone(nn.Module):
    """timm's model contract for the zoo's four-stage backbones, written once.

    A subclass builds `stem`, `stages` (an nn.Sequential whose stages carry a `grad_checkpointing`
    flag), `norm` (the final norm, applied in `stage_format`; nn.Identity where the head normalises
    after pooling), `head` (timm's `ClassifierHead` or `NormMlpClassifierHead`, NCHW), `feature_info`,
    `in_chans` and `min_input_size`, and sets `stage_format` to the layout its stages return: "NCHW"
    or "NHWC" (channels-last). `_init_weights` is the official models' common init, for
    `self.apply(self._init_weights)`; a family that differs overrides it, `no_weight_decay` (position
    tables) or `prune_intermediate_layers` (a norm inside the head).
    """

    stage_format: Final[str] = "NCHW"  # a TorchScript constant: the scripted forward reads the class default
    grad_checkpointing = False
    img_size: tuple[int, int] = (224, 224)
    # Window, grid and stripe sizes derived from the input size are its side divided by this (the final stride).
    partition_ratio = 32

    __jit_unused_properties__ = ["output_fmt"]  # a Python-side label; the scripted model keeps `stage_format`

    @property
    def output_fmt(self) -> str:
        """The layout of the stage outputs, which timm's fx, hook and list feature wrappers return as they are
        (its `features_only=True, feature_cls="fx"` reads this to label them; the default getter returns NCHW)."""
        return self.stage_format

    def _partition_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The side of a last-stage map of an img_size input: the window/grid/stripe size the authors use there."""
        return tuple(max(1, s // self.partition_ratio) for s in img_size)

    def _set_input_size(self, img_size: tuple[int, int], **sizes) -> dict:
        """Apply a new nominal input size to the layers that depend on it; return the sizes now in use.

        Families whose layers do not depend on the input size (BiFormer's region count, FocalNet's
        kernels, LITv2's HiLo windows) only record it; others override this.
        """
        if sizes:
            raise TypeError(f"{type(self).__name__}.set_input_size takes only img_size, got {sorted(sizes)}")
        return {}

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int] | None = None, **sizes) -> None:
        """Set the nominal input size as timm's `set_input_size` does: the window, grid or stripe sizes and
        relative-position tables derived from it follow (tables resized by timm's `resize_rel_pos_bias_table`).

        Args:
            img_size: (H, W) or side; None keeps the current one.
            sizes: family-specific partition sizes overriding the derived ones (`window_size`, `grid_size`
                for MaxViT, `window_size` for DaViT, `split_sizes` for CSWin).
        """
        if img_size is not None:
            img_size = to_2tuple(img_size)
            if len(img_size) != 2 or min(img_size) < 1:
                raise ValueError(f"img_size must be a positive side or (H, W), got {img_size}")
            self.img_size = tuple(int(s) for s in img_size)
        used = self._set_input_size(self.img_size, **sizes)
        update_model_input_size(self, self.img_size, **used)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the official models: truncated-normal linears, zero biases; other layers keep their own init.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_scripting():
            # TorchScript reads neither the parameters' dtype nor the autocast state: shape and kind are checked.
            side = self.min_input_size
            if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2] < side or x.shape[3] < side:
                raise ValueError(
                    f"expected input of shape (B, {self.in_chans}, H, W) with H, W >= {side}, got {x.shape}"
                )
            if not x.is_floating_point():
                raise TypeError("expected floating-point images (convert with x.float() and normalize)")
        else:
            param = next(self.parameters(), None)
            check_image_input(x, self.in_chans, self.min_input_size, None if param is None else param.dtype)

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
        check_num_classes(num_classes)
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
        self._check_input(x)
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
        self._check_input(x)
        x = self.stem(x)
        if torch.jit.is_scripting():  # TorchScript compiles this branch alone; `grad_checkpointing` is a class default
            x = self.stages(x)
        elif self.grad_checkpointing:
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self._to_format(self.norm(x), "NCHW")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, C4, h, w) -> logits (B, num_classes), or pooled features (B, C4) if pre_logits."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
