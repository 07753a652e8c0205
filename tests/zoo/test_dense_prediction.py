"""Dense-prediction form of the zoo backbones: mmengine registry and configs, torchvision detection."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from mmengine import Config
from mmengine.registry import MODELS

import zoo.integrations.mmengine  # noqa: F401  (registers ZooBackbone)
from tests.anchors.biformer_official import random_official_state_dict
from tests.zoo.test_timm_contract import MODELS as SMALLEST
from zoo.integrations import DenseBackbone
from zoo.integrations.dense import OUT_NORMS
from zoo.integrations.torchvision import backbone_with_fpn

CONFIGS = Path(__file__).parent / "mm_configs"


def test_config_with_base_and_override_builds_through_registry():
    cfg = Config.fromfile(str(CONFIGS / "biformer_t_frozen.py"))
    assert cfg.backbone.arch == "zoo_biformer_t" and cfg.backbone.out_indices == (0, 1, 2, 3)
    model = MODELS.build(cfg.backbone)
    model.train()
    assert not any(p.requires_grad for p in model.backbone.body.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.body.stages[0].parameters())
    assert all(p.requires_grad for p in model.backbone.body.stages[1].parameters())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # norm_eval
    assert isinstance(model.backbone.out_norms[0], timm.layers.LayerNorm2d)  # the authors' per-stage norms


@pytest.mark.parametrize("arch", SMALLEST)
def test_every_family_gives_four_maps_with_strides_on_non_square_input(arch):
    cfg = Config.fromfile(str(CONFIGS / "_base_" / "zoo_backbone.py"))
    cfg.merge_from_dict({"backbone.arch": arch, "backbone.drop_path_rate": 0.0})
    model = MODELS.build(cfg.backbone).eval()
    assert model.strides == [4, 8, 16, 32]
    x = torch.randn(1, 3, 224, 160)
    with torch.no_grad():
        feats = model(x)
    assert len(feats) == 4
    for f, c, s in zip(feats, model.channels, (4, 8, 16, 32), strict=True):
        assert f.shape == (1, c, -(-224 // s), -(-160 // s))
    # The per-stage output norms are those of the family's authors' dense backbone, with their epsilon.
    spec = OUT_NORMS.get(arch.split("_")[1])
    for norm in model.backbone.out_norms:
        if spec is None:
            assert isinstance(norm, torch.nn.Identity)
        else:
            assert isinstance(norm, timm.layers.LayerNorm2d) and norm.eps == spec.eps


def _authors_dense_keys(family: str) -> tuple[str, dict, dict[str, tuple[int, ...]], list[str]]:
    """(arch, model kwargs, authors' dense backbone key -> shape, authors' norm names by stage) of one family.

    The authors' dense backbones keep the classification keys but drop the classifier and the final norm,
    and add one LayerNorm per output stage (see the OUT_NORMS comment for where each family's code does).
    """
    from tests.zoo.test_cswin import official_cswin_shapes
    from tests.zoo.test_davit import NARROW, official_davit_shapes
    from tests.zoo.test_focalnet import OFFICIAL_VARIANTS, official_focalnet_shapes
    from tests.zoo.test_litv2 import official_litv2_shapes

    if family == "cswin":
        arch, kwargs, shapes, dims = "zoo_cswin_t", {}, official_cswin_shapes("t"), (64, 128, 256, 512)
        names = [f"norm{i + 1}" for i in range(4)]
    elif family == "davit":
        arch, kwargs, dims = "zoo_davit_t", NARROW, NARROW["embed_dims"]
        shapes = official_davit_shapes(NARROW["depths"], dims)
        names = [f"norm{i}" for i in range(4)]
    elif family == "focalnet":
        arch, kwargs, official_kwargs, _ = OFFICIAL_VARIANTS["srf"]
        shapes = official_focalnet_shapes(**official_kwargs)
        dims, names = tuple(kwargs["embed_dim"] * 2**i for i in range(4)), [f"norm{i}" for i in range(4)]
    else:
        arch, kwargs, shapes, dims = "zoo_litv2_s", {}, official_litv2_shapes("s"), (96, 192, 384, 768)
        names = [f"norm{i}" for i in range(4)]
    shapes = {k: v for k, v in shapes.items() if not k.startswith(("head.", "norm.", "norms."))}
    for name, dim in zip(names, dims, strict=True):
        shapes |= {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}
    return arch, kwargs, shapes, names


@pytest.mark.parametrize(
    "family, without",
    [("cswin", None), ("davit", None), ("focalnet", None), ("litv2", None), ("litv2", "norm0")],
)
def test_authors_dense_checkpoint_loads_with_their_output_norms(family, without, tmp_path):
    arch, kwargs, shapes, names = _authors_dense_keys(family)
    torch.manual_seed(0)
    official = {k: torch.randn(shape) for k, shape in shapes.items() if not k.startswith(f"{without}.")}
    # As mmdet/mmseg save a detector: the backbone under "backbone.", beside the neck/heads and metadata.
    state = {f"backbone.{k}": v for k, v in official.items()} | {"decode_head.conv_seg.weight": torch.randn(4, 8)}
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, tmp_path / "dense.pth")
    model = MODELS.build(
        dict(type="ZooBackbone", arch=arch, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "dense.pth")))
        | kwargs
    )
    model.init_weights()
    norms = model.backbone.out_norms
    for i, name in enumerate(names):
        if name == without:  # LITv2's detection backbone has no norm at stage 0, and neither has ours then
            assert isinstance(norms[i], torch.nn.Identity)
        else:
            torch.testing.assert_close(norms[i].weight, official[f"{name}.weight"])
            torch.testing.assert_close(norms[i].bias, official[f"{name}.bias"])
    stem = next(v for v in official.values() if v.ndim == 4 and v.shape[1] == 3)
    assert any(torch.equal(stem, p) for p in model.backbone.body.parameters())
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == model.channels and all(torch.isfinite(f).all() for f in feats)


def test_zoo_segmentation_export_loads_back_as_backbone(tmp_path):
    from safetensors.torch import save_file

    from zoo.training.segmentation import SemanticSegmentationModel

    tiny = dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32), n_win=4)
    seg = SemanticSegmentationModel("zoo_biformer_t", 3, fpn_channels=16, head_channels=8, model_kwargs=tiny).eval()
    with torch.no_grad():
        for p in seg.backbone.out_norms.parameters():
            p.add_(torch.randn_like(p))
    # train/seg.py's best.safetensors: the SemanticSegmentationModel's own state dict.
    save_file(seg.state_dict(), tmp_path / "best.safetensors")
    init_cfg = dict(type="Pretrained", checkpoint=str(tmp_path / "best.safetensors"))
    model = MODELS.build(dict(type="ZooBackbone", arch="zoo_biformer_t", init_cfg=init_cfg) | tiny).eval()
    model.init_weights()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for ours, exported in zip(model(x), seg.backbone(x), strict=True):
            torch.testing.assert_close(ours, exported)
    # The export's norms follow its out_indices; a backbone returning fewer stages has no place for them all.
    with pytest.raises(KeyError, match="unexpected output-norm keys"):
        DenseBackbone("zoo_biformer_t", out_indices=(1, 2, 3), pretrained=str(tmp_path / "best.safetensors"), **tiny)
    extra = seg.state_dict() | {"backbone.body.stray.weight": torch.zeros(2)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(KeyError, match="backbone.body.stray|stray.weight"):
        DenseBackbone("zoo_biformer_t", pretrained=str(tmp_path / "extra.safetensors"), **tiny)


def test_pretrained_init_cfg_uses_safe_loader(tmp_path):
    import argparse

    sd = random_official_state_dict("t")
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "release.pth")
    cfg = dict(
        type="ZooBackbone",
        arch="zoo_biformer_t",
        init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "release.pth")),
    )
    model = MODELS.build(cfg)
    model.init_weights()
    torch.testing.assert_close(model.backbone.body.stem[0].weight, sd["downsample_layers.0.0.weight"])
    torch.testing.assert_close(
        model.backbone.body.stages[2].blocks[7].attn.proj.weight, sd["stages.2.7.attn.wo.weight"]
    )


def test_dense_checkpoint_round_trip_and_key_errors(tmp_path):
    a = DenseBackbone("zoo_biformer_t").eval()
    torch.save(
        {
            "state_dict": {f"backbone.{k}": v for k, v in a.body.state_dict().items()}
            | {f"backbone.extra_norms.{k}": v for k, v in a.out_norms.state_dict().items()}
        },
        tmp_path / "det.pth",
    )
    b = DenseBackbone("zoo_biformer_t", pretrained=str(tmp_path / "det.pth")).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for fa, fb in zip(a(x), b(x), strict=True):
            torch.testing.assert_close(fa, fb)
    bad = random_official_state_dict("s")
    torch.save({"model": bad}, tmp_path / "s.pth")
    with pytest.raises(KeyError, match="unexpected keys"):
        DenseBackbone("zoo_biformer_t", pretrained=str(tmp_path / "s.pth"))


def test_unknown_arch_is_named():
    with pytest.raises(ValueError, match="unknown arch 'zoo_nope'"):
        DenseBackbone("zoo_nope")


def test_torchvision_faster_rcnn_trains_and_infers():
    from torchvision.models.detection import FasterRCNN

    backbone = backbone_with_fpn("zoo_biformer_t", out_channels=64, depths=(1, 1, 1, 1))
    model = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=160)
    images = [torch.rand(3, 128, 160), torch.rand(3, 120, 150)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([2])},
    ]
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert backbone.body.body.stem[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}
