"""Shared pieces of the training tests: a tiny zoo model, the launcher as a subprocess, metrics.csv reading,
and the crash injectors the kill tests load through the CLI (`tests.train._util.KillAtStep`)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

from lightning.pytorch import Callback

from zoo.training.checkpointing import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "train" / "cls.py"

# BiFormer-T's code path (routing attention, global last stage) at 80 K parameters and 32 x 32 inputs.
TINY = [
    "--model.model_name=zoo_biformer_t",
    "--model.model_kwargs={depths: [1, 1, 1, 1], embed_dims: [32, 32, 32, 32]}",
    "--data.image_size=32",
    "--data.batch_size=16",
    "--data.val_batch_size=64",
    "--data.hflip=0.0",
    "--trainer.accelerator=cpu",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def run_launcher(args: list[str], timeout: float = 240, threads: int = 1) -> subprocess.CompletedProcess:
    """`python train/cls.py ARGS` in a fresh process from the repository root, output captured."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def val_rows(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    """epoch -> {val/acc1, val/acc5, val/loss} from a metrics.csv."""
    out = {}
    for row in rows:
        if row.get("val/acc1"):
            out[int(row["epoch"])] = {k: float(row[k]) for k in ("val/acc1", "val/acc5", "val/loss")}
    return out


def train_losses(rows: list[dict[str, str]]) -> dict[int, float]:
    """step -> train/loss from a metrics.csv."""
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


class KillAtStep(Callback):
    """SIGKILLs its own process when the given optimizer step is about to start: a crash mid-training."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileWriting(AtomicCheckpointIO):
    """Writes half of the `occurrence`-th save of the file named `name`, then SIGKILLs its process: a crash
    in the middle of overwriting a checkpoint."""

    def __init__(self, name: str = "last.ckpt", occurrence: int = 2):
        super().__init__()
        self.name, self.occurrence, self.count, self._target = name, occurrence, 0, ""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self._target = os.path.basename(os.fspath(path))
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    def _write(self, f, data) -> None:
        if self._target == self.name:
            self.count += 1
            if self.count == self.occurrence:
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        f.write(data)


def start_launcher(args: list[str], threads: int = 1) -> subprocess.Popen:
    """Like `run_launcher`, but returns the running process (stdout and stderr piped)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    return subprocess.Popen(
        [sys.executable, str(LAUNCHER), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
