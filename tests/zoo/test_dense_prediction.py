"""Dense-prediction form of the zoo backbones: mmengine registry and configs, torchvision detection."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from mmengine import Config
from mmengine.registry import MODELS

import zoo.integrations.mmengine  # noqa: F401  (registers ZooBackbone)
from benchmarks.anchors.biformer_official import random_official_state_dict
from tests.zoo.test_timm_contract import MODELS as SMALLEST
from zoo.integrations import DenseBackbone
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
    model = MODELS.build(dict(type="ZooBackbone", arch=arch, out_indices=(0, 1, 2, 3))).eval()
    x = torch.randn(1, 3, 224, 160)
    with torch.no_grad():
        feats = model(x)
    assert len(feats) == 4
    for f, c, s in zip(feats, model.channels, (4, 8, 16, 32), strict=True):
        assert f.shape == (1, c, -(-224 // s), -(-160 // s))


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
