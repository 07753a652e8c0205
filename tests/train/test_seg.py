"""The segmentation recipe (`train/seg.py`: `zoo.training.cli.main` over `SemanticSegmentation`) in-process: the
digits canvases, an ADE20K-style tree and its one-line errors, a short fit with metrics.csv, checkpoints, resume
and the safetensors export, and the recipe files composing."""

from __future__ import annotations

import json
import os
from functools import partial

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from zoo.training.cli import TaskCLI
from zoo.training.cli import main as cli_main
from zoo.training.seg_data import (
    DigitsSegmentation,
    SegmentationData,
    SegmentationFolder,
    check_segmentation_folder,
)
from zoo.training.segmentation import SemanticSegmentation, SemanticSegmentationModel

from ._util import ROOT, read_metrics

CONFIGS = ROOT / "configs" / "seg"
main = partial(cli_main, SemanticSegmentation, SegmentationData)  # train/seg.py
SegmentationCLI = partial(TaskCLI, SemanticSegmentation, SegmentationData)
TINY_BACKBONE = dict(depths=[1, 1, 1, 1], embed_dims=[32, 32, 32, 32], n_win=4)
TINY_HEAD = dict(fpn_channels=32, head_channels=32)
# BiFormer-T's code path at 90 K parameters on 64 x 64 digit canvases: one fit step takes well under a second.
TINY = [
    "--model.model_name=zoo_biformer_t",
    "--model.model_kwargs={depths: [1, 1, 1, 1], embed_dims: [32, 32, 32, 32], n_win: 4}",
    "--model.fpn_channels=32",
    "--model.head_channels=32",
    "--model.lr=0.002",
    "--model.sched=cosine",
    "--model.warmup_epochs=0.5",
    "--data.image_size=64",
    "--data.scale=[1.0, 1.0]",
    "--data.hflip=0.0",
    "--data.mean=[0.5, 0.5, 0.5]",
    "--data.std=[0.5, 0.5, 0.5]",
    "--data.train_size=48",
    "--data.val_size=16",
    "--data.batch_size=8",
    "--data.val_batch_size=8",
    "--trainer.accelerator=cpu",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
]


