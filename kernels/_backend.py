"""Backend selection shared by every op in `kernels/`.

`ZOO_KERNELS=torch|triton|auto` (default `auto`) picks the implementation: `auto` takes the
Triton path for CUDA tensors and the PyTorch reference elsewhere. Under `TRITON_INTERPRET=1`
(which must be set before `kernels` is imported) `triton` also runs on CPU tensors.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["BACKENDS", "kernel_backend", "select_backend", "triton_available"]

BACKENDS = ("auto", "torch", "triton")
_log = logging.getLogger("kernels")


def kernel_backend() -> str:
    """The backend requested through `ZOO_KERNELS` (read at each call so tests can switch it)."""
    value = os.environ.get("ZOO_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"ZOO_KERNELS must be one of {BACKENDS}, got {value!r}")
    return value


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(op: str, *tensors: torch.Tensor) -> str:
    """Return "torch" or "triton" for an op called on `tensors` and log the choice at debug level."""
    requested = kernel_backend()
    on_cuda = all(t.is_cuda for t in tensors)
    if requested == "auto":
        backend = "triton" if on_cuda and triton_available() else "torch"
    elif requested == "triton":
        if not triton_available():
            raise RuntimeError(f"ZOO_KERNELS=triton but triton is not installed (op {op})")
        if not on_cuda and not triton_interpreted():
            raise RuntimeError(
                f"ZOO_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before `kernels` is imported (op {op})"
            )
        backend = "triton"
    else:
        backend = "torch"
    if not torch.compiler.is_compiling():  # a logging call inside a compiled region is a graph break
        _log.debug("%s: %s path", op, backend)
    return backend
