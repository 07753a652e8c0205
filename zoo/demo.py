"""The zoo at a glance: build every registered model, print the model table, classify a digit.

Runs offline on scikit-learn's digits. The classifier is freshly created (random weights), so its
answer is a demonstration of the interface, not of accuracy: train it with the recipes for that.

    python -m zoo.demo
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import zoo  # noqa: F401  (registers the zoo_* models)
from zoo.models.litv2 import register_deform_conv_flops


def model_table(names: list[str]) -> list[dict]:
    """Parameters and multiply-adds at the default input size, counted on the meta device (no memory, no weights)."""
    register_deform_conv_flops()  # LITv2's deformable token merging, which torch's counter would count as free
    rows = []
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name).eval()
            c, h, w = model.pretrained_cfg["input_size"]
            with FlopCounterMode(display=False) as counter:
                model(torch.empty(1, c, h, w))
        notes = model.pretrained_cfg.get("notes") or ("",)
        rows.append(
            dict(
                name=name,
                params=sum(p.numel() for p in model.parameters()) / 1e6,
                gmacs=counter.get_total_flops() / 2e9,
                size=h,
                paper=notes[0],
            )
        )
    return rows


def classify_digit(name: str, index: int) -> tuple[int, int, float]:
    """Classify digit `index` of scikit-learn's digits with a freshly created 10-class model."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    image = torch.tensor(digits.images[index], dtype=torch.float32) / 16.0  # 8x8, values 0..16
    image = F.interpolate(image[None, None], size=(64, 64), mode="bilinear", align_corners=False).expand(1, 3, -1, -1)
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        probs = model(image).softmax(-1)[0]
    return int(digits.target[index]), int(probs.argmax()), float(probs.max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="zoo_*", help="timm name filter of the models to list")
    parser.add_argument("--classifier", default="zoo_biformer_t", help="model used to classify a digit")
    parser.add_argument("--digit-index", type=int, default=0, help="which scikit-learn digit to classify")
    args = parser.parse_args(argv)

    names = timm.list_models(args.models)
    if not names:
        parser.error(f"no registered model matches {args.models!r}")
    print(f"{'model':<24}{'params (M)':>12}{'GMACs':>10}  {'input':>6}  paper")
    for row in model_table(names):
        print(f"{row['name']:<24}{row['params']:>12.3f}{row['gmacs']:>10.2f}  {row['size']:>6}  {row['paper']}")
    label, predicted, confidence = classify_digit(args.classifier, args.digit_index)
    print(
        f"\n{args.classifier} (fresh weights, 10 classes) on scikit-learn digit #{args.digit_index}: "
        f"label {label}, predicted {predicted} (p={confidence:.2f}); train it with the recipes for a real answer."
    )


if __name__ == "__main__":
    main()
