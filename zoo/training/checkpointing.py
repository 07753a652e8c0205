"""Crash-safe checkpoint writing for Lightning.

Lightning's own writer stages a checkpoint in the system temp directory and moves it into place; when
that directory is on another filesystem (a tmpfs /tmp, a mounted data disk) the move is a copy, and a
process killed during it leaves a truncated `last.ckpt`. `AtomicCheckpointIO` writes beside the target,
fsyncs, and renames, so a checkpoint path always holds either the previous complete file or the new one.
A process killed during that write leaves its temporary file (`last.ckpt.tmp-PID`); the next save of that path
removes the temporaries of processes that no longer run.

`ContinuedCSVLogger` is Lightning's `CSVLogger` for a resumed run: it writes into the run's own `version_N`
folder and continues its metrics.csv, so one run's history stays in one file.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from typing import Any

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["AtomicCheckpointIO", "ContinuedCSVLogger", "remove_stale_temporaries"]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove `path.tmp-PID` files left by killed saves (PID no longer running, not this process); return them."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = tmp.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            try:
                os.remove(tmp)
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are write-to-temporary, fsync, rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = os.fspath(path)
        if "://" in path:  # remote storage: fsspec's transactions are the best on offer
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        remove_stale_temporaries(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                self._write(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        # The rename itself is durable only once the directory entry is on disk.
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, f: io.BufferedWriter, data: memoryview) -> None:
        f.write(data)


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "-inf")
    except ValueError:
        return float("-inf")


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps the rows logged before
    `resume_step` (those after it were logged past the checkpoint and are about to be logged again)."""

    def __init__(self, log_dir: str, resume_step: int):
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if _step(row) < self._resume_step]
            keys = sorted(reader.fieldnames or [])
        # Rewritten with the header sorted as Lightning's writer keeps it, so that its appends line up.
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class ContinuedCSVLogger(CSVLogger):
    """`CSVLogger` continuing the metrics.csv of a run resumed at `resume_step` (the checkpoint's count of
    optimizer steps, Lightning's `step` column) in the run's own version folder."""

    def __init__(self, save_dir: str, name: str, version: int | str, resume_step: int, **kwargs):
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._resume_step)
        return self._experiment
