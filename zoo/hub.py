"""Hugging Face Hub-style model folders that timm loads: `timm.create_model("local-dir:PATH", pretrained=True)`.

    save_hub_folder(model, "out/zoo_biformer_t-digits", label_names=[str(i) for i in range(10)])
    model = timm.create_model("local-dir:out/zoo_biformer_t-digits", pretrained=True)

A folder holds what timm's `save_for_hf` writes (`config.json`: the architecture, the model arguments that
rebuild it, e.g. `num_classes` and `img_size`, and the pretrained cfg with the eval transform; `model.safetensors`:
the weights) and a model card `README.md` (timm's `generate_readme`). The same folder can be uploaded to the
Hub as it is. Loading reads the weights through the zoo's safe loader (safetensors, or `torch.load` with
`weights_only=True` for `.bin`/`.pth`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn
from timm.models import save_for_hf
from timm.models._hub import generate_readme

__all__ = ["model_card", "save_hub_folder"]


def model_card(model: nn.Module, description: str | None = None, metrics: dict[str, float] | None = None) -> dict:
    """timm's model-card fields for a model: licence, paper, origin, parameters, input size, metrics."""
    cfg = model.pretrained_cfg
    name = cfg.get("architecture", type(model).__name__)
    details = {
        "Model Type": "Image classification / feature backbone",
        "Model Stats": {
            "Params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "Image size": "{} x {}".format(*(getattr(model, "img_size", None) or cfg["input_size"][1:])),
            "Classes": model.num_classes,
        },
    }
    if cfg.get("paper_ids") or cfg.get("paper_name"):
        details["Papers"] = {cfg.get("paper_name", ""): cfg.get("paper_ids", "")}
    if cfg.get("origin_url"):
        details["Original"] = cfg["origin_url"]
    if metrics:
        details["Metrics"] = dict(metrics)
    usage = (
        "```python\nimport timm\nimport zoo  # registers the zoo_* architectures\n\n"
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True).eval()\n'
        "config = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**config)\n```\n"
    )
    return {
        "license": cfg.get("license", "apache-2.0"),
        "description": description or f"A `{name}` image classifier of the zoo (timm architecture `{name}`).",
        "details": details,
        "usage": usage,
    }


def save_hub_folder(
    model: nn.Module,
    path: str | os.PathLike,
    label_names: list[str] | None = None,
    description: str | None = None,
    metrics: dict[str, float] | None = None,
    data_config: dict | None = None,
) -> Path:
    """Write `config.json`, `model.safetensors` and `README.md` for `timm.create_model("local-dir:PATH")`.

    Args:
        model: a timm model (any zoo backbone), as created by `timm.create_model`.
        path: the folder (created if needed).
        label_names: class names in classifier order, stored in `config.json`.
        description: first paragraph of the model card.
        metrics: figures for the model card (e.g. {'val top-1': 97.5}).
        data_config: the eval transform the weights were evaluated with, when it is not the model's cfg's
            (timm's keys: input_size, crop_pct, interpolation, mean, std).

    Returns:
        The folder.
    """
    path = Path(path)
    img_size = tuple(getattr(model, "img_size", ()) or ())
    if data_config is None and img_size and img_size != tuple(model.pretrained_cfg["input_size"][1:]):
        # A model set to another size (img_size=, set_input_size) is evaluated at that size.
        data_config = {"input_size": (model.pretrained_cfg["input_size"][0], *img_size)}
    model_config = {"label_names": list(label_names)} if label_names else None
    save_for_hf(model, str(path), model_config=model_config, safe_serialization=True, data_config=data_config)
    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    (path / "README.md").write_text(generate_readme(model_card(model, description, metrics), name))
    return path
