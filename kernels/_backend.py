"""Backend selection shared by every op in `kernels/`.

`ZOO_KERNELS` names the implementation every op takes (default `auto`):

- `reference`: the plain statement of the op (the oracle; slow, for checking);
- `torch`: the op's fast PyTorch path, which picks its form itself (`flex`, `gather` or `masked` for attention);
- `flex`: FlexAttention block masks (attention ops; CUDA forward and backward, CPU forward only);
- `gather`: gathered slots with fused `scaled_dot_product_attention` (attention ops; everywhere);
- `masked`: one fused `scaled_dot_product_attention` over all keys under an additive block mask (attention
  ops; everywhere; dense arithmetic, for short sequences);
- `triton`: the Triton kernels (CUDA, or CPU tensors under `TRITON_INTERPRET=1`, set before `zoo.kernels` is
  imported);
- `auto`: the fastest measured path for the device and grad mode, as each op's dispatch states.

An op without a form of its own for `flex`, `gather` or `masked` takes its `torch` path for them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

__all__ = ["BACKENDS", "kernel_backend", "needs_grad", "select_backend", "triton_available"]

BACKENDS = ("auto", "reference", "torch", "flex", "gather", "masked", "triton")
_TORCH_FORMS = ("flex", "gather", "masked")
_log = logging.getLogger("zoo.kernels")


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


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on `tensors` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _default_auto(device: str, grad: bool) -> str:
    return "triton" if device == "cuda" and triton_available() else "torch"


def select_backend(
    op: str,
    *tensors: torch.Tensor,
    backends: Sequence[str] = ("reference", "torch", "triton"),
    auto: Callable[[str, bool], str] | None = None,
) -> str:
    """The backend an op runs for `tensors`, logged at debug level.

    Args:
        op: the op's name (in messages and the log).
        tensors: its tensor inputs (device and grad mode decide `auto`).
        backends: the backends the op has, among `BACKENDS` less `auto`.
        auto: (device type, grad needed) -> backend, the op's measured choice; default: `triton` on CUDA,
            `torch` elsewhere.

    Returns:
        One of `backends`.
    """
    requested = kernel_backend()
    device = "cuda" if tensors and all(t.is_cuda for t in tensors) else tensors[0].device.type if tensors else "cpu"
    if requested == "auto":
        backend = (auto or _default_auto)(device, needs_grad(*tensors))
    elif requested in _TORCH_FORMS and requested not in backends:
        backend = "torch"
    else:
        backend = requested
    if backend not in backends:
        raise RuntimeError(f"{op} has no {backend!r} backend (ZOO_KERNELS={requested}); it has {tuple(backends)}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"ZOO_KERNELS=triton but triton is not installed (op {op})")
        if device != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"ZOO_KERNELS=triton on {device} tensors needs TRITON_INTERPRET=1 set before `zoo.kernels` is imported "
                f"(op {op})"
            )
    if not torch.compiler.is_compiling():  # a logging call inside a compiled region is a graph break
        _log.debug("%s: %s path", op, backend)
    return backend
