"""Exporting a zoo backbone (or any timm model) for deployment: `torch.export` and ONNX.

    model = timm.create_model("zoo_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=PATH)).eval()
    program = export_program(model)                     # torch.export.ExportedProgram at the cfg's input size
    export_onnx(model, "biformer_t.onnx")               # ONNX, checked against eager in onnxruntime

    python -m zoo.export zoo_biformer_t --file biformer_tiny_best.pth --out biformer_t.onnx

ONNX needs the `onnx` extra (`pip install -e ".[onnx]"`: onnx, onnxscript, onnxruntime). Both exporters trace the
model in eval mode at one input size (the model's `pretrained_cfg` input size unless given); the traced graph
takes inputs of that size. `torch.compile(model, fullgraph=True)` also captures every zoo family whole.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

__all__ = ["example_input", "export_onnx", "export_program"]


def example_input(model: nn.Module, img_size: int | tuple[int, int] | None = None, batch: int = 1) -> torch.Tensor:
    """A random (batch, C, H, W) input of the model's cfg input size (or img_size), on the model's device."""
    c, h, w = model.pretrained_cfg["input_size"]
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    return torch.randn(batch, getattr(model, "in_chans", c), h, w, device=device)


def export_program(
    model: nn.Module, img_size: int | tuple[int, int] | None = None, batch: int = 1
) -> torch.export.ExportedProgram:
    """`torch.export.export` of the model in eval mode on an input of the cfg's size (or img_size).

    Returns:
        The exported program; `program.module()(x)` runs it on x: (batch, C, H, W).
    """
    model.eval()
    return torch.export.export(model, (example_input(model, img_size, batch),))


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({err.name} is missing): pip install -e '.[onnx]'"
        ) from None
    return onnxruntime


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | tuple[int, int] | None = None,
    batch: int = 1,
    check: bool = True,
    atol: float = 1e-4,
) -> float | None:
    """Write the model as ONNX (torch's dynamo exporter) and, with check, compare onnxruntime with eager.

    Args:
        model: the model; put in eval mode.
        path: the `.onnx` file to write.
        img_size: input (H, W) or side; None for the cfg's input size.
        batch: batch size of the traced input.
        check: run the file in onnxruntime (CPU) on a random input and compare with the eager model.
        atol: largest absolute difference the check accepts.

    Returns:
        The largest absolute difference found by the check, or None without it.

    Raises:
        ImportError: naming the missing package when the onnx extra is not installed.
        ValueError: when onnxruntime's outputs differ from eager by more than atol.
    """
    onnxruntime = _require_onnx()
    model.eval()
    x = example_input(model, img_size, batch)
    path = os.fspath(path)
    torch.onnx.export(model, (x,), path, dynamo=True, input_names=["pixel_values"], output_names=["logits"])
    if not check:
        return None
    with torch.no_grad():
        expected = model(x).float().cpu().numpy()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixel_values": x.float().cpu().numpy()})
    diff = float(abs(got - expected).max())
    if not diff <= atol:
        raise ValueError(f"{path}: onnxruntime differs from eager by {diff:.3g} (allowed {atol:g})")
    return diff


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a timm/zoo model to ONNX (checked) or a torch.export .pt2")
    parser.add_argument("model", help="timm model name (zoo_* after `import zoo`) or local-dir:PATH")
    parser.add_argument("--file", help="weight file to load (pretrained_cfg_overlay file)")
    parser.add_argument("--num-classes", type=int, help="classifier outputs (default: the cfg's or the file's)")
    parser.add_argument("--img-size", type=int, help="input side (default: the cfg's input size)")
    parser.add_argument("--out", required=True, help="output path: .onnx for ONNX, .pt2 for torch.export")
    args = parser.parse_args(argv)

    import timm

    import zoo  # noqa: F401  (registers the zoo_* models)

    kwargs = {}
    if args.file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=args.file))
    elif args.model.startswith("local-dir:"):
        kwargs.update(pretrained=True)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    model = timm.create_model(args.model, **kwargs).eval()
    if args.out.endswith(".pt2"):
        torch.export.save(export_program(model, args.img_size), args.out)
        print(f"wrote {args.out}")
    else:
        diff = export_onnx(model, args.out, args.img_size)
        print(f"wrote {args.out}; onnxruntime vs eager: max abs difference {diff:.3g}")


if __name__ == "__main__":
    main()
