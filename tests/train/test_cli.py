"""The launcher (`train/cls.py`: `zoo.training.cli.main` over `ImageClassifier`) in-process: config composition,
--print_config, one-line errors, a short fit with its metrics, checkpoints and a safetensors export timm loads."""

from __future__ import annotations

import json
from functools import partial

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from zoo.training import ImageClassificationData, ImageClassifier
from zoo.training.cli import TaskCLI
from zoo.training.cli import main as cli_main

from ._util import ROOT, TINY, read_metrics

CONFIGS = ROOT / "configs" / "cls"
main = partial(cli_main, ImageClassifier, ImageClassificationData)  # train/cls.py
ClassificationCLI = partial(TaskCLI, ImageClassifier, ImageClassificationData)
TINY_KWARGS = dict(depths=[1, 1, 1, 1], embed_dims=[32, 32, 32, 32])
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


CLI_ARGV = ["train/cls.py"]  # the CLI parses `args`, not pytest's command line (tests/train/conftest.py)


def _exit(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _image_folder(root, classes=("cat", "dog", "owl"), per_class=(4, 2), formats=("PNG", "JPEG", "WEBP", "BMP")):
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                fmt = formats[i % len(formats)]
                color = (60 * c, 255 - 40 * i, 120)
                Image.new("RGB", (40 + 3 * i, 36), color).save(folder / f"{i}.{fmt.lower()}", format=fmt)
    return root


def test_print_config_composes_model_data_and_overrides(capsys):
    code, out, _ = _exit(
        [
            f"--config={CONFIGS / 'models' / 'zoo_biformer_t.yaml'}",
            f"--config={CONFIGS / 'data' / 'digits.yaml'}",
            "--trainer.max_epochs=5",
            "--model.lr=1e-3",
            "--print_config",
        ],
        capsys,
    )
    assert code == 0
    config = yaml.safe_load(out)
    assert config["model"]["model_name"] == "zoo_biformer_t"
    assert config["model"]["lr"] == 1e-3  # command line over the data file's 2e-3
    assert config["model"]["drop_path_rate"] == 0.0  # the data file, given later, over the model file
    assert config["trainer"]["max_epochs"] == 5
    assert config["data"]["root"] is None and config["data"]["image_size"] == 32
    assert config["checkpoint"]["monitor"] == "val/acc1"


@pytest.mark.parametrize(
    "whole, parts",
    [
        *(
            (p.name, (f"models/{p.name[: -len('_digits.yaml')]}.yaml", "data/digits.yaml"))
            for p in CONFIGS.glob("*_digits.yaml")
        ),
        ("zoo_biformer_t_in1k.yaml", ("models/zoo_biformer_t.yaml", "data/imagenet.yaml")),
        ("zoo_biformer_s_in1k.yaml", ("models/zoo_biformer_s.yaml", "data/imagenet.yaml")),
        ("zoo_biformer_b_in1k.yaml", ("models/zoo_biformer_b.yaml", "data/imagenet.yaml")),
    ],
)
def test_recipe_is_the_composition_of_its_parts(capsys, whole, parts):
    _, composed, _ = _exit([*(f"--config={CONFIGS / p}" for p in parts), "--print_config"], capsys)
    _, written, _ = _exit([f"--config={CONFIGS / whole}", "--print_config"], capsys)
    assert yaml.safe_load(written) == yaml.safe_load(composed)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--model.lrr=1"], "--model.lrr"),
        (["--model.lr=fast"], "model.lr"),
        (["--trainer.max_epochs=many"], "trainer.max_epochs"),
        (["--data.root={tmp}/missing"], "missing"),
        (["--data.root={tmp}/empty_class"], "owl"),
        (["--config={tmp}/typo.yaml"], "image_sise"),
        (["--model.model_name=zoo_no_such_model"], "zoo_no_such_model"),
    ],
)
def test_bad_settings_stop_before_training_with_one_line(tmp_path, capsys, args, named):
    (tmp_path / "typo.yaml").write_text("data:\n  image_sise: 64\n")
    _image_folder(tmp_path / "empty_class")
    for f in (tmp_path / "empty_class" / "val" / "owl").iterdir():
        f.unlink()
    code, out, err = _exit(
        [a.format(tmp=tmp_path) for a in args] + ["--trainer.max_epochs=1"] * ("max" not in args[0]), capsys
    )
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in err and "Epoch" not in out


