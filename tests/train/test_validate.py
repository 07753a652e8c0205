"""`python train/cls.py validate`: evaluation only, timm validate.py's report, the model's own eval transform;
the hub-style folder the fit exports beside best.safetensors."""

from __future__ import annotations

import json
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import save_file

from zoo.training import ImageClassificationData, ImageClassifier
from zoo.training.cli import TaskCLI
from zoo.training.cli import main as cli_main

from ._util import TINY, read_metrics, val_rows

RECIPE = "configs/cls/zoo_biformer_t_digits.yaml"
main = partial(cli_main, ImageClassifier, ImageClassificationData)  # train/cls.py
ClassificationCLI = partial(TaskCLI, ImageClassifier, ImageClassificationData)


def _results(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def test_validate_reproduces_the_fits_best_val_acc1(tmp_path, capsys):
    fit = ["--config", RECIPE, *TINY, "--trainer.max_epochs=2", "--trainer.limit_train_batches=4"]
    main([*fit, f"--trainer.default_root_dir={tmp_path / 'fit'}"])
    run = tmp_path / "fit" / "lightning_logs" / "version_0"
    best = max(v["val/acc1"] for v in val_rows(read_metrics(run / "metrics.csv")).values())
    capsys.readouterr()
    main(
        [
            "validate",
            "--config",
            RECIPE,
            *TINY,
            f"--model.pretrained_file={run / 'best.safetensors'}",
            f"--trainer.default_root_dir={tmp_path / 'eval'}",
        ]
    )
    out = capsys.readouterr().out
    results = _results(out)
    assert " * Acc@1 " in out
    assert results["top1"] == pytest.approx(100 * best, abs=1e-4)
    assert results["images"] == 360 and 0 < results["top1"] <= results["top5"] <= 100 and results["loss"] > 0
    # Evaluation only: no training step ran, no checkpoint was written.
    rows = read_metrics(tmp_path / "eval" / "lightning_logs" / "version_0" / "metrics.csv")
    assert not any(r.get("train/loss") for r in rows)
    assert not list((tmp_path / "eval").rglob("*.ckpt"))

    # The fit's export also wrote a hub-style folder: the same weights, its classes and its eval transform.
    folder = run / "hub"
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    exported = timm.create_model(
        "zoo_biformer_t",
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(file=str(run / "best.safetensors"), num_classes=10),
        depths=(1, 1, 1, 1),
        embed_dims=(32, 32, 32, 32),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), exported(x), rtol=0, atol=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["label_names"] == [str(i) for i in range(10)]
    data = timm.data.resolve_data_config({}, model=loaded)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 1.0 and data["interpolation"] == "bilinear"
    assert tuple(data["mean"]) == (0.5, 0.5, 0.5)
    assert f"val top-1 (%): {round(100 * best, 3)}" in (folder / "README.md").read_text()


def _weights(tmp_path) -> str:
    model = timm.create_model("zoo_biformer_t", num_classes=10, depths=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32))
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return str(path)


def test_validate_takes_the_models_eval_transform_unless_overridden(tmp_path):
    common = [*TINY[:2], "--trainer.accelerator=cpu", f"--model.pretrained_file={_weights(tmp_path)}"]
    cli = ClassificationCLI(args=common, run=False, mode="validate")
    with torch.device("meta"):
        cfg = timm.data.resolve_data_config({}, model=timm.create_model("zoo_biformer_t"))
    data = cli.datamodule.hparams
    assert (data.image_size, data.crop_pct, data.interpolation) == (224, cfg["crop_pct"], cfg["interpolation"])
    assert tuple(data.mean) == tuple(cfg["mean"]) and tuple(data.std) == tuple(cfg["std"])
    assert cli.model.hparams.pretrained
    cli = ClassificationCLI(args=[*common, "--data.crop_pct=0.5", "--data.image_size=64"], run=False, mode="validate")
    assert (cli.datamodule.hparams.crop_pct, cli.datamodule.hparams.image_size) == (0.5, 64)
    # A model created at another size is evaluated at that size.
    resized = "--model.model_kwargs={depths: [1, 1, 1, 1], embed_dims: [32, 32, 32, 32], img_size: 96}"
    cli = ClassificationCLI(args=[*common, resized], run=False, mode="validate")
    assert cli.datamodule.hparams.image_size == 96 and cli.model.model.img_size == (96, 96)


def test_validate_needs_weights(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *TINY])
    assert exit_info.value.code == 2
    assert "--model.pretrained_file" in capsys.readouterr().err
