"""Bad data, bad settings and faults in training (issue 20): each stops the run before training with one line
naming the problem, or is handled (a killed save's temporary file, a resumed run's metrics)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from zoo.training import ImageClassifier
from zoo.training.checkpointing import AtomicCheckpointIO, ContinuedCSVLogger, remove_stale_temporaries
from zoo.training.cli import main as cli_main
from zoo.training.data import DataError, ImageClassificationData
from zoo.training.seg_data import SegmentationData
from zoo.training.video_data import MovingDigitsData

from ._util import TINY, run_launcher

main = partial(cli_main, ImageClassifier, ImageClassificationData)  # train/cls.py


def _exit(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _one_error_line(err: str) -> str:
    # (Run inside pytest, Lightning adds a warning about sys.argv to stderr; a launcher run has only the error.)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _image_folder(root, per_class=(3, 2)):
    for split, n in zip(("train", "val"), per_class, strict=True):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 10), (40 * i, 80, 120)).save(root / split / name / f"{i}.png")
    return root


def _truncated_png(path):
    Image.new("RGB", (40, 40), (1, 2, 3)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["not an image", "truncated", "empty"])
def test_a_corrupt_image_is_named_when_the_data_is_made(tmp_path, damage):
    root = _image_folder(tmp_path / "data")
    bad = root / "val" / "dog" / "1.png"  # val: never drawn in training, and drop_last could never reach it
    if damage == "not an image":
        bad.write_text("<html>404</html>")
    elif damage == "truncated":
        _truncated_png(bad)
    else:
        bad.write_bytes(b"")
    with pytest.raises(DataError, match=r"1 of 10 image files cannot be read, e\.g\. '.*val/dog/1\.png'"):
        ImageClassificationData(root=str(root), image_size=8, batch_size=2)


def test_an_unreadable_image_found_while_loading_names_its_file(tmp_path):
    root = _image_folder(tmp_path / "data")
    _truncated_png(root / "train" / "cat" / "2.png")
    data = ImageClassificationData(root=str(root), image_size=8, batch_size=2, verify_images=False)
    data.setup("fit")
    dataset = data.train_dataset.dataset
    index = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith("cat/2.png")][0]
    with pytest.raises(DataError, match=r"cannot read image '.*train/cat/2\.png': OSError"):
        dataset[index]


def test_the_launcher_reports_a_corrupt_image_in_one_line(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    (root / "train" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    code, _, err = _exit([*TINY, f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert code == 2
    assert "train/cat/0.png" in _one_error_line(err)


def test_a_train_split_smaller_than_one_batch_is_refused(tmp_path, capsys):
    # 6 training images, batches of 8 and drop_last: this run used to "finish" with exit 0 and no checkpoint.
    root = _image_folder(tmp_path / "data")
    args = [*TINY, f"--data.root={root}", "--data.batch_size=8", f"--trainer.default_root_dir={tmp_path}"]
    code, _, err = _exit(args, capsys)
    assert code == 2
    assert "the training split holds 6 samples, fewer than data.batch_size = 8" in _one_error_line(err)
    assert not (tmp_path / "lightning_logs" / "version_0" / "checkpoints").exists()


def test_every_data_module_refuses_a_split_smaller_than_one_batch():
    digits = ImageClassificationData(image_size=8, batch_size=2000)
    digits.setup("fit")
    with pytest.raises(DataError, match=r"holds 1437 samples, fewer than data.batch_size = 2000"):
        digits.train_dataloader()
    seg = SegmentationData(image_size=64, batch_size=8, train_size=5, val_size=2)
    seg.setup("fit")
    with pytest.raises(DataError, match=r"the training split holds 5 samples, fewer than data.batch_size = 8"):
        seg.train_dataloader()
    video = MovingDigitsData(num_frames=2, frame_size=16, batch_size=8, clips_per_epoch=5)
    video.setup("fit")
    with pytest.raises(DataError, match=r"the epoch of clips holds 5 samples, fewer than data.batch_size = 8"):
        video.train_dataloader()


# A bad value of a setting (and what must appear in its one-line error).
_BAD_SETTINGS = [
    ("--data.batch_size=0", "batch_size"),
    ("--data.batch_size=-3", "batch_size"),
    ("--data.batch_size=two", "batch_size"),
    ("--data.image_size=0", "image_size"),
    ("--model.num_classes=-1", "num_classes"),
    ("--model.drop_path_rate=1.5", "drop_path_rate"),
    ("--model.drop_path_rate=-0.2", "drop_path_rate"),
    ("--model.drop_path_rate=nan", "drop_path_rate"),
    ("--model.drop_rate=1.0", "drop_rate"),
    ("--model.lr=0", "lr"),
    ("--model.lr=-1e-3", "lr"),
    ("--model.lr=nan", "lr"),
    ("--model.weight_decay=-1", "weight_decay"),
    ("--model.label_smoothing=1.5", "label_smoothing"),
    ("--model.ema_decay=1.5", "ema_decay"),
    ("--model.mixup_prob=2", "mixup_prob"),
    ("--model.model_name=zoo_nonexistent_t", "zoo_nonexistent_t"),
    ("--model.model_kwargs={depths: [1, 1, 1, 1], embed_dims: [32, 32, 32, 32], in_chans: 0}", "in_chans"),
    ("--data.root=/nonexistent/imagenet", "/nonexistent/imagenet"),
    ("--ckpt_path=/nonexistent/last.ckpt", "/nonexistent/last.ckpt"),
    ("--trainer.max_epochs=abc", "max_epochs"),
    ("--no_such_option=1", "no_such_option"),
]


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(_BAD_SETTINGS), min_size=1, max_size=2, unique=True))
def test_fuzz_bad_settings_stop_the_launcher_with_one_line(tmp_path_factory, bad):
    """hypothesis draws one or two bad settings: the run stops before training, exit 2, one line naming one."""
    root = tmp_path_factory.mktemp("run")
    args = [*TINY, "--data.image_size=32", f"--trainer.default_root_dir={root}", *(flag for flag, _ in bad)]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert not (root / "lightning_logs").exists() or not any((root / "lightning_logs").rglob("*.ckpt"))


def test_bad_settings_name_themselves(tmp_path, capsys):
    for flag, named in _BAD_SETTINGS:
        code, _, err = _exit([*TINY, f"--trainer.default_root_dir={tmp_path}", flag], capsys)
        assert code == 2, flag
        assert named in _one_error_line(err), (flag, err)


def test_a_diverging_litv2_run_stops_with_the_non_finite_loss_error(tmp_path):
    # It used to die with exit 139 (SIGSEGV) inside torchvision's deformable convolution, without a message.
    args = [
        "--model.model_name=zoo_litv2_s",
        "--model.model_kwargs={depths: [1, 1, 1, 1], embed_dim: 8, num_heads: [1, 1, 2, 2]}",
        "--model.lr=1e30",
        *TINY[2:],
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    proc = run_launcher(args)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "error: non-finite training loss" in proc.stderr


# ----------------------------------------------------------------------------- faults: save and resume


def test_the_next_save_removes_temporaries_of_killed_saves(tmp_path):
    target = tmp_path / "last.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"last.ckpt.tmp-{int(dead.stdout)}"  # a process that has ended
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f"last.ckpt.tmp-{os.getppid()}"  # a running process may still be writing its own
    live.write_bytes(b"in progress")
    other = tmp_path / "best.ckpt.tmp-1"  # another checkpoint's temporaries are its own saves' business
    other.write_bytes(b"x")
    AtomicCheckpointIO().save_checkpoint({"epoch": 3}, target)
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert torch.load(target, weights_only=True) == {"epoch": 3}
    assert remove_stale_temporaries(str(target)) == []


def test_a_resumed_run_continues_its_metrics_file(tmp_path):
    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss", "val/acc1"])
        writer.writeheader()
        writer.writerows(
            [
                {"epoch": 0, "step": 0, "train/loss": 2.0},
                {"epoch": 0, "step": 1, "train/loss": 1.5},
                {"epoch": 0, "step": 1, "val/acc1": 0.5},
                {"epoch": 1, "step": 2, "train/loss": 1.2},  # logged after the checkpoint, then killed
            ]
        )
    logger = ContinuedCSVLogger(str(tmp_path), "lightning_logs", version=0, resume_step=2)
    logger.log_metrics({"epoch": 1, "train/loss": 1.1, "train/lr": 0.1}, step=2)
    logger.save()
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["step"], r["train/loss"]) for r in rows] == [
        ("0", "0", "2.0"),
        ("0", "1", "1.5"),
        ("0", "1", ""),
        ("1", "2", "1.1"),
    ]
    assert rows[2]["val/acc1"] == "0.5" and rows[3]["train/lr"] == "0.1"