def test_fit_writes_metrics_checkpoints_and_a_safetensors_timm_loads(tmp_path):
    main([*TINY, *SHORT, "--trainer.limit_train_batches=3", f"--trainer.default_root_dir={tmp_path}"])
    run = tmp_path / "lightning_logs" / "version_0"
    rows = read_metrics(run / "metrics.csv")
    assert {"val/acc1", "val/acc5", "val/loss", "train/loss"} <= set(rows[0])
    assert sum(bool(r["train/loss"]) for r in rows) == 3 and sum(bool(r["val/acc1"]) for r in rows) == 1
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(p.startswith("epoch=0-acc1=") for p in checkpoints)
    best = next(run.glob("checkpoints/epoch=*.ckpt"))
    trained = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]

    path = run / "best.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["model_name"] == "zoo_biformer_t" and meta["num_classes"] == "10"
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    model = timm.create_model(
        "zoo_biformer_t",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        num_classes=10,
        **TINY_KWARGS,
    )
    loaded = model.state_dict()
    assert loaded.keys() == {k[len("model.") :] for k in trained if k.startswith("model.")}
    for key, value in loaded.items():
        assert torch.equal(value, trained["model." + key]), key


def test_any_timm_model_trains_in_bf16_and_exports(tmp_path):
    main(
        [
            *TINY,
            *SHORT,
            "--model.model_name=test_convnext",
            "--model.model_kwargs=null",
            "--trainer.precision=bf16-mixed",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    path = tmp_path / "lightning_logs" / "version_0" / "best.safetensors"
    model = timm.create_model(
        "test_convnext", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), num_classes=10
    )
    best = next((path.parent / "checkpoints").glob("epoch=*.ckpt"))
    trained = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.get_classifier().weight, trained["model.head.fc.weight"])


