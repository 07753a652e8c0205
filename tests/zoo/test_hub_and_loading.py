"""Hub-style folders (`timm.create_model("local-dir:PATH")`) and timm's loading conventions: input-channel
adaptation, legacy torch.save files, unreadable files named, no download for `pretrained=True` without a file."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

import zoo  # noqa: F401
from zoo.hub import save_hub_folder
from zoo.models._contract import expected_weight_path

TINY = {
    "zoo_biformer_t": dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32)),
    "zoo_maxvit_t": dict(depths=(1, 1, 1, 1)),
    "zoo_davit_t": dict(depths=(1, 1, 1, 1)),
    "zoo_focalnet_t": dict(depths=(1, 1, 1, 1)),
    "zoo_cswin_t": dict(depths=(1, 1, 1, 1)),
    "zoo_litv2_s": dict(depths=(1, 1, 1, 1)),
}


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(TINY[name], **kwargs)).eval()


@pytest.mark.parametrize("name", sorted(TINY))
def test_local_dir_round_trip(name, tmp_path):
    model = _model(name, num_classes=4)
    folder = save_hub_folder(model, tmp_path / name, label_names=["a", "b", "c", "d"], metrics={"top-1": 50.0})
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 4 and config["label_names"] == list("abcd")
    card = (folder / "README.md").read_text()
    assert f"# Model card for {name}" in card and "top-1: 50.0" in card and "local-dir:" in card
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert type(loaded) is type(model) and loaded.num_classes == 4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # Without pretrained=True the folder gives the architecture (its arguments), not the weights.
    fresh = timm.create_model(f"local-dir:{folder}")
    assert fresh.num_classes == 4 and sum(p.numel() for p in fresh.parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_local_dir_keeps_a_new_input_size(tmp_path):
    model = _model("zoo_maxvit_t", num_classes=3)
    model.set_input_size(img_size=384)
    folder = save_hub_folder(model, tmp_path / "m")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert loaded.img_size == (384, 384) and loaded.stages[0].blocks[0].attn_grid.attn.size == (12, 12)
    assert timm.data.resolve_data_config({}, model=loaded)["input_size"] == (3, 384, 384)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_local_dir_without_weights_names_the_folder(tmp_path):
    folder = save_hub_folder(_model("zoo_focalnet_t"), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"local-dir:{folder} holds no weight file"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("in_chans", [1, 5])
def test_in_chans_adapts_the_stem_as_timm(name, in_chans, tmp_path):
    source = _model(name)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=in_chans, **TINY[name]
    )
    stem = model.pretrained_cfg["first_conv"] + ".weight"
    assert model.state_dict()[stem].shape[1] == in_chans
    torch.testing.assert_close(model.state_dict()[stem], adapt_input_conv(in_chans, source.state_dict()[stem]))
    others = [k for k in source.state_dict() if k != stem and not k.startswith("head.fc")]
    assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in others)
    assert model(torch.randn(1, in_chans, 64, 64)).shape == (1, 1000)


def test_legacy_torch_save_loads_through_the_same_path(tmp_path):
    source = _model("zoo_davit_t")
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": source.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    model = timm.create_model(
        "zoo_davit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(legacy)), **TINY["zoo_davit_t"]
    )
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def _bad_files(tmp_path, good: str) -> dict[str, str]:
    data = open(good, "rb").read()
    files = {
        "empty.pth": b"",
        "truncated.pth": data[: len(data) // 2],
        "text.pth": b"not a checkpoint\n",
        "empty.safetensors": b"",
    }
    paths = {}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        paths[name] = str(tmp_path / name)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "no_weights.pth")
    paths.update(list=str(tmp_path / "list.pth"), no_weights=str(tmp_path / "no_weights.pth"))
    return paths


def test_unreadable_files_raise_one_error_naming_the_path(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_model("zoo_litv2_s").state_dict(), good)
    for label, path in _bad_files(tmp_path, str(good)).items():
        with pytest.raises(ValueError) as info:
            timm.create_model(
                "zoo_litv2_s", pretrained=True, pretrained_cfg_overlay=dict(file=path), **TINY["zoo_litv2_s"]
            )
        assert path in str(info.value), label
        assert info.value.__cause__ is None, label  # one error, not a chain of library tracebacks


def test_pretrained_without_a_file_says_where_to_put_it_and_downloads_nothing(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(FileNotFoundError) as info:
        timm.create_model("zoo_cswin_t", pretrained=True)
    message = str(info.value)
    cfg = timm.models.get_pretrained_cfg("zoo_cswin_t.in1k")
    expected = os.path.join(str(home), "hub", "checkpoints", "zoo_cswin_t.in1k.pth")
    assert cfg.url in message and expected in message and "pretrained_cfg_overlay=dict(file=PATH)" in message
    assert not home.exists()  # no empty cache folder either
    # A file put there is used.
    os.makedirs(os.path.dirname(expected))
    source = _model("zoo_cswin_t")
    torch.save({"state_dict_ema": source.state_dict()}, expected)
    assert expected_weight_path(cfg) == expected
    model = timm.create_model("zoo_cswin_t", pretrained=True, **TINY["zoo_cswin_t"])
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_registered_384_model_round_trips_and_takes_another_size(tmp_path):
    model = timm.create_model("zoo_maxvit_t_384", depths=(1, 1, 1, 1), num_classes=2).eval()
    folder = save_hub_folder(model, tmp_path / "m")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert loaded.img_size == (384, 384) and loaded.pretrained_cfg["input_size"] == (3, 384, 384)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert timm.create_model("zoo_maxvit_t_384", img_size=512, depths=(1, 1, 1, 1)).img_size == (512, 512)
