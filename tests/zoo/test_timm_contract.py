"""timm's model contract, checked on the smallest registered size of every zoo family.

A family joins these tests by being imported from `zoo/models/__init__.py`.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import group_parameters

import zoo  # noqa: F401  (registers the zoo_* models)


def _family(name: str) -> str:
    return name.split("_")[1]


def _smallest_per_family() -> list[str]:
    best: dict[str, tuple[int, str]] = {}
    for name in timm.list_models("zoo_*"):
        with torch.device("meta"):
            count = sum(p.numel() for p in timm.create_model(name).parameters())
        family = _family(name)
        if family not in best or count < best[family][0]:
            best[family] = (count, name)
    return sorted(name for _, name in best.values())


MODELS = _smallest_per_family()


def _input(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    c, h, w = model.pretrained_cfg["input_size"]
    return torch.randn(batch, c, h, w)


@pytest.fixture(scope="module", params=MODELS)
def built(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param).eval()
    return request.param, model, _input(model)


def test_every_family_is_registered():
    assert "biformer" in {_family(n) for n in MODELS}


def test_forward_features_head_and_pre_logits(built):
    _, model, x = built
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.equal(model.forward_head(feats), logits)
    assert logits.shape == (x.shape[0], model.num_classes)
    assert feats.shape[:2] == (x.shape[0], model.num_features)
    assert pooled.shape == (x.shape[0], model.num_features)
    assert torch.isfinite(logits).all()


def test_reset_and_get_classifier(built):
    name, _, x = built
    model = timm.create_model(name).eval()
    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], 10)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], model.num_features)


def test_num_classes_and_in_chans_arguments(built):
    name, _, _ = built
    model = timm.create_model(name, num_classes=7, in_chans=1).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    with torch.no_grad():
        assert model(torch.randn(1, 1, h, w)).shape == (1, 7)


def test_grad_checkpointing_gives_same_output_and_gradients(built):
    name, _, x = built
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    for m in model.modules():  # BatchNorm in train mode is still deterministic; dropout/drop-path are off
        m.training = isinstance(m, torch.nn.BatchNorm2d)
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_no_weight_decay_and_group_matcher(built):
    _, model, _ = built
    names = {n for n, _ in model.named_parameters()}
    assert set(model.no_weight_decay()) <= names | {n.rsplit(".", 1)[0] for n in names}
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        covered = [p for g in groups.values() for p in g]
        assert sorted(covered) == sorted(names), "group_matcher must place every parameter in one group"
        assert len(groups) > 2


def test_forward_intermediates(built):
    _, model, x = built
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True, stop_early=True)
        normed, _ = model.forward_intermediates(x, norm=True)
        nhwc = model.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(inters) == len(model.feature_info)
    for feat, info in zip(inters, model.feature_info, strict=True):
        assert feat.shape[1] == info["num_chs"]
        assert feat.shape[-1] == -(-x.shape[-1] // info["reduction"])
    torch.testing.assert_close(only[0], inters[1])
    torch.testing.assert_close(only[1], inters[2])
    torch.testing.assert_close(nhwc[0], inters[-1].permute(0, 2, 3, 1))
    assert normed.shape == final.shape


def test_features_only(built):
    name, _, x = built
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [x.shape[-1] // f.shape[-1] for f in feats] == [4, 8, 16, 32]
    picked = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert picked.feature_info.reduction() == [8, 32]


def test_pretrained_cfg(built):
    _, model, _ = built
    cfg = model.pretrained_cfg
    for key in ("mean", "std", "input_size", "crop_pct", "interpolation", "paper_ids", "license", "url", "origin_url"):
        assert cfg.get(key), f"pretrained_cfg lacks {key}"
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert cfg["url"].startswith("https://")


def test_meta_device_construction(built):
    name, model, _ = built
    with torch.device("meta"):
        meta = timm.create_model(name)
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (3, 64, 64), (2, 3, 64)])
def test_bad_input_shape_raises(built, shape):
    _, model, _ = built
    with pytest.raises(ValueError, match=r"expected"):
        model(torch.randn(*shape))
