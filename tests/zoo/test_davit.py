"""DaViT: sizes, timm's and the official checkpoints, numerics against timm's port, input sizes."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.focalnet import FocalNet
from torch.utils.flop_counter import FlopCounterMode

import zoo  # noqa: F401
from zoo.models.davit import checkpoint_filter_fn

# Parameter counts of the official definitions (dingmyu/davit timm/models/davit.py: 28360168, 49745896,
# 87954408) and the paper's GFLOPs (multiply-adds) at 224.
OFFICIAL = {"t": (28_360_168, 4.5), "s": (49_745_896, 8.8), "b": (87_954_408, 15.5)}
TIMM_NAME = {"t": "davit_tiny", "s": "davit_small", "b": "davit_base"}
ARCH = {
    "t": ((1, 1, 3, 1), (96, 192, 384, 768), (3, 6, 12, 24)),
    "s": ((1, 1, 9, 1), (96, 192, 384, 768), (3, 6, 12, 24)),
    "b": ((1, 1, 9, 1), (128, 256, 512, 1024), (4, 8, 16, 32)),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def official_davit_shapes(depths: tuple[int, ...], dims: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official DaViT state dict, read off dingmyu/davit's `DaViT` module tree.

    `patch_embeds[i]` is the stem (7x7 conv + LayerNorm(C0)) for i = 0 and, after, LayerNorm(C_{i-1}) + 2x2
    conv; `main_blocks[i][j]` holds a (SpatialBlock, ChannelBlock) pair, each with `cpe[0..1]`, norms,
    `attn.qkv/proj` and `mlp.fc1/fc2`; then `norms` (after pooling) and `head`.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for i, dim in enumerate(dims):
        pre = f"patch_embeds.{i}"
        if i == 0:
            shapes |= {f"{pre}.proj.weight": (dim, 3, 7, 7), f"{pre}.proj.bias": (dim,)}
            shapes |= {f"{pre}.norm.weight": (dim,), f"{pre}.norm.bias": (dim,)}
        else:
            shapes |= {f"{pre}.proj.weight": (dim, dims[i - 1], 2, 2), f"{pre}.proj.bias": (dim,)}
            shapes |= {f"{pre}.norm.weight": (dims[i - 1],), f"{pre}.norm.bias": (dims[i - 1],)}
        for j in range(depths[i]):
            for k in (0, 1):
                blk = f"main_blocks.{i}.{j}.{k}"
                for c in (0, 1):
                    shapes |= {f"{blk}.cpe.{c}.proj.weight": (dim, 1, 3, 3), f"{blk}.cpe.{c}.proj.bias": (dim,)}
                for norm in ("norm1", "norm2"):
                    shapes |= {f"{blk}.{norm}.weight": (dim,), f"{blk}.{norm}.bias": (dim,)}
                shapes |= {f"{blk}.attn.qkv.weight": (3 * dim, dim), f"{blk}.attn.qkv.bias": (3 * dim,)}
                shapes |= {f"{blk}.attn.proj.weight": (dim, dim), f"{blk}.attn.proj.bias": (dim,)}
                shapes |= {f"{blk}.mlp.fc1.weight": (4 * dim, dim), f"{blk}.mlp.fc1.bias": (4 * dim,)}
                shapes |= {f"{blk}.mlp.fc2.weight": (dim, 4 * dim), f"{blk}.mlp.fc2.bias": (dim,)}
    shapes |= {"norms.weight": (dims[-1],), "norms.bias": (dims[-1],)}
    shapes |= {"head.weight": (1000, dims[-1]), "head.bias": (1000,)}
    return shapes


def _official_to_timm_key(key: str) -> str:
    """Where timm's port keeps the official tensor `key` (written from timm's module tree, not our converter)."""
    parts = key.split(".")
    if parts[0] == "patch_embeds":
        i, kind = int(parts[1]), {"proj": "conv", "norm": "norm"}[parts[2]]
        return f"stem.{kind}.{parts[3]}" if i == 0 else f"stages.{i}.downsample.{kind}.{parts[3]}"
    if parts[0] == "main_blocks":
        rest = ".".join(parts[4:]).replace("cpe.0.", "cpe1.").replace("cpe.1.", "cpe2.")
        return f"stages.{parts[1]}.blocks.{parts[2]}.{parts[3]}.{rest}"
    return {"norms": "head.norm", "head": "head.fc"}[parts[0]] + "." + parts[1]


@pytest.mark.parametrize("size", ["t", "s", "b"])
def test_parameters_match_official_and_gflops_match_paper(size):
    with torch.device("meta"):
        model = timm.create_model(f"zoo_davit_{size}").eval()
        params = sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert params == OFFICIAL[size][0]
    assert params == sum(torch.Size(s).numel() for s in official_davit_shapes(*ARCH[size][:2]).values())
    gmacs = counter.get_total_flops() / 2e9  # multiply-adds, the papers' "FLOPs"
    assert abs(gmacs / OFFICIAL[size][1] - 1) < 0.05


@pytest.fixture(scope="module")
def timm_tiny():
    """timm's davit_tiny with random weights (non-trivial norms too)."""
    torch.manual_seed(0)
    model = timm.create_model("davit_tiny").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def ours_from_timm(timm_tiny, tmp_path_factory):
    """zoo_davit_t loaded through the pretrained path from timm's weights as timm's hub ships them."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_tiny.state_dict().items()}, str(path))
    return timm.create_model("zoo_davit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()


def _compare(ref: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    """Logits and every stage's features within 1e-5 relative max error; one pass per model."""
    with torch.no_grad():
        final, feats = ours.forward_intermediates(x)
        ref_final, ref_feats = ref.forward_intermediates(x)
        assert _rel_err(ours.forward_head(final), ref.forward_head(ref_final)) <= 1e-5
    assert len(feats) == len(ref_feats) == 4
    for got, expected in zip(feats, ref_feats, strict=True):
        assert got.shape == expected.shape
        assert _rel_err(got, expected) <= 1e-5


