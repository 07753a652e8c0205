"""Recipes composed from parts (`config: [...]` in a config file) and the one launcher over every task: each
ImageNet-1k recipe resolves to the values it held when it was written out whole, the composition rules (order,
relative paths, the file's own keys last, nested parts), and the one-line errors of bad parts."""

from __future__ import annotations

from functools import partial

import pytest
import yaml

from zoo.training import ImageClassificationData, ImageClassifier, SegmentationData, SemanticSegmentation
from zoo.training.cli import main as cli_main

from ._util import ROOT, TINY

CONFIGS = ROOT / "configs" / "cls"
main = partial(cli_main, ImageClassifier, ImageClassificationData)  # train/cls.py

# Where each family's ImageNet-1k recipe departs from models/<name>.yaml + data/imagenet.yaml (DeiT's recipe),
# resolved, as the recipes read when each was written out whole (before they were composed from parts).
_CSWIN = {
    "trainer.max_epochs": 310,
    "trainer.use_distributed_sampler": True,
    "model.warmup_epochs": 20.0,
    "model.cooldown_epochs": 10,
    "model.ema_validate": True,
    "data.num_workers": 8,
    "data.interpolation": "random",
    "data.crop_pct": 0.9,
    "data.repeated_aug": 0,
}
_SWIN_LIKE = {
    "trainer.use_distributed_sampler": True,
    "model.warmup_epochs": 20.0,
    "model.step_on_epochs": False,
    "model.ema_decay": None,
    "data.repeated_aug": 0,
}
_DAVIT = {**_SWIN_LIKE, "trainer.gradient_clip_val": 1.0, "data.num_workers": 8}
_FOCALNET = {**_SWIN_LIKE, "trainer.gradient_clip_val": 5.0, "model.opt_betas": [0.9, 0.999], "data.num_workers": 8}
_LITV2 = {
    **_SWIN_LIKE,
    "trainer.gradient_clip_val": 5.0,
    "model.opt_betas": [0.9, 0.999],
    "model.lr_scales": {r"downsample\.offset\.weight$": 0.01},
}
_MAXVIT = {
    "trainer.precision": "bf16-mixed",
    "trainer.gradient_clip_val": 1.0,
    "trainer.use_distributed_sampler": True,
    "model.lr": 0.003,
    "model.opt_eps": None,
    "model.warmup_epochs": 32.0,
    "model.warmup_lr": 0.0,
    "model.step_on_epochs": False,
    "model.cutmix": 0.0,
    "model.ema_decay": 0.9999,
    "model.ema_validate": True,
    "data.batch_size": 512,
    "data.color_jitter": None,
    "data.auto_augment": "rand-m15-n2",
    "data.re_prob": 0.0,
    "data.repeated_aug": 0,
}
_CSWIN_TS = {**_CSWIN, "model.lr": 0.002, "model.ema_decay": 0.99984, "data.batch_size": 256}
DEPARTURES = {
    **{f"zoo_biformer_{s}": {} for s in "tsb"},
    "zoo_cswin_t": _CSWIN_TS,
    "zoo_cswin_s": _CSWIN_TS,
    "zoo_cswin_b": {**_CSWIN, "model.weight_decay": 0.1, "model.ema_decay": 0.99992},
    "zoo_cswin_l": {
        **_CSWIN,
        "trainer.max_epochs": 40,
        "model.pretrained": True,
        "model.pretrained_file": "cswin_large_22k_224.pth",
        "model.grad_checkpointing": True,
        "model.lr": 0.00025,
        "model.weight_decay": 1e-08,
        "model.lr_scales": {r"^(?!head\.)": 0.05},
        "model.warmup_epochs": 0.0,
        "model.min_lr": 5e-07,
        "model.mixup": 0.01,
        "model.cutmix": 0.3,
        "model.ema_decay": 0.9996,
        "data.batch_size": 64,
    },
    **{f"zoo_davit_{s}": _DAVIT for s in "tsb"},
    **{f"zoo_focalnet_{s}{srf}": _FOCALNET for s in "tsb" for srf in ("", "_srf")},
    **{f"zoo_litv2_{s}": _LITV2 for s in "smb"},
    **{f"zoo_maxvit_{s}": _MAXVIT for s in "tsbl"},
}