def test_image_folder_root_sets_the_classes(tmp_path):
    root = _image_folder(tmp_path / "data")
    cli = ClassificationCLI(
        args=[*TINY, *SHORT, f"--data.root={root}", "--data.batch_size=4", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    assert cli.datamodule.classes == ["cat", "dog", "owl"]
    assert cli.model.model.get_classifier().out_features == 3
    cli.fit()
    with safe_open(tmp_path / "lightning_logs" / "version_0" / "best.safetensors", "pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["cat", "dog", "owl"]
        assert f.get_tensor("head.fc.weight").shape[0] == 3


def test_non_finite_loss_stops_naming_the_step(tmp_path, capsys):
    # An absurd learning rate keeps step 0 finite and overflows every weight it updates.
    code, _, err = _exit([*TINY, *SHORT, "--model.lr=1e30", f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert code == 1
    assert "non-finite training loss (nan) at step 1 (epoch 0, batch 1)" in err


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_builds(tmp_path, monkeypatch, name):
    create_model = timm.create_model

    def on_meta(*args, **kwargs):  # full-size ImageNet models, built without allocating their weights
        with torch.device("meta"):
            return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", on_meta)
    args = [f"--config={CONFIGS / name}", f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu"]
    args += ["--trainer.devices=1", "--trainer.strategy=auto"]
    args += ["--model.ema_decay=null", "--model.ema_validate=false"]  # timm's EMA needs real weights
    if not name.endswith("_digits.yaml"):
        args.append(f"--data.root={_image_folder(tmp_path / 'data')}")
    fine_tune = yaml.safe_load((CONFIGS / name).read_text()).get("model", {}).get("pretrained", False)
    if fine_tune:
        args.append("--model.pretrained=false")  # the authors' pre-trained file is not here
    cli = ClassificationCLI(args=args, run=False)
    assert cli.model.hparams.model_name == name.rsplit("_", 1)[0]
    assert cli.model.model.get_classifier().out_features == cli.datamodule.num_classes
    if name.endswith("_in1k.yaml"):
        assert cli.config.data.image_size == 224
        # 300 epochs from scratch; the 22k -> 1k fine-tunings (CSWin-L) 30
        assert cli.config.trainer.max_epochs - cli.config.model.cooldown_epochs == (30 if fine_tune else 300)


@pytest.mark.parametrize("size, drop_path", [("t", 0.1), ("s", 0.2), ("b", 0.4)])
def test_davit_recipes_compose_and_follow_the_paper(capsys, size, drop_path):
    parts = (f"models/zoo_davit_{size}.yaml", "data/imagenet.yaml")
    _, written, _ = _exit([f"--config={CONFIGS / f'zoo_davit_{size}_in1k.yaml'}", "--print_config"], capsys)
    config = yaml.safe_load(written)
    assert config["model"]["drop_path_rate"] == drop_path
    assert config["model"]["lr"] * 1024 / (config["trainer"]["devices"] * config["data"]["batch_size"]) == 1e-3
    assert config["trainer"]["gradient_clip_val"] == 1.0 and config["model"]["ema_decay"] is None
    _, composed, _ = _exit([*(f"--config={CONFIGS / p}" for p in parts), "--print_config"], capsys)
    assert yaml.safe_load(composed)["model"]["drop_path_rate"] == drop_path


def test_cswin_l_fine_tuning_slows_all_but_the_new_head(tmp_path):
    args = [f"--config={CONFIGS / 'zoo_cswin_l_in1k.yaml'}", f"--data.root={_image_folder(tmp_path / 'data')}"]
    args += ["--model.pretrained=false", "--model.model_name=zoo_cswin_t", "--model.ema_decay=null"]
    args += ["--model.ema_validate=false", "--trainer.accelerator=cpu", "--trainer.devices=1"]
    args += ["--trainer.strategy=auto", f"--trainer.default_root_dir={tmp_path}"]
    cli = ClassificationCLI(args=args, run=False)
    model = cli.model.model
    groups = cli.model.optimizer_params()
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert {scale[id(p)] for n, p in model.named_parameters() if n.startswith("head.")} == {1.0}
    assert {scale[id(p)] for n, p in model.named_parameters() if not n.startswith("head.")} == {0.05}
    assert model.stages[0].grad_checkpointing  # --use-chk


def test_lr_scales_slow_down_the_matching_parameters(tmp_path):
    cli = ClassificationCLI(
        args=[
            *TINY,
            *SHORT,
            "--model.lr_scales={'^stem\\.\\d+\\.weight$': 0.01}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    cli.fit()
    stem = {id(p) for n, p in cli.model.model.named_parameters() if n.startswith("stem.") and n.endswith(".weight")}
    groups = cli.trainer.optimizers[0].param_groups
    scaled = [g for g in groups if g["lr_scale"] == 0.01]
    assert {id(p) for g in scaled for p in g["params"]} == {i for i in stem}
    full = [g for g in groups if g["lr_scale"] == 1.0]
    assert all(g["lr"] == pytest.approx(0.01 * full[0]["lr"]) for g in scaled)
    assert {g["weight_decay"] for g in full} == {0.0, 0.05}  # norms and biases still spared


def test_fsdp_is_a_config_away(capsys):
    # FSDP itself needs GPUs; here the composed config must resolve to Lightning's FSDPStrategy.
    args = [f"--config={CONFIGS / 'zoo_maxvit_l_in1k.yaml'}", f"--config={CONFIGS / 'strategy' / 'fsdp.yaml'}"]
    _, out, _ = _exit([*args, "--model.grad_checkpointing=true", "--print_config"], capsys)
    config = yaml.safe_load(out)
    assert config["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert config["trainer"]["strategy"]["init_args"]["sharding_strategy"] == "FULL_SHARD"
    assert config["model"]["grad_checkpointing"] is True and config["model"]["model_name"] == "zoo_maxvit_l"