def test_timm_checkpoint_reproduces_timm_at_odd_size(timm_tiny, ours_from_timm):
    # 200 x 328 pads in the stem (no), the downsamplings (25 -> 13) and the windows (50, 82, 13, 21, 7, 11).
    x = torch.randn(1, 3, 200, 328)
    _compare(timm_tiny, ours_from_timm, x)
    with torch.no_grad():
        final = ours_from_timm.forward_features(x)
    assert final.shape == (1, 768, 7, 11)  # padded, never cropped
    with torch.no_grad():
        assert torch.equal(ours_from_timm(x), ours_from_timm.forward_head(final))


def test_autograd_path_matches_timm(timm_tiny, ours_from_timm):
    x = torch.randn(1, 3, 64, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = ours_from_timm(x), timm_tiny(x_ref)  # grad mode: the unfused ops
    assert _rel_err(out, ref) <= 1e-5
    out.sum().backward()
    ref.sum().backward()
    assert _rel_err(x.grad, x_ref.grad) <= 1e-4


# A narrow DaViT-T (same depths, so the same key structure) keeps the official-layout round trip cheap.
NARROW = dict(depths=(1, 1, 3, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def timm_narrow():
    torch.manual_seed(1)
    model = timm.create_model("davit_tiny", **NARROW).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_official_release_file_loads_strictly(timm_narrow, tmp_path):
    shapes = official_davit_shapes(NARROW["depths"], NARROW["embed_dims"])
    timm_sd = timm_narrow.state_dict()
    official = {k: timm_sd[_official_to_timm_key(k)] for k in shapes}
    assert len(official) == len(timm_sd)
    assert all(tuple(v.shape) == shapes[k] for k, v in official.items())
    path = tmp_path / "davit_tiny.pth.tar"
    # timm's training script, which the authors used, saves the weights under "state_dict" with extras.
    torch.save({"epoch": 299, "arch": "DaViT_tiny", "state_dict": official, "args": argparse.Namespace(lr=1e-3)}, path)
    ours = timm.create_model("zoo_davit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **NARROW)
    _compare(timm_narrow, ours.eval(), torch.randn(2, 3, 97, 131))


def test_official_file_missing_a_tensor_names_it():
    with torch.device("meta"):
        model = timm.create_model("zoo_davit_t")
        official = {k: torch.empty(s) for k, s in official_davit_shapes(*ARCH["t"][:2]).items()}
    del official["main_blocks.2.1.1.attn.qkv.weight"]
    with pytest.raises(KeyError, match=r"stages\.2\.blocks\.1\.1\.attn\.qkv\.weight"):
        checkpoint_filter_fn(official, model)


def test_checkpoint_of_another_family_fails_naming_keys(tmp_path):
    path = tmp_path / "focalnet.pth"
    torch.save(FocalNet(embed_dim=8).state_dict(), path)  # timm's FocalNet, narrow to stay cheap
    with pytest.raises(KeyError, match=r"missing keys \['stem\.conv\.weight'.*unexpected keys \['stem\.proj\.weight'"):
        timm.create_model("zoo_davit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **NARROW)


@pytest.mark.parametrize(
    ("model_size", "ckpt_size", "error", "match"),
    [
        ("t", "s", KeyError, r"0 missing keys.*unexpected keys \['stages\.2\.blocks\.3\.0\.cpe1\.proj\.weight'"),
        (
            "s",
            "b",
            ValueError,
            r"wrong shape, first: \['stem\.conv\.weight: checkpoint \(128, 3, 7, 7\) vs model \(96,",
        ),
    ],
)
def test_checkpoint_of_another_size_fails_naming_keys(model_size, ckpt_size, error, match):
    with torch.device("meta"):
        model = timm.create_model(f"zoo_davit_{model_size}")
        timm_sd = timm.create_model(TIMM_NAME[ckpt_size]).state_dict()
        official = {k: torch.empty(s) for k, s in official_davit_shapes(*ARCH[ckpt_size][:2]).items()}
    for state_dict in (timm_sd, official):  # either layout
        with pytest.raises(error, match=match):
            checkpoint_filter_fn(state_dict, model)


def test_any_input_size_works_and_bad_shapes_raise(ours_from_timm):
    with torch.no_grad():
        assert ours_from_timm(torch.randn(1, 3, 23, 45)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 3, H, W\)"):
        ours_from_timm(torch.randn(1, 1, 64, 64))
