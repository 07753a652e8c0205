"""FocalNet: sizes, timm's and the official checkpoints, numerics against timm's port, input sizes."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.davit import DaVit
from torch.utils.flop_counter import FlopCounterMode

import zoo  # noqa: F401
from zoo.models.focalnet import checkpoint_filter_fn

# Parameter counts of timm's ports of the official weights (= the official definitions in microsoft/FocalNet
# classification/focalnet.py) and the paper's GFLOPs (multiply-adds) at 224.
OFFICIAL = {
    "t": (28_647_928, 4.5, "focalnet_tiny_lrf"),
    "s": (50_342_440, 8.7, "focalnet_small_lrf"),
    "b": (88_749_768, 15.4, "focalnet_base_lrf"),
    "t_srf": (28_427_116, 4.4, "focalnet_tiny_srf"),
    "s_srf": (49_891_216, 8.6, "focalnet_small_srf"),
    "b_srf": (88_148_144, 15.3, "focalnet_base_srf"),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def official_focalnet_shapes(
    depths: tuple[int, ...],
    embed_dim: int,
    focal_levels: tuple[int, ...],
    focal_windows: tuple[int, ...] = (3, 3, 3, 3),
    use_conv_embed: bool = False,
    use_layerscale: bool = False,
    use_postln_in_modulation: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official FocalNet state dict, read off microsoft/FocalNet's module tree.

    `patch_embed` (conv + LayerNorm); `layers[i].blocks[j]` with `norm1`, `modulation.f` (Linear to
    2C + L + 1), `modulation.h` (1x1 Conv2d), `modulation.proj` (Linear), `modulation.focal_layers[l].0`
    (bias-free depthwise conv, kernel window + 2l), optional `modulation.ln`, `norm2`, `mlp.fc1/fc2`,
    optional `gamma_1/2`; `layers[i].downsample` (conv + LayerNorm into stage i + 1) for all but the last
    stage; then `norm` and `head`. Post-LN models keep the names norm1/norm2.
    """
    dims = [embed_dim * 2**i for i in range(len(depths))]
    stem_k = 7 if use_conv_embed else 4
    down_k = 3 if use_conv_embed else 2
    shapes = {"patch_embed.proj.weight": (dims[0], 3, stem_k, stem_k), "patch_embed.proj.bias": (dims[0],)}
    shapes |= {"patch_embed.norm.weight": (dims[0],), "patch_embed.norm.bias": (dims[0],)}
    for i, dim in enumerate(dims):
        for j in range(depths[i]):
            blk, lv = f"layers.{i}.blocks.{j}", focal_levels[i]
            for norm in ("norm1", "norm2"):
                shapes |= {f"{blk}.{norm}.weight": (dim,), f"{blk}.{norm}.bias": (dim,)}
            shapes |= {
                f"{blk}.modulation.f.weight": (2 * dim + lv + 1, dim),
                f"{blk}.modulation.f.bias": (2 * dim + lv + 1,),
            }
            shapes |= {f"{blk}.modulation.h.weight": (dim, dim, 1, 1), f"{blk}.modulation.h.bias": (dim,)}
            shapes |= {f"{blk}.modulation.proj.weight": (dim, dim), f"{blk}.modulation.proj.bias": (dim,)}
            for level in range(lv):
                k = focal_windows[i] + 2 * level
                shapes[f"{blk}.modulation.focal_layers.{level}.0.weight"] = (dim, 1, k, k)
            if use_postln_in_modulation:
                shapes |= {f"{blk}.modulation.ln.weight": (dim,), f"{blk}.modulation.ln.bias": (dim,)}
            shapes |= {f"{blk}.mlp.fc1.weight": (4 * dim, dim), f"{blk}.mlp.fc1.bias": (4 * dim,)}
            shapes |= {f"{blk}.mlp.fc2.weight": (dim, 4 * dim), f"{blk}.mlp.fc2.bias": (dim,)}
            if use_layerscale:
                shapes |= {f"{blk}.gamma_1": (dim,), f"{blk}.gamma_2": (dim,)}
        if i + 1 < len(dims):
            shapes |= {f"layers.{i}.downsample.proj.weight": (dims[i + 1], dim, down_k, down_k)}
            shapes |= {f"layers.{i}.downsample.proj.bias": (dims[i + 1],)}
            shapes |= {f"layers.{i}.downsample.norm.weight": (dims[i + 1],)}
            shapes |= {f"layers.{i}.downsample.norm.bias": (dims[i + 1],)}
    shapes |= {"norm.weight": (dims[-1],), "norm.bias": (dims[-1],), "head.weight": (1000, dims[-1])}
    shapes["head.bias"] = (1000,)
    return shapes


def _official_to_timm_key(key: str, post_ln: bool) -> str:
    """Where timm's port keeps an official tensor (written from timm's module tree, not our converter)."""
    parts = key.split(".")
    if parts[0] == "patch_embed":
        return "stem." + ".".join(parts[1:])
    if parts[0] == "head":
        return "head.fc." + parts[1]
    if parts[0] == "layers" and parts[2] == "downsample":
        return f"layers.{int(parts[1]) + 1}.downsample." + ".".join(parts[3:])
    if parts[0] == "layers":
        name = ".".join(parts[4:])
        name = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}.get(name, name)
        name = name.replace("modulation.ln.", "modulation.norm.")
        if post_ln:
            name = name.replace("norm1.", "norm1_post.").replace("norm2.", "norm2_post.")
        return f"layers.{parts[1]}.blocks.{parts[3]}.{name}"
    return key


