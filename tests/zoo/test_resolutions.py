"""Input resolutions: `img_size=` and `set_input_size` per family, the registered 384/512 and ImageNet-22k
variants and their cfgs, and 224 weights loading into higher-resolution models (tables resized as timm does)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resize_rel_pos_bias_table

import zoo  # noqa: F401

# Small depths keep each family's model cheap; every resolution-dependent layer type is still present.
TINY = {
    "zoo_maxvit_t": dict(depths=(1, 1, 1, 1)),
    "zoo_cswin_t": dict(depths=(1, 1, 1, 1)),
    "zoo_davit_t": dict(depths=(1, 1, 1, 1)),
    "zoo_biformer_t": dict(depths=(1, 1, 1, 1)),
    "zoo_litv2_s": dict(depths=(1, 1, 1, 1)),
    "zoo_focalnet_t": dict(depths=(1, 1, 1, 1)),
}


def _partition_sizes(model: torch.nn.Module) -> set:
    """Every window, grid or stripe size in the model (MaxViT, DaViT, CSWin stage 3)."""
    sizes = set()
    for module in model.modules():
        name = type(module).__name__
        if name == "PartitionAttention":
            sizes.add(("maxvit", module.partition, tuple(module.size), tuple(module.rel_pos.size)))
        elif name == "WindowAttention":
            sizes.add(("davit", tuple(module.window_size)))
        elif name == "CrossShapedWindowAttention" and not module.full_attention:
            sizes.add(("cswin", module.split_size))
    return sizes


@pytest.mark.parametrize(
    "name, expected_224, expected_384",
    [
        (
            "zoo_maxvit_t",
            {("maxvit", p, (7, 7), (7, 7)) for p in ("block", "grid")},
            {("maxvit", p, (12, 12), (12, 12)) for p in ("block", "grid")},
        ),
        ("zoo_davit_t", {("davit", (7, 7))}, {("davit", (12, 12))}),
        # The authors' stripes: (1, 2, 7, 7) at 224, (1, 2, 12, 12) at 384 (CSWin_*_384).
        ("zoo_cswin_t", {("cswin", 1), ("cswin", 2), ("cswin", 7)}, {("cswin", 1), ("cswin", 2), ("cswin", 12)}),
    ],
)
def test_img_size_and_set_input_size_set_the_partitions(name, expected_224, expected_384):
    model = timm.create_model(name, **TINY[name])
    assert model.img_size == (224, 224) and _partition_sizes(model) == expected_224
    assert _partition_sizes(timm.create_model(name, img_size=384, **TINY[name])) == expected_384
    model.set_input_size(img_size=384)
    assert model.img_size == (384, 384) and _partition_sizes(model) == expected_384
    # timm records the new size where `save_for_hf`/`get_model_args` read it.
    assert model._model_args["img_size"] == (384, 384)
    model.set_input_size(img_size=(224, 224))
    assert _partition_sizes(model) == expected_224


@pytest.mark.parametrize("name", ["zoo_maxvit_t", "zoo_davit_t", "zoo_cswin_t"])
def test_set_input_size_equals_a_model_built_at_that_size(name):
    # A 224 model switched to 384 computes what a 384 model holding the same (converted) weights computes,
    # and differs from the 224 partitioning on a 384 input: the partition change is real.
    torch.manual_seed(0)
    small = timm.create_model(name, num_classes=5, **TINY[name]).eval()
    weights = small.state_dict()
    large = timm.create_model(name, num_classes=5, img_size=384, **TINY[name]).eval()
    large.load_state_dict(_filter(name)(weights, large))
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        before = small(x)
        small.set_input_size(384)
        after, reference = small(x), large(x)
    torch.testing.assert_close(after, reference, rtol=0, atol=0)
    assert not torch.allclose(before, after, atol=1e-4)


def _filter(name: str):
    import importlib

    return importlib.import_module(f"zoo.models.{name.split('_')[1]}").checkpoint_filter_fn


@pytest.mark.parametrize("name", ["zoo_biformer_t", "zoo_litv2_s", "zoo_focalnet_t"])
def test_size_independent_families_record_the_size_and_keep_their_outputs(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **TINY[name]).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        before = model(x)
        model.set_input_size(img_size=(96, 128))
        after = model(x)
    assert model.img_size == (96, 128) and model._model_args["img_size"] == (96, 128)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(TypeError, match="window_size"):
        model.set_input_size(img_size=224, window_size=12)


def test_maxvit_set_input_size_resizes_tables_as_timm():
    model = timm.create_model("zoo_maxvit_t", **TINY["zoo_maxvit_t"])
    rel_pos = model.stages[0].blocks[0].attn_block.attn.rel_pos
    table = rel_pos.relative_position_bias_table.detach().clone()
    model.set_input_size(img_size=512)
    expected = resize_rel_pos_bias_table(table, new_window_size=(16, 16), new_bias_shape=(table.shape[0], 31, 31))
    assert rel_pos.relative_position_bias_table.shape == (table.shape[0], 31, 31)
    torch.testing.assert_close(rel_pos.relative_position_bias_table.detach(), expected)
    assert rel_pos.index.shape == (256, 256) and int(rel_pos.index.max()) == 31 * 31 - 1
    model.set_input_size(img_size=256, window_size=4, grid_size=8)
    attn = model.stages[0].blocks[0]
    assert attn.attn_block.attn.size == (4, 4) and attn.attn_grid.attn.size == (8, 8)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1000)


def test_224_checkpoint_loads_into_384_maxvit(tmp_path):
    # The way timm loads its maxvit_*_tf_224 weights into a 384 model: relative tables resized on load.
    torch.manual_seed(0)
    small = timm.create_model("zoo_maxvit_t", **TINY["zoo_maxvit_t"])
    path = tmp_path / "maxvit_224.safetensors"
    save_file(small.state_dict(), str(path))
    large = timm.create_model(
        "zoo_maxvit_t_384", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY["zoo_maxvit_t"]
    )
    key = "stages.1.blocks.0.attn_grid.attn.rel_pos.relative_position_bias_table"
    src = small.state_dict()[key]
    expected = resize_rel_pos_bias_table(src, new_window_size=(12, 12), new_bias_shape=(src.shape[0], 23, 23))
    torch.testing.assert_close(large.state_dict()[key], expected)
    key = "stages.1.blocks.0.conv.conv1_1x1.weight"
    assert torch.equal(large.state_dict()[key], small.state_dict()[key])


@pytest.mark.parametrize("name, tiny", [("zoo_cswin_b_384", "zoo_cswin_t"), ("zoo_litv2_b_384", "zoo_litv2_s")])
def test_224_checkpoint_loads_into_384_models_without_tables(name, tiny, tmp_path):
    # CSWin (LePE) and LITv2 carry no size-dependent tensors: the 224 weights load unchanged, and the 384 models
    # have the parameters of the 224 ones (the authors' definitions).
    with torch.device("meta"):
        count = lambda n: sum(p.numel() for p in timm.create_model(n).parameters())  # noqa: E731
        assert count(name) == count(name.removesuffix("_384"))
    torch.manual_seed(0)
    small = timm.create_model(name.removesuffix("_384"), **TINY[tiny])
    path = tmp_path / "w.safetensors"
    save_file(small.state_dict(), str(path))
    large = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY[tiny])
    assert large.img_size == (384, 384)
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in large.state_dict().items())


VARIANTS = {
    # name: (input side, crop_pct, mean, classes, paper/README top-1 in the notes, part of the url)
    "zoo_maxvit_t_384.in1k": (384, 1.0, (0.5, 0.5, 0.5), 1000, "85.24", "maxvit_tiny_tf_384.in1k/"),
    "zoo_maxvit_t_512.in1k": (512, 1.0, (0.5, 0.5, 0.5), 1000, "85.72", "maxvit_tiny_tf_512.in1k/"),
    "zoo_maxvit_s_384.in1k": (384, 1.0, (0.5, 0.5, 0.5), 1000, "85.74", "maxvit_small_tf_384.in1k/"),
    "zoo_maxvit_s_512.in1k": (512, 1.0, (0.5, 0.5, 0.5), 1000, "86.19", "maxvit_small_tf_512.in1k/"),
    "zoo_maxvit_b_384.in1k": (384, 1.0, (0.5, 0.5, 0.5), 1000, "86.34", "maxvit_base_tf_384.in1k/"),
    "zoo_maxvit_b_512.in1k": (512, 1.0, (0.5, 0.5, 0.5), 1000, "86.66", "maxvit_base_tf_512.in1k/"),
    "zoo_maxvit_l_384.in1k": (384, 1.0, (0.5, 0.5, 0.5), 1000, "86.4", "maxvit_large_tf_384.in1k/"),
    "zoo_maxvit_l_512.in1k": (512, 1.0, (0.5, 0.5, 0.5), 1000, "86.7", "maxvit_large_tf_512.in1k/"),
    "zoo_maxvit_b_384.in21k_ft_in1k": (384, 1.0, (0.5, 0.5, 0.5), 1000, "88.24", "base_tf_384.in21k_ft_in1k/"),
    "zoo_maxvit_l_512.in21k_ft_in1k": (512, 1.0, (0.5, 0.5, 0.5), 1000, "88.46", "large_tf_512.in21k_ft_in1k/"),
    "zoo_cswin_b_384.in1k": (384, 1.0, (0.485, 0.456, 0.406), 1000, "85.5", "v0.1.0/cswin_base_384.pth"),
    "zoo_cswin_l_384.in22k_ft_in1k": (384, 1.0, (0.485, 0.456, 0.406), 1000, "87.5", "v0.1.0/cswin_large_384.pth"),
    "zoo_litv2_b_384.in1k": (384, 1.0, (0.485, 0.456, 0.406), 1000, "84.7", "v1.0/litv2_b_384.pth"),
    "zoo_focalnet_l_fl3.in22k": (384, 1.0, (0.485, 0.456, 0.406), 21842, None, "v1.0.0/focalnet_large_lrf_384.pth"),
    "zoo_focalnet_l_fl4.in22k": (384, 1.0, (0.485, 0.456, 0.406), 21842, None, "v1.0.0/focalnet_large_lrf_384_fl4.pth"),
    "zoo_focalnet_xl_fl3.in22k": (384, 1.0, (0.485, 0.456, 0.406), 21842, None, "v1.0.0/focalnet_xlarge_lrf_384.pth"),
    "zoo_focalnet_xl_fl4.in22k": (
        384,
        1.0,
        (0.485, 0.456, 0.406),
        21842,
        None,
        "v1.0.0/focalnet_xlarge_lrf_384_fl4.pth",
    ),
}


@pytest.mark.parametrize("tagged", sorted(VARIANTS))
def test_registered_variants_carry_their_cfgs(tagged):
    side, crop, mean, classes, top1, url = VARIANTS[tagged]
    with torch.device("meta"):
        model = timm.create_model(tagged)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, side, side) and cfg["pool_size"] == (side // 32, side // 32)
    assert cfg["crop_pct"] == crop and tuple(cfg["mean"]) == mean and cfg["num_classes"] == classes
    assert model.num_classes == classes and model.img_size == (side, side)
    assert url in cfg["url"]
    if top1 is not None:
        assert any(f"top-1 {top1}" in note for note in cfg["notes"])
    # The data config timm derives for evaluation follows the cfg.
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, side, side) and data["crop_pct"] == crop


# Parameters of the authors' definitions: FocalNet's L/XL as timm's ports of them (their README's 207 M and
# 366 M count a 1000-class head); the 384 models have the 224 models' parameters except MaxViT's larger tables.
@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("zoo_focalnet_l_fl3", "focalnet_large_fl3"),
        ("zoo_focalnet_l_fl4", "focalnet_large_fl4"),
        ("zoo_focalnet_xl_fl3", "focalnet_xlarge_fl3"),
        ("zoo_focalnet_xl_fl4", "focalnet_xlarge_fl4"),
        ("zoo_maxvit_t_384", "maxvit_tiny_tf_384"),
        ("zoo_maxvit_s_512", "maxvit_small_tf_512"),
        ("zoo_maxvit_l_512", "maxvit_large_tf_512"),
    ],
)
def test_variant_parameters_equal_the_reference_definitions(ours, theirs):
    with torch.device("meta"):
        count = sum(p.numel() for p in timm.create_model(ours).parameters())
        reference = timm.create_model(theirs, num_classes=timm.create_model(ours).num_classes)
    assert count == sum(p.numel() for p in reference.parameters())


def test_focalnet_22k_readme_parameter_counts():
    with torch.device("meta"):
        for name, millions in (("zoo_focalnet_l_fl3", 207), ("zoo_focalnet_xl_fl3", 366)):
            count = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            assert round(count / 1e6) == millions, (name, count)


def test_focalnet_large_configs_follow_the_authors():
    with torch.device("meta"):
        l3, l4, xl4 = (
            timm.create_model(n) for n in ("zoo_focalnet_l_fl3", "zoo_focalnet_l_fl4", "zoo_focalnet_xl_fl4")
        )
    block = lambda m: m.stages[0].blocks[0]  # noqa: E731
    assert block(l3).modulation.focal_level == 3 and block(l4).modulation.focal_level == 4
    assert block(l4).modulation.normalize_modulator and not block(xl4).modulation.normalize_modulator
    assert l3.stem.proj.kernel_size == (7, 7) and l3.use_post_norm


def test_maxvit_384_equals_timms_port_on_a_224_checkpoint(tmp_path):
    # timm's maxvit_tiny_tf_384 reproduces the official 384 model; both load the same 224 weights, resizing
    # the relative tables on load, and must then compute the same logits (and so after set_input_size).
    torch.manual_seed(0)
    source = timm.create_model("maxvit_tiny_tf_224").eval()
    for bn in (m for m in source.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "maxvit_tiny_tf_224.pth"
    torch.save(source.state_dict(), path)
    overlay = dict(file=str(path))
    theirs = timm.create_model("maxvit_tiny_tf_384", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    ours = timm.create_model("zoo_maxvit_t_384", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    switched = timm.create_model("zoo_maxvit_t", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    switched.set_input_size(img_size=384)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        expected = theirs(x)
        for model in (ours, switched):
            got = model(x)
            assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("name, levels, windows", [("zoo_focalnet_l_fl3", 3, 5), ("zoo_focalnet_xl_fl4", 4, 3)])
def test_timms_port_of_the_22k_focalnets_loads_and_computes_the_same(name, levels, windows, tmp_path):
    # timm's FocalNet class with the large models' settings, shrunk; its state dict goes through our loader.
    from timm.models.focalnet import FocalNet as TimmFocalNet

    small = dict(depths=(1, 1, 1, 1), embed_dim=16)
    torch.manual_seed(0)
    theirs = TimmFocalNet(
        **small,
        focal_levels=(levels,) * 4,
        focal_windows=(windows,) * 4,
        use_post_norm=True,
        use_overlap_down=True,
        layerscale_value=1e-4,
        num_classes=21842,
    ).eval()
    for p in theirs.parameters():  # layer scale starts at 1e-4: give every branch a visible effect
        p.data.normal_(0, 0.1)
    path = tmp_path / "timm.safetensors"
    save_file(theirs.state_dict(), str(path))
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **small).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = theirs(x)
        assert ((ours(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-5
