"""Crash-safe checkpoint writing for Lightning.

Lightning's own writer stages a checkpoint in the system temp directory and moves it into place; when
that directory is on another filesystem (a tmpfs /tmp, a mounted data disk) the move is a copy, and a
process killed during it leaves a truncated `last.ckpt`. `AtomicCheckpointIO` writes beside the target,
fsyncs, and renames, so a checkpoint path always holds either the previous complete file or the new one.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


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
