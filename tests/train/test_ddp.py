"""Two training processes on the CPU (DDP over gloo): one launcher command, metrics synced, one export."""

from __future__ import annotations

import torch

from ._util import TINY, read_metrics, run_launcher, val_rows


def test_two_process_ddp_on_cpu(tmp_path):
    result = run_launcher(
        [
            *TINY,
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert "distributed_backend=gloo" in log
    run = tmp_path / "lightning_logs" / "version_0"
    assert not (tmp_path / "lightning_logs" / "version_1").exists()  # both ranks log into one run
    rows = read_metrics(run / "metrics.csv")
    assert sum(bool(r["train/loss"]) for r in rows) == 2  # 2 steps, each over both processes' batches
    assert 0.0 <= val_rows(rows)[0]["val/acc1"] <= 1.0
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2
    assert (run / "best.safetensors").is_file()
