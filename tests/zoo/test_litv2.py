"""LITv2: sizes against the official definitions, official checkpoint layout, input sizes."""

from __future__ import annotations

import argparse
import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from zoo.blocks.hilo import HiLoAttention

import zoo  # noqa: F401
from tests._subprocess import describe, run_python
from zoo.models.litv2 import DeformableTokenMerging, register_deform_conv_flops

# size: (embed_dim, depths, heads, parameters of the official model definition, paper GFLOPs at 224).
# Parameter counts from ziplab/LITv2 classification/models/litv2.py with configs/litv2-{small,medium,base}.yaml.
SIZES = {
    "s": (96, (2, 2, 6, 2), (3, 6, 12, 24), 27_844_000, 3.7),
    "m": (96, (2, 2, 18, 2), (3, 6, 12, 24), 48_830_368, 7.5),
    "b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 86_520_704, 13.2),
}
ALPHA, LOCAL_WS, HAS_MSA = 0.9, (0, 0, 2, 1), (0, 0, 1, 1)


def official_litv2_shapes(size: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official LITv2 state dict, from reading the official `LITv2` and its configs."""
    embed, depths, heads, _, _ = SIZES[size]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(prefix: str, out_features: int, in_features: int) -> None:
        shapes[prefix + "weight"], shapes[prefix + "bias"] = (out_features, in_features), (out_features,)

    def norm(prefix: str, dim: int) -> None:
        shapes[prefix + "weight"], shapes[prefix + "bias"] = (dim,), (dim,)

    shapes["patch_embed.proj.weight"], shapes["patch_embed.proj.bias"] = (embed, 3, 4, 4), (embed,)
    norm("patch_embed.norm.", embed)
    for i, depth in enumerate(depths):
        dim = embed * 2**i
        head_dim = dim // heads[i]
        lo_heads = heads[i] if LOCAL_WS[i] == 1 else int(heads[i] * ALPHA)
        lo, hi = lo_heads * head_dim, dim - lo_heads * head_dim
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            if HAS_MSA[i]:
                norm(p + "norm1.", dim)
                linear(p + "attn.l_q.", lo, dim)
                linear(p + "attn.l_kv.", 2 * lo, dim)
                linear(p + "attn.l_proj.", lo, lo)
                if hi:
                    linear(p + "attn.h_qkv.", 3 * hi, dim)
                    linear(p + "attn.h_proj.", hi, hi)
            norm(p + "norm2.", dim)
            linear(p + "mlp.fc1.", 4 * dim, dim)
            shapes[p + "mlp.dwconv.dwconv.weight"], shapes[p + "mlp.dwconv.dwconv.bias"] = (
                (4 * dim, 1, 3, 3),
                (4 * dim,),
            )
            linear(p + "mlp.fc2.", dim, 4 * dim)
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            shapes[p + "dconv.weight"], shapes[p + "dconv.bias"] = (2 * dim, dim, 2, 2), (2 * dim,)
            shapes[p + "dconv.conv_offset.weight"], shapes[p + "dconv.conv_offset.bias"] = (8, dim, 2, 2), (8,)
            for n in ("weight", "bias", "running_mean", "running_var"):
                shapes[p + "norm_layer." + n] = (2 * dim,)
            shapes[p + "norm_layer.num_batches_tracked"] = ()
    norm("norm.", embed * 8)
    linear("head.", num_classes, embed * 8)
    return shapes


@pytest.fixture(scope="module")
def model():
    """One randomly initialised zoo_litv2_s, shared by the tests that only run it."""
    torch.manual_seed(0)
    return timm.create_model("zoo_litv2_s").eval()


def _on_meta(**kwargs) -> torch.nn.Module:
    # checkpoint_filter_fn only reads the model's key names and shapes.
    with torch.device("meta"):
        return timm.create_model("zoo_litv2_s", **kwargs)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_parameters_equal_official_and_gflops_match_paper(size):
    _, _, _, params, paper_gflops = SIZES[size]
    register_deform_conv_flops()
    with torch.device("meta"):
        model = timm.create_model(f"zoo_litv2_{size}").eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == params
    official = official_litv2_shapes(size)
    assert params == sum(torch.Size(s).numel() for k, s in official.items() if "running" not in k and s)
    gmacs = counter.get_total_flops() / 2e9  # multiply-adds, what the paper calls FLOPs
    # The deformable token merging is counted (torch has no formula for torchvision's op: registered above).
    assert counter.get_flop_counts()["Global"][torch.ops.torchvision.deform_conv2d] > 0
    assert abs(gmacs / paper_gflops - 1) < 0.05


def test_stages_follow_official_configuration(model):
    assert [stage.downsample is None for stage in model.stages] == [True, False, False, False]
    assert all(isinstance(s.downsample, DeformableTokenMerging) for s in model.stages[1:])
    attn = [[b.attn for b in stage.blocks] for stage in model.stages]
    assert attn[0] == [None, None] and attn[1] == [None, None]
    assert all(isinstance(a, HiLoAttention) and (a.window_size, a.lo_heads, a.hi_heads) == (2, 10, 2) for a in attn[2])
    assert all((a.window_size, a.lo_heads, a.hi_heads) == (1, 24, 0) for a in attn[3])


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    """A LITv2-S file laid out as the authors' trainer saves it: {'model': ..., 'optimizer': ..., ...}."""
    torch.manual_seed(0)
    sd = {k: torch.randn(s) if s else torch.tensor(7) for k, s in official_litv2_shapes("s").items()}
    path = tmp_path_factory.mktemp("ckpt") / "litv2_s.pth"
    torch.save(
        {
            "model": sd,
            "optimizer": {"state": {}},
            "lr_scheduler": {},
            "max_accuracy": 82.0,
            "epoch": 299,
            "config": argparse.Namespace(MODEL="litv2_small"),
        },
        path,
    )
    return sd, path


def test_release_file_loads_strictly_into_mapped_keys(release_file):
    sd, path = release_file
    model = timm.create_model("zoo_litv2_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    assert len(ours) == len(sd)
    mapping = {
        "patch_embed.proj.weight": "stem.conv.weight",
        "patch_embed.norm.bias": "stem.norm.bias",
        "layers.0.blocks.1.mlp.dwconv.dwconv.weight": "stages.0.blocks.1.mlp.dwconv.weight",
        "layers.0.downsample.dconv.weight": "stages.1.downsample.weight",
        "layers.1.downsample.dconv.conv_offset.weight": "stages.2.downsample.offset.weight",
        "layers.2.downsample.norm_layer.running_var": "stages.3.downsample.norm.running_var",
        "layers.2.blocks.5.attn.h_qkv.weight": "stages.2.blocks.5.attn.hi_qkv.weight",
        "layers.2.blocks.0.attn.l_kv.bias": "stages.2.blocks.0.attn.lo_kv.bias",
        "layers.3.blocks.1.attn.l_proj.weight": "stages.3.blocks.1.attn.lo_proj.weight",
        "layers.3.blocks.0.norm1.weight": "stages.3.blocks.0.norm1.weight",
        "norm.weight": "norm.weight",
        "head.bias": "head.fc.bias",
    }
    for official, mine in mapping.items():
        assert torch.equal(ours[mine], sd[official]), (official, mine)


def test_checkpoint_mismatches_are_named(release_file):
    from zoo.models.litv2 import checkpoint_filter_fn

    sd, _ = release_file
    model = _on_meta()
    missing = {k: v for k, v in sd.items() if k != "layers.1.downsample.dconv.conv_offset.bias"}
    with pytest.raises(KeyError, match=r"stages\.2\.downsample\.offset\.bias"):
        checkpoint_filter_fn(missing, model)
    with pytest.raises(KeyError, match=r"stages\.9\.blocks\.0\.attn\.lo_q\.weight"):
        checkpoint_filter_fn(dict(sd, **{"layers.9.blocks.0.attn.l_q.weight": torch.zeros(3)}), model)
    with pytest.raises(ValueError, match=r"stages\.2\.blocks\.0\.attn\.lo_q\.weight"):
        checkpoint_filter_fn(dict(sd, **{"layers.2.blocks.0.attn.l_q.weight": torch.zeros(3, 3)}), model)
    # A LITv2-M checkpoint does not fit LITv2-S.
    with pytest.raises(KeyError, match=r"stages\.2\.blocks\.6"):
        checkpoint_filter_fn({k: torch.zeros(s) for k, s in official_litv2_shapes("m").items()}, model)


@pytest.mark.parametrize(
    "shape, heights",
    [((1, 3, 97, 130), [(25, 33), (12, 16), (6, 8), (3, 4)]), ((2, 3, 120, 36), [(30, 9), (15, 4), (7, 2), (3, 1)])],
)
def test_other_input_sizes(model, shape, heights):
    """Padding to whole patches, floor-halving token merging, HiLo windows padded where the map is odd."""
    x = torch.randn(*shape)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        logits = model.forward_head(final)
    assert [tuple(f.shape[2:]) for f in feats] == heights
    assert logits.shape == (shape[0], 1000) and torch.isfinite(logits).all()


def test_too_small_input_raises(model):
    with pytest.raises(ValueError, match=r"H, W >= 32, got \(1, 3, 64, 28\)"):
        model(torch.randn(1, 3, 64, 28))


def test_logits_equal_the_official_attention_path(model):
    # The anchor recomputes every attention module the way the official code does (its layout, reshapes and
    # explicit softmax; tests/anchors/cswin_litv2_official.py), on the same weights.
    from tests.anchors.cswin_litv2_official import swap_official_attention

    anchor = swap_official_attention(copy.deepcopy(model))
    assert sum(type(m).__name__.startswith("Official") for m in anchor.modules()) > 0
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, official = model(x), anchor(x)
    assert ((ours - official).abs().max() / official.abs().max()).item() <= 1e-5


def test_importing_changes_no_flop_formula_and_the_explicit_call_counts_token_merging():
    # DESIGN.md: importing a module changes no global state. torch's flop registry is global: the formula for
    # torchvision's deformable conv is registered by `register_deform_conv_flops()`, where FLOPs are counted.
    proc = run_python(
        """
        import pkgutil, importlib
        import torch
        from torch.utils.flop_counter import FlopCounterMode, flop_registry

        before = dict(flop_registry)
        import zoo, zoo.blocks, zoo.kernels, zoo.models.litv2
        for module in pkgutil.iter_modules(zoo.blocks.__path__):
            importlib.import_module(f"zoo.blocks.{module.name}")
        assert dict(flop_registry) == before, sorted(map(str, set(flop_registry) - set(before)))

        merging = zoo.models.litv2.DeformableTokenMerging(8, 16).eval()
        x = torch.randn(1, 8, 8, 8)
        with FlopCounterMode(display=False) as counter:
            merging(x)
        assert torch.ops.torchvision.deform_conv2d not in counter.get_flop_counts()["Global"]
        zoo.models.litv2.register_deform_conv_flops()
        zoo.models.litv2.register_deform_conv_flops()  # a second call changes nothing
        with FlopCounterMode(display=False) as counter:
            merging(x)
        # As a plain 2x2 stride-2 conv, 8 -> 16 channels, on a 4 x 4 output: 2 * 16 * 8 * 4 * 16 = 16384.
        print(counter.get_flop_counts()["Global"][torch.ops.torchvision.deform_conv2d])
        """,
        timeout=120,
    )
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.split()[-1] == str(2 * 16 * 8 * 4 * 16)
