"""Pieces every zoo backbone shares on top of timm's builder: input checks, safe weight loading,
and a strict key comparison that names what does not match."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..checkpoint import load_state_dict_file

__all__ = ["check_image_input", "load_pretrained_file_safely", "strict_key_check"]


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
    overlay["state_dict"] = load_state_dict_file(path, keys=state_dict_keys)
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