@pytest.mark.parametrize("size", list(OFFICIAL))
def test_parameters_match_official_and_gflops_match_paper(size):
    with torch.device("meta"):
        model = timm.create_model(f"zoo_focalnet_{size}").eval()
        params = sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert params == OFFICIAL[size][0]
    depths = (2, 2, 6, 2) if size.startswith("t") else (2, 2, 18, 2)
    shapes = official_focalnet_shapes(
        depths, 128 if size.startswith("b") else 96, (2,) * 4 if "srf" in size else (3,) * 4
    )
    assert params == sum(torch.Size(s).numel() for s in shapes.values())
    gmacs = counter.get_total_flops() / 2e9  # multiply-adds, the papers' "FLOPs"
    assert abs(gmacs / OFFICIAL[size][1] - 1) < 0.05


@pytest.fixture(scope="module")
def timm_tiny():
    """timm's focalnet_tiny_lrf with random weights (non-trivial norms too)."""
    torch.manual_seed(0)
    model = timm.create_model("focalnet_tiny_lrf").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def ours_from_timm(timm_tiny, tmp_path_factory):
    """zoo_focalnet_t loaded through the pretrained path from a timm checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "focalnet_tiny_lrf.pth"
    torch.save(timm_tiny.state_dict(), path)
    return timm.create_model("zoo_focalnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()


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
    # Like the official model, the strided convs drop what does not fill a stride: 50x82, 25x41, 12x20, 6x10.
    x = torch.randn(1, 3, 200, 328)
    _compare(timm_tiny, ours_from_timm, x)
    with torch.no_grad():
        assert ours_from_timm.forward_features(x).shape == (1, 768, 6, 10)


def test_autograd_path_matches_timm(timm_tiny, ours_from_timm):
    x = torch.randn(1, 3, 64, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = ours_from_timm(x), timm_tiny(x_ref)  # grad mode: the unfused ops
    assert _rel_err(out, ref) <= 1e-5
    out.sum().backward()
    ref.sum().backward()
    assert _rel_err(x.grad, x_ref.grad) <= 1e-4


# Narrow models with the official options: the registered SRF layout, and the large models' conv
# embedding, post-LN, layer scale, LN in the modulation, normalised modulator and 5x5 first kernels.
OFFICIAL_VARIANTS = {
    "srf": (
        "zoo_focalnet_t_srf",
        dict(depths=(2, 2, 2, 2), embed_dim=16),
        dict(depths=(2, 2, 2, 2), embed_dim=16, focal_levels=(2,) * 4),
        False,
    ),
    "large_options": (
        "zoo_focalnet_t",
        dict(
            depths=(1, 1, 2, 1), embed_dim=16, focal_windows=(5,) * 4, use_overlap_down=True, use_post_norm=True,
            layerscale_value=0.1, use_post_norm_in_modulation=True, normalize_modulator=True,
        ),
        dict(
            depths=(1, 1, 2, 1), embed_dim=16, focal_levels=(3,) * 4, focal_windows=(5,) * 4, use_conv_embed=True,
            use_layerscale=True, use_postln_in_modulation=True,
        ),
        True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(OFFICIAL_VARIANTS))
def test_official_release_file_loads_strictly(variant, tmp_path):
    name, kwargs, official_kwargs, post_ln = OFFICIAL_VARIANTS[variant]
    torch.manual_seed(0)
    ref = timm.models.focalnet.FocalNet(**{**dict(focal_levels=official_kwargs["focal_levels"]), **kwargs}).eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if "norm" in pname or "gamma" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    shapes = official_focalnet_shapes(**official_kwargs)
    timm_sd = ref.state_dict()
    # timm keeps 1x1 convs where the official code has linears (f, proj, mlp): same numbers, other shapes.
    official = {k: timm_sd[_official_to_timm_key(k, post_ln)].reshape(shape) for k, shape in shapes.items()}
    assert len(official) == len(timm_sd)
    path = tmp_path / "focalnet.pth"
    # The authors' script saves the weights under "model" beside optimizer state and the config.
    torch.save({"model": official, "optimizer": {"state": {}}, "epoch": 299, "max_accuracy": 82.3}, path)
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    _compare(ref, ours, torch.randn(2, 3, 96, 136))


def test_checkpoint_of_another_family_fails_naming_keys(tmp_path):
    path = tmp_path / "davit.pth"
    torch.save(DaVit(embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 1, 1)).state_dict(), path)
    with pytest.raises(KeyError, match=r"missing keys \['stem\.proj\.weight'.*unexpected keys \['stem\.conv\.weight'"):
        timm.create_model("zoo_focalnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), embed_dim=8)


@pytest.mark.parametrize(
    ("model_size", "ckpt_size", "error", "match"),
    [
        ("t", "t_srf", KeyError, r"missing keys \['stages\.0\.blocks\.0\.modulation\.focal_layers\.2\.0\.weight'"),
        ("t", "s", KeyError, r"0 missing keys.*unexpected keys \['stages\.2\.blocks\.6\.norm1\.weight'"),
        (
            "s",
            "b",
            ValueError,
            r"wrong shape, first: \['stem\.proj\.weight: checkpoint \(128, 3, 4, 4\) vs model \(96,",
        ),
    ],
)
def test_checkpoint_of_another_size_fails_naming_keys(model_size, ckpt_size, error, match):
    with torch.device("meta"):
        model = timm.create_model(f"zoo_focalnet_{model_size}")
        timm_sd = timm.create_model(OFFICIAL[ckpt_size][2]).state_dict()
    with pytest.raises(error, match=match):
        checkpoint_filter_fn(timm_sd, model)


def test_too_small_input_raises_naming_the_constraint(ours_from_timm):
    with torch.no_grad():
        assert ours_from_timm(torch.randn(1, 3, 32, 45)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"H, W >= 32, got \(1, 3, 31, 64\)"):
        ours_from_timm(torch.randn(1, 3, 31, 64))