class StopAfterEpoch(Callback):
    """Ends the fit after the given epoch, as an interrupted run would, keeping its epoch-end checkpoints."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


CLI_ARGV = ["train/seg.py"]  # the CLI parses `args`, not pytest's command line (tests/train/conftest.py)


def _exit(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _ade_tree(root, values=(0, 1, 2, 3), names=("train", "val")):
    """A tiny ADE20K-style tree: JPEG images, PNG annotations of class indices, sizes differing per image."""
    sizes = {names[0]: [(40, 56), (48, 40), (36, 36)], names[1]: [(44, 60), (40, 36)]}
    rng = np.random.default_rng(0)
    for split, shapes in sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{name}.jpg"
            )
            labels = rng.choice(np.array(values, dtype=np.uint8), size=(h, w))
            Image.fromarray(labels, mode="L").save(root / "annotations" / split / f"{name}.png")
    return root


def test_digit_canvases_are_fixed_labelled_by_ink_and_aligned_to_stride_4():
    a, b = DigitsSegmentation("val", 20), DigitsSegmentation("val", 20)
    image, mask = a[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and mask.shape == (64, 64)
    for i in range(20):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
        m = a[i][1]
        assert 0 <= m.min() and m.max() <= 10 and (m > 0).any()
        # Labels are constant on the 4 x 4 cells of one digit pixel, the stride of the finest feature map.
        cells = m.reshape(16, 4, 16, 4)
        assert torch.equal(cells, cells[:, :1, :, :1].expand_as(cells))
    # Ink under every labelled pixel, darkness under most background.
    images = torch.stack([a[i][0][0] for i in range(20)]).float()
    masks = torch.stack([a[i][1] for i in range(20)])
    assert images[masks > 0].mean() > 100 and images[masks == 0].mean() < 30
    train = DigitsSegmentation("train", 20)
    assert not torch.equal(train[0][1], a[0][1])  # another seed stream and other digits


def test_ade_tree_pairs_and_reduce_zero_label(tmp_path):
    root = _ade_tree(tmp_path / "ade", values=(0, 1, 2, 255))
    pairs = check_segmentation_folder(str(root))
    assert [len(pairs[s]) for s in ("train", "val")] == [3, 2]
    assert all(os.path.basename(i)[:-4] == os.path.basename(a)[:-4] for i, a in pairs["train"])
    plain = SegmentationFolder(pairs["train"], num_classes=3, ignore_index=255)
    reduced = SegmentationFolder(pairs["train"], num_classes=2, ignore_index=255, reduce_zero_label=True)
    raw = np.asarray(Image.open(pairs["train"][0][1])).astype(np.int64)
    image, mask = reduced[0]
    assert image.shape == (3, 40, 56) and mask.shape == (40, 56)
    expected = np.where(raw == 0, 255, raw - 1)
    expected[raw == 255] = 255
    assert np.array_equal(mask.numpy(), expected)
    assert np.array_equal(plain[0][1].numpy(), raw)
    with pytest.raises(ValueError, match=r"class index 2 >= data.num_classes \(2\)"):
        SegmentationFolder(pairs["train"], num_classes=2, ignore_index=255)[0]


def test_head_gives_logits_at_input_size_for_odd_non_square_inputs():
    model = SemanticSegmentationModel("zoo_biformer_t", 5, model_kwargs=TINY_BACKBONE, **TINY_HEAD).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 70, 45))
    assert logits.shape == (2, 5, 70, 45)


@pytest.mark.parametrize(
    "tree, args, named",
    [
        (None, ["--data.root={tmp}/missing", "--data.num_classes=4"], "missing"),
        ("ade", ["--data.root={tmp}/ade"], "data.num_classes"),
        ("no_val_annotations", ["--data.root={tmp}/ade", "--data.num_classes=4"], "annotations/val"),
        ("lone_image", ["--data.root={tmp}/ade", "--data.num_classes=4"], "ADE_train_00000009"),
        ("lone_annotation", ["--data.root={tmp}/ade", "--data.num_classes=4"], "ADE_val_00000001"),
        ("ade", ["--data.root={tmp}/ade", "--data.num_classes=4", "--data.ignore_index=3"], "data.ignore_index"),
        (None, ["--model.model_name=zoo_no_such_model"], "zoo_no_such_model"),
        (None, ["--model.lrr=1"], "--model.lrr"),
    ],
)
def test_bad_data_dirs_and_settings_stop_before_training_with_one_line(tmp_path, capsys, tree, args, named):
    if tree is not None:
        root = _ade_tree(tmp_path / "ade")
        if tree == "no_val_annotations":
            for f in (root / "annotations" / "val").iterdir():
                f.unlink()
            (root / "annotations" / "val").rmdir()
        elif tree == "lone_image":
            Image.new("RGB", (32, 32)).save(root / "images" / "train" / "ADE_train_00000009.jpg")
        elif tree == "lone_annotation":
            (root / "images" / "val" / "ADE_val_00000001.jpg").unlink()
    code, out, err = _exit([*TINY, *(a.format(tmp=tmp_path) for a in args)], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in err and "Epoch" not in out


def test_fit_writes_metrics_checkpoints_and_a_safetensors_export(tmp_path):
    main([*TINY, "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"])
    run = tmp_path / "lightning_logs" / "version_0"
    rows = read_metrics(run / "metrics.csv")
    assert {"train/loss", "train/lr", "val/loss", "val/miou", "val/pixel_acc"} <= set(rows[0])
    assert sum(bool(r["train/loss"]) for r in rows) == 3
    val = [r for r in rows if r["val/miou"]]
    assert len(val) == 1 and 0.0 <= float(val[0]["val/miou"]) <= 1.0 and float(val[0]["val/loss"]) > 0
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(p.startswith("epoch=0-miou=") for p in checkpoints)

    best = next(run.glob("checkpoints/epoch=*.ckpt"))
    trained = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    path = run / "best.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["model_name"] == "zoo_biformer_t" and meta["num_classes"] == "11"
    assert json.loads(meta["classes"]) == ["background", *map(str, range(10))]
    model = SemanticSegmentationModel("zoo_biformer_t", 11, model_kwargs=TINY_BACKBONE, **TINY_HEAD)
    exported = load_file(path)
    model.load_state_dict(exported, strict=True)
    assert exported.keys() == {k[len("model.") :] for k in trained if k.startswith("model.")}
    for key, value in exported.items():
        assert torch.equal(value, trained["model." + key]), key


def test_resume_from_last_repeats_the_uninterrupted_run(tmp_path):
    short = [*TINY, "--trainer.limit_val_batches=1", "--trainer.max_epochs=2"]
    main([*short, f"--trainer.default_root_dir={tmp_path / 'ref'}"])
    stop = tmp_path / "stop.yaml"
    stop.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.train.test_seg.StopAfterEpoch\n      init_args: {epoch: 0}\n"
    )
    main([*short, f"--config={stop}", f"--trainer.default_root_dir={tmp_path / 'split'}"])
    last = torch.load(
        tmp_path / "split" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert (last["epoch"], last["global_step"]) == (0, 3)
    main([*short, "--ckpt_path=last", f"--trainer.default_root_dir={tmp_path / 'split'}"])
    ref = read_metrics(tmp_path / "ref" / "lightning_logs" / "version_0" / "metrics.csv")
    # The resumed run logged on into version_0: one metrics.csv holds both epochs, as the uninterrupted run's.
    assert not (tmp_path / "split" / "lightning_logs" / "version_1").exists()
    resumed = read_metrics(tmp_path / "split" / "lightning_logs" / "version_0" / "metrics.csv")

    def by_step(rows, key):
        return {(int(r["epoch"]), int(r["step"])): float(r[key]) for r in rows if r[key]}

    assert [int(r["step"]) for r in resumed if r["train/loss"]] == [0, 1, 2, 3, 4, 5]
    for key in ("train/loss", "val/miou", "val/loss"):
        got, want = by_step(resumed, key), by_step(ref, key)
        assert got and got == pytest.approx(want, rel=1e-5, abs=1e-6), key


def test_real_tree_trains_and_scores_at_annotation_resolution(tmp_path):
    root = _ade_tree(tmp_path / "ade", values=(0, 1, 2, 3))
    cli = SegmentationCLI(
        args=[
            *TINY,
            f"--data.root={root}",
            "--data.num_classes=3",
            "--data.reduce_zero_label=true",
            "--data.image_size=32",
            "--data.scale=[0.5, 2.0]",
            "--data.hflip=0.5",
            "--data.batch_size=2",
            "--data.val_batch_size=2",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.datamodule.classes == ["0", "1", "2"]
    assert cli.model.model.decode_head.classifier.out_channels == 3
    assert cli.model.hparams.ignore_index == 255
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.val_dataloader()))
    # Val images differ in size: padded, short side resized to 32, annotations at their own size.
    assert batch["image"].shape == (2, 3, 35, 43) and batch["mask"].shape == (2, 44, 60)
    assert batch["image_size"].tolist() == [[32, 43], [35, 32]] and batch["mask_size"].tolist() == [[44, 60], [40, 36]]
    assert (batch["mask"][1, 40:] == 255).all()
    train = next(iter(cli.datamodule.train_dataloader()))
    assert train["image"].shape == (2, 3, 32, 32) and train["mask"].shape == (2, 32, 32)
    cli.fit()
    rows = read_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    assert [r for r in rows if r["val/miou"]]


def test_print_config_composes_and_monitors_miou(capsys):
    code, out, _ = _exit(
        [
            f"--config={CONFIGS / 'models' / 'zoo_biformer_t.yaml'}",
            f"--config={CONFIGS / 'data' / 'digits.yaml'}",
            "--model.lr=3e-4",
            "--print_config",
        ],
        capsys,
    )
    assert code == 0
    config = yaml.safe_load(out)
    assert config["model"]["model_name"] == "zoo_biformer_t" and config["model"]["lr"] == 3e-4
    assert config["model"]["drop_path_rate"] == 0.0  # the data file, given later, over the model file
    assert config["checkpoint"]["monitor"] == "val/miou" and config["checkpoint"]["mode"] == "max"
    assert config["data"]["root"] is None and config["data"]["image_size"] == 64


@pytest.mark.parametrize("whole", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_recipe_is_the_composition_of_its_parts(capsys, whole):
    model, data = whole.rsplit("_", 1)
    parts = (f"models/{model}.yaml", f"data/{data}")
    _, composed, _ = _exit([*(f"--config={CONFIGS / p}" for p in parts), "--print_config"], capsys)
    _, written, _ = _exit([f"--config={CONFIGS / whole}", "--print_config"], capsys)
    assert yaml.safe_load(written) == yaml.safe_load(composed)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_builds(tmp_path, name):
    args = [f"--config={CONFIGS / name}", f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu"]
    args += ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
    if not name.endswith("_digits.yaml"):
        # ADE20K's release layout: images/training, annotations/validation, ...
        root = _ade_tree(tmp_path / "ade", values=(0, 1, 75, 150), names=("training", "validation"))
        args.append(f"--data.root={root}")
    cli = SegmentationCLI(args=args, run=False)
    assert cli.model.hparams.model_name == name.rsplit("_", 1)[0]
    assert cli.config.checkpoint.monitor == "val/miou"
    if name.endswith("_ade20k.yaml"):
        assert cli.datamodule.num_classes == cli.model.hparams.num_classes == 150
        assert [len(cli.datamodule.pairs[s]) for s in ("train", "val")] == [3, 2]
        cli.datamodule.setup("fit")
        _, mask = cli.datamodule.val_dataset[0]
        assert set(mask.unique().tolist()) <= {255, 0, 74, 149}  # 0 ignored, 1..150 shifted down
