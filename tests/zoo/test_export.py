"""Export: torch.export and ONNX (onnxruntime within 1e-4 of eager at 224), torch.compile(fullgraph=True),
TorchScript (the families timm's own ports script) and torch.fx feature extraction.

By default each family is represented by its smallest registered size with one block per stage (every layer
type of the family, a fraction of the time); `ZOO_EXHAUSTIVE=1` runs every registered model at full depth
(minutes per model on a CPU).
"""

from __future__ import annotations

import copy
import io
import os
import warnings

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


def _fx_features_match_the_getters(name: str) -> None:
    torch.manual_seed(0)
    getter = timm.create_model(name, depths=(1, 1, 1, 1), features_only=True).eval()
    torch.manual_seed(0)
    graph = timm.create_model(name, depths=(1, 1, 1, 1), features_only=True, feature_cls="fx").eval()
    assert type(graph).__name__ == "FeatureGraphNet"
    assert graph.feature_info.channels() == getter.feature_info.channels()
    assert graph.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = getter(x), graph(x)
    # The graph returns the stage outputs as the stages leave them and labels their layout (`output_fmt`), as
    # timm's fx features of its channels-last models do; the getter returns NCHW.
    if graph.output_fmt.name == "NHWC":
        got = [t.permute(0, 3, 1, 2) for t in got]
    assert len(got) == 4
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_fx_features_only_as_timm_builds_them(name):
    # timm.create_model(..., features_only=True, feature_cls="fx"): a FeatureGraphNet traced by
    # `create_feature_extractor` at the stage modules of `feature_info`.
    _fx_features_match_the_getters(name)


# TorchScript where timm's own port of the family scripts (timm 1.0.31: maxvit_tiny_tf_224, davit_tiny,
# focalnet_tiny_srf and _lrf pass `torch.jit.script`). The blocks take their plain path under scripting: the
# fused pointwise ops of `zoo.kernels.fused_pointwise` take modules, which TorchScript cannot pass to a function.
# BiFormer, CSWin and LITv2 have no timm port to be on par with, and are not scripted: BiFormer's routed attention
# calls the block-sparse op, whose backend dispatch (Triton, FlexAttention, environment switches) TorchScript cannot
# compile; CSWin's and LITv2's mixers would need the same TorchScript branches, which nothing asks of them yet.
SCRIPTED_FAMILIES = ("davit", "focalnet", "maxvit")
if EXHAUSTIVE:
    SCRIPTED = [n for n in MODELS if n.split("_")[1] in SCRIPTED_FAMILIES]
else:  # FocalNet's LRF (three levels) and its large models' post-norm and layer scale as well
    SCRIPTED = ["zoo_davit_t", "zoo_focalnet_l_fl3", "zoo_focalnet_t", "zoo_focalnet_t_srf", "zoo_maxvit_t"]


def _scripted(model: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # torch 2.14 deprecates TorchScript in favour of torch.export; it still runs.
        warnings.filterwarnings("ignore", r"`torch\.jit\.(script|save|load)` is deprecated", FutureWarning)
        scripted = torch.jit.script(model)
        # Saved and loaded: nothing in the program calls back into Python.
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


@pytest.mark.parametrize("name", SCRIPTED)
def test_torchscript_matches_eager(name):
    model = _model(name)
    scripted = _scripted(model)
    # 224 as timm's tests; 97 x 75 pads windows, grids and strided convs.
    for shape in ((2, 3, 224, 224), (1, 3, 97, 75)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SCRIPTED[:1] if not EXHAUSTIVE else [])
def test_torchscript_full_depth_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(_scripted(model)(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SCRIPTED)
def test_torchscript_trains_as_eager(name):
    model = _model(name).train()
    scripted = _scripted(copy.deepcopy(model))  # a script module shares its parameters with the module scripted
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    scripted(x).square().mean().backward()
    eager_grads = dict(model.named_parameters())
    for key, p in scripted.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_torchscript_rejects_bad_input():
    scripted = _scripted(_model("zoo_maxvit_t"))
    with pytest.raises(torch.jit.Error, match=r"expected input of shape \(B, 3, H, W\) with H, W >= 32"):
        scripted(torch.randn(1, 4, 64, 64))
    with pytest.raises(torch.jit.Error, match="expected floating-point images"):
        scripted(torch.zeros(1, 3, 64, 64, dtype=torch.long))
