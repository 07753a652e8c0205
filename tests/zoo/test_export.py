"""Export: torch.export and ONNX (onnxruntime within 1e-4 of eager at 224), torch.compile(fullgraph=True).

By default each family is represented by its smallest registered size with one block per stage (every layer
type of the family, a fraction of the time); `ZOO_EXHAUSTIVE=1` runs every registered model at full depth
(minutes per model on a CPU).
"""

from __future__ import annotations

import os

import pytest
import timm
import torch

import zoo  # noqa: F401
from zoo.export import export_onnx, export_program

EXHAUSTIVE = os.environ.get("ZOO_EXHAUSTIVE") == "1"


def _smallest_per_family() -> list[str]:
    best: dict[str, tuple[int, str]] = {}
    for name in timm.list_models("zoo_*"):
        with torch.device("meta"):
            count = sum(p.numel() for p in timm.create_model(name).parameters())
        family = name.split("_")[1]
        if family not in best or count < best[family][0]:
            best[family] = (count, name)
    return sorted(name for _, name in best.values())


MODELS = timm.list_models("zoo_*") if EXHAUSTIVE else _smallest_per_family()


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {} if EXHAUSTIVE else dict(depths=(1, 1, 1, 1))
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def test_every_family_is_covered():
    assert {n.split("_")[1] for n in MODELS} == {"biformer", "cswin", "davit", "focalnet", "litv2", "maxvit"}


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_matches_eager_at_224(name):
    model = _model(name)
    program = export_program(model, img_size=224)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x[:1])
    got = program.module()(x[:1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_runs_in_onnxruntime_within_1e4_of_eager(name, tmp_path):
    model = _model(name)
    diff = export_onnx(model, tmp_path / f"{name}.onnx", img_size=224)
    assert diff is not None and diff <= 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / f"{name}.onnx")).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, 10]


class _ExportsSomethingElse(torch.nn.Module):
    """Computes out + 1 while being exported and out in eager: a file that disagrees with its model."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.pretrained_cfg = inner, inner.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + 1 if torch.compiler.is_exporting() else out


def test_onnx_check_reports_a_mismatch(tmp_path):
    # The check itself, on a small stand-in model (a zoo model would only add export time).
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    tiny.pretrained_cfg = {"input_size": (3, 16, 16)}
    with pytest.raises(ValueError, match="onnxruntime differs from eager by 1"):
        export_onnx(_ExportsSomethingElse(tiny), tmp_path / "m.onnx")


@pytest.mark.parametrize("name", MODELS)
def test_compile_fullgraph_without_breaks(name):
    torch._dynamo.reset()
    model = _model(name)
    x = torch.randn(1, 3, 64, 64)
    # fullgraph=True raises on any graph break; the eager backend keeps the test to Dynamo's capture.
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_fx_feature_extraction_as_timms_tests_do(name):
    # timm's tests/test_models.py traces with create_feature_extractor on the last graph node, eval and train;
    # the zoo's blocks are registered fx leaves (their fused-kernel dispatch is not symbolically traceable).
    from timm.models import create_feature_extractor, get_graph_node_names

    model = _model(name)
    train_nodes, eval_nodes = get_graph_node_names(model)
    traced = create_feature_extractor(model, return_nodes=[eval_nodes[-1]]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x)[eval_nodes[-1]], model(x), rtol=0, atol=0)
    traced = create_feature_extractor(model.train(), return_nodes=[train_nodes[-1]]).train()
    traced(x)[train_nodes[-1]].mean().backward()
    trainable = [p for p in traced.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
