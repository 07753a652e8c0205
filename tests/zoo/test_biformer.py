"""BiFormer: sizes, official checkpoints, numerics against the official computation, input sizes."""

from __future__ import annotations

import argparse
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import zoo  # noqa: F401
from tests.anchors.biformer_official import (
    official_biformer_forward,
    official_biformer_shapes,
    random_official_state_dict,
)

# Parameter counts of the official model definitions (rayleizhu/BiFormer models/biformer.py) and the paper's GFLOPs.
OFFICIAL = {"t": (13.143, 2.2), "s": (25.536, 4.5), "b": (56.805, 9.8)}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("size", ["t", "s", "b"])
def test_parameters_match_official_and_gflops_match_paper(size):
    with torch.device("meta"):
        model = timm.create_model(f"zoo_biformer_{size}").eval()
        params = sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert round(params / 1e6, 3) == OFFICIAL[size][0]
    official = official_biformer_shapes(size)
    assert params == sum(torch.Size(s).numel() for k, s in official.items() if "running" not in k and s)
    gmacs = counter.get_total_flops() / 2e9  # multiply-adds, the papers' "FLOPs"
    assert abs(gmacs / OFFICIAL[size][1] - 1) < 0.05


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """An official-layout release file: weights under "model", plus the extras the authors' script saves."""
    sd = random_official_state_dict("t")
    path = tmp_path_factory.mktemp("ckpt") / "biformer_tiny_in1k.pth"
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save(
        {"model": sd, "model_ema": ema, "optimizer": {"state": {}}, "epoch": 299, "args": argparse.Namespace(lr=5e-4)},
        path,
    )
    return sd, path


def test_official_release_file_reproduces_official_logits(official_tiny):
    sd, path = official_tiny
    model = timm.create_model("zoo_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _rel_err(model(x), official_biformer_forward(sd, x, "t")) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 3, 200, 328), (1, 3, 32, 32), (3, 3, 97, 65)])
def test_odd_sizes_match_official_auto_pad(official_tiny, shape):
    sd, path = official_tiny
    model = timm.create_model("zoo_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (shape[0], 1000)
        assert _rel_err(out, official_biformer_forward(sd, x, "t")) <= 1e-5


def test_too_small_input_raises():
    model = timm.create_model("zoo_biformer_t").eval()
    with pytest.raises(ValueError, match=r"H, W >= 32, got \(1, 3, 31, 64\)"):
        model(torch.randn(1, 3, 31, 64))


def test_pretrained_with_other_num_classes_keeps_backbone(official_tiny):
    sd, path = official_tiny
    model = timm.create_model(
        "zoo_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10
    )
    assert model.get_classifier().out_features == 10
    torch.testing.assert_close(model.stem[0].weight, sd["downsample_layers.0.0.weight"])


def test_missing_key_is_named(tmp_path):
    sd = random_official_state_dict("t")
    del sd["stages.2.5.attn.lepe.weight"]
    torch.save({"model": sd}, tmp_path / "c.pth")
    with pytest.raises(KeyError, match=r"stages\.2\.blocks\.5\.attn\.lepe\.weight"):
        timm.create_model("zoo_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "c.pth")))


def test_left_over_key_is_named(tmp_path):
    sd = random_official_state_dict("t")
    sd["stages.0.0.attn.router.emb.weight"] = torch.zeros(64, 64)
    torch.save({"model": sd}, tmp_path / "c.pth")
    with pytest.raises(KeyError, match=r"router\.emb\.weight"):
        timm.create_model("zoo_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "c.pth")))


def test_checkpoint_of_another_size_is_refused(tmp_path):
    torch.save({"model": random_official_state_dict("t")}, tmp_path / "t.pth")
    with pytest.raises(KeyError, match=r"missing keys \['stages\.0\.blocks\.2"):
        timm.create_model("zoo_biformer_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "t.pth")))
    torch.save({"model": random_official_state_dict("b")}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"wrong shape, first: \['stem\.0\.weight"):
        timm.create_model("zoo_biformer_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "b.pth")))


class _Exploit:
    """Pickles to a call of os.system: loading must not run it."""

    def __reduce__(self):
        import os

        return os.system, ("touch PWNED_BY_CHECKPOINT",)


def test_loading_never_executes_code_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd = random_official_state_dict("t")
    torch.save({"model": sd, "payload": _Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load evil\.pth: .*system"):
        timm.create_model("zoo_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file="evil.pth"))
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_safetensors_export_round_trip(tmp_path):
    model = timm.create_model("zoo_biformer_t").eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = timm.create_model(
        "zoo_biformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors"))
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_fine_tuned_export_keeps_its_classifier(tmp_path):
    model = timm.create_model("zoo_biformer_t", num_classes=10).eval()
    save_file(model.state_dict(), tmp_path / "best.safetensors")
    loaded = timm.create_model(
        "zoo_biformer_t",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "best.safetensors")),
        num_classes=10,
    ).eval()
    torch.testing.assert_close(loaded.head.fc.weight, model.head.fc.weight, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton", "flex", "masked"])
def test_every_kernel_backend_gives_the_same_logits_and_grads(backend, monkeypatch, caplog):
    # A narrow BiFormer with 2x2 regions: the Triton interpreter runs one program per (image, head, region).
    # Compared with the gather path (CPU training's); FlexAttention has no CPU backward: forward only.
    model = timm.create_model(
        "zoo_biformer_t", depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), n_win=2, topks=(1, 2, 3, -2)
    ).eval()
    x = torch.randn(2, 3, 64, 96)
    results = []
    for name in ("gather", backend):
        monkeypatch.setenv("ZOO_KERNELS", name)
        model.zero_grad()
        caplog.clear()
        with caplog.at_level("DEBUG", logger="zoo.kernels"), torch.set_grad_enabled(name != "flex"):
            out = model(x)
        assert f"block_sparse_attention: {name} path" in caplog.text
        if name != "flex":
            out.square().mean().backward()
        results.append((out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    if backend != "flex":
        for got, want in zip(results[1][1], results[0][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
