"""MaxViT: sizes, timm's and the official checkpoints, numerics against timm and the official computation,
input sizes, refused checkpoints."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import zoo  # noqa: F401
from tests.blocks.test_multi_axis import _official_reindexed_bias
from zoo.models.maxvit import checkpoint_filter_fn

# Parameters of timm's ports of the official weights (M) and the paper's GFLOPs at 224 (Table 1).
SIZES = {
    "t": ("maxvit_tiny_tf_224", 30.917, 5.6),
    "s": ("maxvit_small_tf_224", 68.928, 11.7),
    "b": ("maxvit_base_tf_224", 119.468, 23.4),
    "l": ("maxvit_large_tf_224", 211.786, 43.9),
}
FIXTURE = Path(__file__).parent / "fixtures" / "maxvit_t_official_variables.json"
EMA = "/ExponentialMovingAverage"


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("size", list(SIZES))
def test_parameters_equal_official_and_gflops_match_paper(size):
    timm_name, params_m, paper_gflops = SIZES[size]
    with torch.device("meta"):
        model = timm.create_model(f"zoo_maxvit_{size}").eval()
        reference = timm.create_model(timm_name)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(p.numel() for p in reference.parameters())
    assert round(params / 1e6, 3) == params_m
    assert abs(counter.get_total_flops() / 2e9 / paper_gflops - 1) < 0.05  # multiply-adds, the paper's "FLOPs"


def test_parameters_equal_the_official_variables():
    shapes = json.loads(FIXTURE.read_text())["variables"]
    with torch.device("meta"):
        model = timm.create_model("zoo_maxvit_t")
    official = sum(math.prod(s) for k, s in shapes.items() if "moving_" not in k)
    assert sum(p.numel() for p in model.parameters()) == official


# --- timm's checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_tiny(tmp_path_factory):
    """timm's maxvit_tiny_tf_224 with random weights and BatchNorm statistics, and its state dict on disk."""
    torch.manual_seed(0)
    model = timm.create_model("maxvit_tiny_tf_224", pretrained=False).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.normal_(1, 0.2)
        bn.bias.data.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("timm") / "maxvit_tiny_tf_224.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def zoo_from_timm(timm_tiny):
    _, path = timm_tiny
    return timm.create_model("zoo_maxvit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()


def test_timm_checkpoint_reproduces_timm_logits_and_features(timm_tiny, zoo_from_timm):
    reference, model = timm_tiny[0], zoo_from_timm
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        final, ours = model.forward_intermediates(x)
        final_ref, theirs = reference.forward_intermediates(x)
        assert _rel_err(model.forward_head(final), reference.forward_head(final_ref)) <= 1e-5
    theirs = theirs[1:]  # timm's index 0 is the stem
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert _rel_err(a, b) <= 1e-5


def test_training_gradients_match_timm(timm_tiny, zoo_from_timm):
    """Train mode (batch statistics, the autograd attention path) on stage 1: two blocks, one strided."""
    ours, theirs = zoo_from_timm.stages[1].train(), timm_tiny[0].stages[1].train()
    try:
        x = torch.randn(2, 64, 28, 28)
        out_ref = theirs(x)
        out = ours(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert _rel_err(out, out_ref) <= 1e-5
        g = torch.randn_like(out)
        names = [n for n, _ in theirs.named_parameters()]
        grads_ref = torch.autograd.grad(out_ref, list(theirs.parameters()), g)
        grads = torch.autograd.grad(out, [ours.get_parameter(n) for n in names], g)
    finally:  # shared fixtures; their BatchNorm statistics moved, which the later tests do not rely on
        ours.eval(), theirs.eval()
    assert [n for n, _ in ours.named_parameters()] == names
    # Relative to the largest gradient: in train mode a bias before a BatchNorm has a gradient that is
    # zero up to rounding, so per-tensor relative errors would measure noise.
    scale = max(r.abs().max() for r in grads_ref)
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        assert (grad - grad_ref).abs().max() <= 1e-5 * scale, name


def test_timm_safetensors_and_new_classifier(timm_tiny, tmp_path):
    reference, _ = timm_tiny
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    model = timm.create_model(
        "zoo_maxvit_t",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")),
        num_classes=10,
    )
    assert model.get_classifier().out_features == 10
    torch.testing.assert_close(model.stem.conv1.weight, reference.stem.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.head.pre_logits.fc.weight, reference.head.pre_logits.fc.weight, rtol=0, atol=0)


# --- the official (TensorFlow) checkpoints -------------------------------------------------------------


@functools.cache
def _official_variables() -> dict[str, np.ndarray]:
    """Random values for every variable of the official MaxViT-T graph (names and shapes from the fixture)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in json.loads(FIXTURE.read_text())["variables"].items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "gamma":
            value = 1 + 0.2 * rng.standard_normal(shape)
        elif leaf in ("beta", "bias", "moving_mean"):
            value = 0.2 * rng.standard_normal(shape)
        elif leaf == "relative_bias":
            value = 0.5 * rng.standard_normal(shape)
        else:  # kernels: fan-in scaled so that activations keep their size through 11 blocks
            if leaf == "depthwise_kernel":
                fan_in = shape[0] * shape[1]
            elif name.rsplit("/", 2)[1] in ("q", "k", "v"):  # (C, heads, head_dim)
                fan_in = shape[0]
            else:
                fan_in = math.prod(shape[:-1])
            value = rng.standard_normal(shape) / math.sqrt(fan_in)
        out[name] = value.astype(np.float32)
    return out


def _release_file(variables: dict[str, np.ndarray], path: Path) -> Path:
    """What a release checkpoint holds: the EMA weights (what the authors evaluate) under
    `<name>/ExponentialMovingAverage`, the training weights under `<name>` (here, to keep the file small,
    only the stem's and the first block's, with other values), the global step and optimizer slots."""
    rng = np.random.default_rng(1)
    archive = {name + EMA: value for name, value in variables.items()}
    archive.update(
        {
            n: rng.standard_normal(v.shape).astype(np.float32)
            for n, v in variables.items()
            if "stem/" in n or "block_00_00/" in n
        }
    )
    archive["global_step"] = np.array(300_000)
    archive["maxvit/block_00_00/mbconv/expand_conv/kernel/Adam"] = np.zeros((1, 1, 64, 256), np.float32)
    np.savez(path, **archive)
    return path


def _official_forward(tf: dict[str, torch.Tensor], images: torch.Tensor, depths=(2, 2, 5, 2)) -> torch.Tensor:
    """The official MaxViT computation (maxvit/models/maxvit.py), written with TF's layouts and ops on NHWC maps."""

    def pads(n: int, k: int, s: int) -> tuple[int, int]:
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2

    def conv(x, kernel, bias=None, stride=1, depthwise=False):  # tf.nn.conv2d / depthwise_conv2d, 'SAME'
        (top, bottom), (left, right) = (
            pads(x.shape[1], kernel.shape[0], stride),
            pads(x.shape[2], kernel.shape[1], stride),
        )
        weight = kernel.permute(2, 3, 0, 1) if depthwise else kernel.permute(3, 2, 0, 1)
        out = F.conv2d(
            F.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom)),
            weight,
            bias,
            stride,
            groups=x.shape[-1] if depthwise else 1,
        )
        return out.permute(0, 2, 3, 1)

    def pool(x):  # AveragePooling2D(2, 2, 'same'): the mean of the in-bounds pixels
        pad = (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2)
        total = F.pad(x, pad).unflatten(1, (-1, 2)).unflatten(3, (-1, 2)).sum((2, 4))
        count = F.pad(torch.ones_like(x[..., :1]), pad).unflatten(1, (-1, 2)).unflatten(3, (-1, 2)).sum((2, 4))
        return total / count

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def bn(x, p):
        return (x - tf[f"{p}/moving_mean"]) / torch.sqrt(tf[f"{p}/moving_variance"] + 1e-3) * tf[f"{p}/gamma"] + tf[
            f"{p}/beta"
        ]

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], tf[f"{p}/gamma"], tf[f"{p}/beta"], 1e-5)

    def dense(x, p):  # TrailDense over the last axis
        return torch.einsum("...i,io->...o", x, tf[f"{p}/weight"]) + tf[f"{p}/bias"]

    def conv1x1(x, p):
        return torch.einsum("bhwi,io->bhwo", x, tf[f"{p}/kernel"][0, 0]) + tf.get(f"{p}/bias", 0)

    def mbconv(x, p, stride):
        shortcut = pool(x) if stride == 2 else x
        if f"{p}/shortcut_conv/kernel" in tf:
            shortcut = conv1x1(shortcut, f"{p}/shortcut_conv")
        y = bn(x, f"{p}/pre_norm")
        y = gelu(bn(conv1x1(y, f"{p}/expand_conv"), f"{p}/expand_norm"))
        y = conv(y, tf[f"{p}/depthwise_conv/depthwise_kernel"], stride=stride, depthwise=True)
        y = gelu(bn(y, f"{p}/depthwise_norm"))
        se = conv1x1(F.silu(conv1x1(y.mean((1, 2), keepdim=True), f"{p}/se/reduce_conv2d")), f"{p}/se/expand_conv2d")
        return shortcut + conv1x1(torch.sigmoid(se) * y, f"{p}/shrink_conv")

    def attention(x, p, grid, size=7):
        b, h, w, c = x.shape
        if grid:
            x = x.reshape(b, size, h // size, size, w // size, c).permute(0, 2, 4, 1, 3, 5)
        else:
            x = x.reshape(b, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, size * size, c)
        q, k, v = (torch.einsum("bnc,chd->bnhd", x, tf[f"{p}/{n}/weight"]) + tf[f"{p}/{n}/bias"] for n in "qkv")
        q = q * q.shape[-1] ** -0.5
        logits = torch.einsum("bshd,bthd->bhst", q, k) + _official_reindexed_bias(tf[f"{p}/relative_bias"])
        out = torch.einsum("bhst,bthd->bshd", logits.softmax(-1), v)
        out = torch.einsum("bshd,hdc->bsc", out, tf[f"{p}/o/weight"]) + tf[f"{p}/o/bias"]
        if grid:
            out = out.reshape(b, h // size, w // size, size, size, c).permute(0, 3, 1, 4, 2, 5)
        else:
            out = out.reshape(b, h // size, w // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, c)

    def ffn(x, p):
        return dense(gelu(dense(x, f"{p}/expand_dense")), f"{p}/shrink_dense")

    x = images.permute(0, 2, 3, 1)
    x = gelu(bn(conv(x, tf["maxvit/stem/conv_0/kernel"], tf["maxvit/stem/conv_0/bias"], 2), "maxvit/stem/norm_0"))
    x = conv(x, tf["maxvit/stem/conv_1/kernel"], tf["maxvit/stem/conv_1/bias"])
    for s, depth in enumerate(depths):
        for j in range(depth):
            p = f"maxvit/block_{s:02d}_{j:02d}"
            x = mbconv(x, f"{p}/mbconv", 2 if j == 0 else 1)
            x = x + attention(ln(x, f"{p}/attn_layer_norm"), f"{p}/attention", grid=False)
            x = x + ffn(ln(x, f"{p}/ffn_layer_norm"), f"{p}/ffn")
            x = x + attention(ln(x, f"{p}/attn_layer_norm_1"), f"{p}/attention_1", grid=True)
            x = x + ffn(ln(x, f"{p}/ffn_layer_norm_1"), f"{p}/ffn_1")
    x = ln(x.mean((1, 2)), "maxvit/final_layer_norm")
    return dense(torch.tanh(dense(x, "maxvit/cls_head/inner_dense")), "maxvit/cls_head/logit_dense")


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    variables = _official_variables()
    return variables, _release_file(variables, tmp_path_factory.mktemp("official") / "maxvit_t.npz")


def test_official_release_reproduces_official_logits(official_tiny):
    variables, path = official_tiny
    model = timm.create_model("zoo_maxvit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = _official_forward({k: torch.from_numpy(v) for k, v in variables.items()}, x)
        assert _rel_err(model(x), expected) <= 1e-5


def test_official_variables_load_from_safetensors_too(official_tiny, tmp_path):
    variables, _ = official_tiny
    tensors = {k: torch.from_numpy(v) for k, v in variables.items()}
    save_file(tensors, tmp_path / "maxvit_t.safetensors")
    model = timm.create_model(
        "zoo_maxvit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "maxvit_t.safetensors"))
    )
    expected = checkpoint_filter_fn(tensors, model)
    assert expected["stages.0.blocks.0.attn_grid.attn.qkv.weight"].shape == (192, 64)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def _load(name: str, state_dict: dict):
    # On the meta device, from memory: the tensors are converted (and refused) without materialising a model.
    with torch.device("meta"):
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict))


def test_official_missing_and_left_over_variables_are_named():
    variables = {k: torch.from_numpy(v) for k, v in _official_variables().items()}
    missing = {k: v for k, v in variables.items() if k != "maxvit/block_02_03/attention_1/k/weight"}
    with pytest.raises(KeyError, match=r"missing variables \['maxvit/block_02_03/attention_1/\{q,k,v\}/weight'\]"):
        _load("zoo_maxvit_t", missing)
    extra = dict(variables, **{"maxvit/block_03_02/mbconv/shrink_conv/kernel": torch.zeros(1, 1, 2048, 512)})
    with pytest.raises(KeyError, match=r"unexpected variables \['maxvit/block_03_02/mbconv/shrink_conv/kernel'\]"):
        _load("zoo_maxvit_t", extra)


# --- refused checkpoints and input sizes --------------------------------------------------------------


def _zeros_like_model(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model(name).state_dict().items()}
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_checkpoint_of_another_size_or_family_is_refused(timm_tiny):
    timm_t = timm_tiny[0].state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['stages\.0\.blocks\.0\.conv\.shortcut\.expand\.weight'"):
        _load("zoo_maxvit_s", timm_t)
    # timm's 384 x 384 fine-tune has the same keys and 12 x 12 windows: its 23 x 23 relative-bias tables are
    # resized to the model's 13 x 13 as timm resizes them (tests/zoo/test_resolutions.py checks the values).
    table = "stages.0.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table"
    assert _load("zoo_maxvit_t", _zeros_like_model("maxvit_tiny_tf_384")).state_dict()[table].shape == (2, 13, 13)
    official_t = {k: torch.from_numpy(v) for k, v in _official_variables().items()}
    with pytest.raises(KeyError, match=r"missing variables \['maxvit/block_00_00/mbconv/shortcut_conv/kernel'"):
        _load("zoo_maxvit_s", official_t)
    with pytest.raises(KeyError, match=r"missing keys \['stem\.conv1\.weight', .*unexpected keys \['stem\.0\.weight'"):
        _load("zoo_maxvit_t", _zeros_like_model("zoo_biformer_t"))


def test_odd_sizes_work_by_padding():
    """Stage maps that are not multiples of the 7 x 7 window/grid (here 50x82 ... 7x11) are padded and masked;
    the official model, and timm's port, need every stage map to divide by 7 (inputs a multiple of 224)."""
    model = timm.create_model("zoo_maxvit_t").eval()
    x = torch.randn(1, 3, 200, 328)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert [tuple(f.shape[-2:]) for f in feats] == [(50, 82), (25, 41), (13, 21), (7, 11)]
    with pytest.raises(ValueError, match=r"H, W >= 32, got \(1, 3, 31, 64\)"):
        model(torch.randn(1, 3, 31, 64))
