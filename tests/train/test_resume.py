"""A run SIGKILLed during training, or while overwriting last.ckpt, leaves a readable last checkpoint, and
resuming from it (`--ckpt_path last`) reproduces the uninterrupted run's metrics (same seed, CPU), continuing the
run's own metrics.csv; the killed save's temporary file goes at the next save."""

from __future__ import annotations

import glob

import pytest
import torch

from ._util import TINY, read_metrics, start_launcher, train_losses, val_rows

# EMA weights are what val measures, mixup/cutmix and warm-up are on: the resumed metrics depend on the
# restored EMA, scheduler and optimizer state and on the per-epoch random state.
RECIPE = [
    *TINY,
    "--model.ema_decay=0.9",
    "--model.ema_validate=true",
    "--model.mixup=0.8",
    "--model.cutmix=1.0",
    "--model.label_smoothing=0.1",
    "--model.warmup_epochs=1",
    "--model.drop_path_rate=0.1",
    "--trainer.max_epochs=3",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
]


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _version(root, n):
    return root / "lightning_logs" / f"version_{n}"


def test_sigkill_then_resume_reproduces_uninterrupted_run(tmp_path):
    kill_train = tmp_path / "kill_train.yaml"
    # 3 updates an epoch: step 7 is the second batch of the last epoch.
    kill_train.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.train._util.KillAtStep\n      init_args: {step: 7}\n"
    )
    kill_save = tmp_path / "kill_save.yaml"
    kill_save.write_text(
        "trainer:\n  plugins:\n    - class_path: tests.train._util.KillWhileWriting\n"
        "      init_args: {name: last.ckpt, occurrence: 2}\n"
    )
    ref, a, b = tmp_path / "ref", tmp_path / "a", tmp_path / "b"
    procs = [
        start_launcher([*RECIPE, f"--trainer.default_root_dir={ref}"]),
        start_launcher([*RECIPE, f"--trainer.default_root_dir={a}", f"--config={kill_train}"]),
        start_launcher([*RECIPE, f"--trainer.default_root_dir={b}", f"--config={kill_save}"]),
    ]
    (rc_ref, log_ref), (rc_a, log_a), (rc_b, log_b) = (_finish(p) for p in procs)
    assert rc_ref == 0, log_ref
    assert rc_a == -9, log_a
    assert rc_b == -9, log_b

    # Killed mid-epoch 2: last.ckpt is the end of epoch 1, complete and loadable without unpickling code.
    last_a = torch.load(_version(a, 0) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last_a["epoch"], last_a["global_step"]) == (1, 6)
    assert any(k.startswith("ema.module.") for k in last_a["state_dict"])
    assert last_a["lr_schedulers"] and last_a["optimizer_states"]
    # Killed half-way through overwriting last.ckpt at the end of epoch 1: the epoch-0 file is intact,
    # the half-written bytes sit in a temporary file beside it, and every .ckpt there loads.
    ckpt_b = _version(b, 0) / "checkpoints"
    assert torch.load(ckpt_b / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    assert glob.glob(str(ckpt_b / "last.ckpt.tmp-*"))
    for path in glob.glob(str(ckpt_b / "*.ckpt")):
        torch.load(path, map_location="cpu", weights_only=True)

    procs = [start_launcher([*RECIPE, f"--trainer.default_root_dir={root}", "--ckpt_path=last"]) for root in (a, b)]
    for rc, log in (_finish(p) for p in procs):
        assert rc == 0, log
    # The next save removed the killed save's temporary file.
    assert not glob.glob(str(ckpt_b / "last.ckpt.tmp-*"))

    # The resumed runs logged on into their own version_0: one metrics.csv holds every epoch once, as the
    # uninterrupted run's does (rows the killed run logged past its checkpoint were dropped, then logged again).
    expected = read_metrics(_version(ref, 0) / "metrics.csv")
    for root in (a, b):
        assert not _version(root, 1).exists()
        resumed = read_metrics(_version(root, 0) / "metrics.csv")
        got_val, want_val = val_rows(resumed), val_rows(expected)
        assert sorted(got_val) == [0, 1, 2]
        for epoch in got_val:
            assert got_val[epoch] == pytest.approx(want_val[epoch], rel=1e-5, abs=1e-6), (root.name, epoch)
        steps = [int(r["step"]) for r in resumed if r.get("train/loss")]
        assert steps == list(range(9)), root.name
        assert train_losses(resumed) == pytest.approx(train_losses(expected), rel=1e-5, abs=1e-6), root.name