CLI_ARGV = ["train/cls.py"]  # the CLI parses `args`, not pytest's command line (tests/train/conftest.py)


def _print_config(args, capsys, launch=main) -> dict:
    with pytest.raises(SystemExit) as info:
        launch([*args, "--print_config"])
    out, err = capsys.readouterr()
    assert info.value.code == 0, err
    return yaml.safe_load(out)


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and "class_path" not in value and key not in ("lr_scales", "model_kwargs"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_every_in1k_recipe_is_in_the_table():
    assert sorted(p.name[: -len("_in1k.yaml")] for p in CONFIGS.glob("*_in1k.yaml")) == sorted(DEPARTURES)


@pytest.mark.parametrize("name", sorted(DEPARTURES))
def test_in1k_recipe_resolves_to_its_model_imagenet_and_the_papers_departures(capsys, name):
    recipe = _flat(_print_config([f"--config={CONFIGS / f'{name}_in1k.yaml'}"], capsys))
    parts = [f"--config={CONFIGS / 'models' / f'{name}.yaml'}", f"--config={CONFIGS / 'data' / 'imagenet.yaml'}"]
    expected = _flat(_print_config(parts, capsys)) | DEPARTURES[name]
    assert recipe["model.model_name"] == name
    assert {k: v for k, v in recipe.items() if expected.get(k, "<absent>") != v} == {}
    assert recipe.keys() == expected.keys()


def test_config_key_reads_its_parts_in_order_then_the_files_own_keys(tmp_path, capsys):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.yaml").write_text("model:\n  lr: 0.5\n  drop_path_rate: 0.3\ntrainer:\n  max_epochs: 7\n")
    # A part may have parts of its own, relative to itself.
    (tmp_path / "parts" / "b.yaml").write_text("config: a.yaml\nmodel:\n  lr: 0.25\n  weight_decay: 0.01\n")
    (tmp_path / "recipe.yaml").write_text("config: [parts/b.yaml]\nmodel:\n  weight_decay: 0.02\n")
    config = _print_config([f"--config={tmp_path / 'recipe.yaml'}", "--trainer.max_epochs=9"], capsys)
    assert config["model"]["drop_path_rate"] == 0.3  # a, kept through b and the recipe
    assert config["model"]["lr"] == 0.25  # b over a
    assert config["model"]["weight_decay"] == 0.02  # the recipe's own key over b's, key by key
    assert config["trainer"]["max_epochs"] == 9  # the command line over all of them
    assert "config" not in config


@pytest.mark.parametrize(
    "files, named",
    [
        ({"recipe.yaml": "config: [missing.yaml]\n"}, "missing.yaml"),
        ({"recipe.yaml": "config: a.yaml\n", "a.yaml": "config: recipe.yaml\n"}, "include each other"),
        ({"recipe.yaml": "config: {a: 1}\n"}, "config: expected a path or a list of paths"),
        ({"recipe.yaml": "config: a.yaml\n", "a.yaml": "model:\n  lrr: 1\n"}, "lrr"),
    ],
)
def test_bad_parts_stop_with_one_line_naming_them(tmp_path, capsys, files, named):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as info:
        main([f"--config={tmp_path / 'recipe.yaml'}", "--trainer.max_epochs=1"])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in err


def test_validate_of_a_task_without_it_stops_with_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(SemanticSegmentation, SegmentationData, ["validate", "--trainer.accelerator=cpu"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: validate: SemanticSegmentation has no validate subcommand; it only fits"]


def test_fit_subcommand_is_the_default(tmp_path, capsys):
    # `train/cls.py fit ...` and `train/cls.py ...` resolve alike.
    args = [*TINY, f"--trainer.default_root_dir={tmp_path}"]
    assert _print_config(["fit", *args], capsys) == _print_config(args, capsys)
