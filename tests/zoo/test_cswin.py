"""CSWin: sizes against the official definitions, official checkpoint layout, input sizes."""

from __future__ import annotations

import argparse
import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from zoo.blocks.cross_shaped import CrossShapedWindowAttention

import zoo  # noqa: F401

# size: (embed_dim, depths, heads, parameters of the official model definition, paper GFLOPs at 224).
# Parameter counts from microsoft/CSWin-Transformer models/cswin.py (CSWin_64_12211_tiny_224, ...).
SIZES = {
    "t": (64, (1, 2, 21, 1), (2, 4, 8, 16), 22_320_552, 4.3),
    "s": (64, (2, 4, 32, 2), (2, 4, 8, 16), 34_643_304, 6.9),
    "b": (96, (2, 4, 32, 2), (4, 8, 16, 32), 77_382_184, 15.0),
    "l": (144, (2, 4, 32, 2), (6, 12, 24, 24), 173_262_664, 31.5),
}


def official_cswin_shapes(size: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official CSWin state dict, from reading the official `CSWinTransformer`."""
    embed, depths, _, _, _ = SIZES[size]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(prefix: str, out_features: int, in_features: int) -> None:
        shapes[prefix + "weight"], shapes[prefix + "bias"] = (out_features, in_features), (out_features,)

    def norm(prefix: str, dim: int) -> None:
        shapes[prefix + "weight"], shapes[prefix + "bias"] = (dim,), (dim,)

    shapes["stage1_conv_embed.0.weight"], shapes["stage1_conv_embed.0.bias"] = (embed, 3, 7, 7), (embed,)
    norm("stage1_conv_embed.2.", embed)
    for s, depth in enumerate(depths, start=1):
        dim = embed * 2 ** (s - 1)
        if s > 1:
            shapes[f"merge{s - 1}.conv.weight"], shapes[f"merge{s - 1}.conv.bias"] = (dim, dim // 2, 3, 3), (dim,)
            norm(f"merge{s - 1}.norm.", dim)
        branches = 1 if s == len(depths) else 2
        for j in range(depth):
            p = f"stage{s}.{j}."
            linear(p + "qkv.", 3 * dim, dim)
            norm(p + "norm1.", dim)
            linear(p + "proj.", dim, dim)
            for i in range(branches):
                shapes[f"{p}attns.{i}.get_v.weight"] = (dim // branches, 1, 3, 3)
                shapes[f"{p}attns.{i}.get_v.bias"] = (dim // branches,)
            linear(p + "mlp.fc1.", 4 * dim, dim)
            linear(p + "mlp.fc2.", dim, 4 * dim)
            norm(p + "norm2.", dim)
    norm("norm.", embed * 8)
    linear("head.", num_classes, embed * 8)
    return shapes


@pytest.fixture(scope="module")
def model():
    """One randomly initialised zoo_cswin_t, shared by the tests that only run it."""
    torch.manual_seed(0)
    return timm.create_model("zoo_cswin_t").eval()


def _on_meta(**kwargs) -> torch.nn.Module:
    # checkpoint_filter_fn only reads the model's key names and shapes.
    with torch.device("meta"):
        return timm.create_model("zoo_cswin_t", **kwargs)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_parameters_equal_official_and_gflops_match_paper(size):
    embed, _, _, params, paper_gflops = SIZES[size]
    with torch.device("meta"):
        model = timm.create_model(f"zoo_cswin_{size}").eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == params
    assert params == sum(torch.Size(s).numel() for s in official_cswin_shapes(size).values())
    gmacs = counter.get_total_flops() / 2e9  # multiply-adds, what the paper calls FLOPs
    # CSWin-L is CSWin-B at 1.5x the width (same head width), so any consistent count gives it about
    # 2.2x B's; the paper's 31.5 G is 2.1x its own 15.0 G for B. We count 33.1 G (+5.2%), B within 0.3%.
    tolerance = 0.06 if size == "l" else 0.05
    assert abs(gmacs / paper_gflops - 1) < tolerance


def test_stages_follow_official_configuration(model):
    mixers = [[b.attn for b in stage.blocks] for stage in model.stages]
    assert [len(m) for m in mixers] == [1, 2, 21, 1]
    for stage, split, heads in zip(mixers[:3], (1, 2, 7), (2, 4, 8), strict=True):
        assert all(isinstance(m, CrossShapedWindowAttention) for m in stage)
        assert all(not m.full_attention and m.split_size == split and m.num_heads == heads for m in stage)
    assert all(m.full_attention and len(m.lepe) == 1 for m in mixers[3])


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    """A CSWin-T file laid out as the authors' timm trainer saves it: weights and EMA weights plus extras."""
    torch.manual_seed(0)
    ema = {k: torch.randn(s) for k, s in official_cswin_shapes("t").items()}
    path = tmp_path_factory.mktemp("ckpt") / "cswin_tiny_224.pth"
    torch.save(
        {
            # The non-EMA weights, all zero (stored as one element each to keep the file small).
            "state_dict": {k: torch.zeros(()).expand(v.shape) for k, v in ema.items()},
            "state_dict_ema": ema,
            "optimizer": {"state": {}},
            "epoch": 299,
            "arch": "CSWin_64_12211_tiny_224",
            "args": argparse.Namespace(lr=2e-3, model_ema=True),
        },
        path,
    )
    return ema, path


def test_release_file_loads_strictly_into_mapped_keys(release_file):
    ema, path = release_file
    model = timm.create_model("zoo_cswin_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    mapping = {
        "stage1_conv_embed.0.weight": "stem.conv.weight",
        "stage1_conv_embed.2.bias": "stem.norm.bias",
        "merge1.conv.weight": "stages.1.downsample.conv.weight",
        "merge3.norm.weight": "stages.3.downsample.norm.weight",
        "stage1.0.qkv.weight": "stages.0.blocks.0.attn.qkv.weight",
        "stage3.20.proj.bias": "stages.2.blocks.20.attn.proj.bias",
        "stage2.1.attns.1.get_v.weight": "stages.1.blocks.1.attn.lepe.1.weight",
        "stage4.0.attns.0.get_v.bias": "stages.3.blocks.0.attn.lepe.0.bias",
        "stage3.4.mlp.fc2.weight": "stages.2.blocks.4.mlp.fc2.weight",
        "stage4.0.norm2.weight": "stages.3.blocks.0.norm2.weight",
        "norm.bias": "norm.bias",
        "head.weight": "head.fc.weight",
    }
    for official, mine in mapping.items():
        assert torch.equal(ours[mine], ema[official]), (official, mine)
    # The EMA weights (what the authors evaluate) were taken, every one of them.
    assert sorted(v.sum().item() for v in ours.values()) == pytest.approx(sorted(v.sum().item() for v in ema.values()))


def test_checkpoint_mismatches_are_named(release_file):
    from zoo.models.cswin import checkpoint_filter_fn

    ema, _ = release_file
    model = _on_meta()
    missing = {k: v for k, v in ema.items() if k != "stage3.7.attns.1.get_v.weight"}
    with pytest.raises(KeyError, match=r"stages\.2\.blocks\.7\.attn\.lepe\.1\.weight"):
        checkpoint_filter_fn(missing, model)
    with pytest.raises(KeyError, match=r"relative_position_bias_table"):
        checkpoint_filter_fn(dict(ema, **{"stage1.0.relative_position_bias_table": torch.zeros(3)}), model)
    wrong = dict(ema, **{"stage2.0.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"stages\.1\.blocks\.0\.attn\.qkv\.weight"):
        checkpoint_filter_fn(wrong, model)
    # A 22k classifier loads into a model built with its class count.
    big = dict(ema, **{"head.weight": torch.zeros(21841, 512), "head.bias": torch.zeros(21841)})
    checkpoint_filter_fn(big, _on_meta(num_classes=21841))


@pytest.mark.parametrize("shape", [(2, 3, 97, 130), (1, 3, 32, 47)])
def test_other_input_sizes(model, shape):
    x = torch.randn(*shape)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        logits = model.forward_head(final)
    # The stem gives floor((n - 3) / 4) + 1, each merge ceil(n / 2).
    sizes = [((shape[2] - 3) // 4 + 1, (shape[3] - 3) // 4 + 1)]
    for _ in range(3):
        sizes.append(tuple((n + 1) // 2 for n in sizes[-1]))
    assert [tuple(f.shape[2:]) for f in feats] == sizes
    assert logits.shape == (shape[0], 1000) and torch.isfinite(logits).all()


def test_too_small_input_raises(model):
    with pytest.raises(ValueError, match=r"H, W >= 32, got \(1, 3, 31, 64\)"):
        model(torch.randn(1, 3, 31, 64))


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
