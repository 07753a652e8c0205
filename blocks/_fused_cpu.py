"""oneDNN post-op fusion for CPU inference: a projection and the GELU or residual add after it in one pass.

On CPU the element-wise passes that follow a projection (GELU on the 4C-wide MLP hidden map, the
residual add after a block) cost about as much as the projection itself, because they stream the
whole map through memory again. oneDNN, which PyTorch already uses for CPU convolutions and
linears, can apply them as post-ops of the matmul/conv while the output is still in cache; these
are the ops torch.compile's CPU backend emits (`torch.ops.mkldnn._linear_pointwise`,
`_convolution_pointwise`).

They have no autograd formulas, so the fused path is taken only when nothing records gradients,
and never under autocast, a dispatch mode (FLOP counters, fake tensors), tracing or compilation,
which must see the plain ops. `ZOO_CPU_FUSION=0` turns it off. Results equal the unfused ops to float
rounding (GELU is the exact erf form in both).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["conv_add", "conv_pointwise", "fusion_enabled", "linear", "linear_add", "linear_binary", "mlp_residual"]


def _ops_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_AVAILABLE = _ops_available()


def fusion_enabled(x: torch.Tensor) -> bool:
    """Whether the fused oneDNN path may run for x: CPU fp32/bf16 inference in eager mode."""
    return (
        _AVAILABLE
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")  # autocast must see (and cast) the plain ops
        and os.environ.get("ZOO_CPU_FUSION", "1") != "0"
        and _get_current_dispatch_mode() is None
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attr: str = "none") -> torch.Tensor:
    """`attr(F.linear(x, weight, bias))`, attr 'none' or 'gelu' (exact erf form); x: (..., C_in).

    Fused, the bias is applied in the matmul's epilogue instead of being broadcast into the output first.
    """
    if fusion_enabled(x):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, attr, [], "none")
    out = F.linear(x, weight, bias)
    return F.gelu(out) if attr == "gelu" else out


def linear_binary(
    x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: str
) -> torch.Tensor:
    """`other + F.linear(x, weight, bias)` (op 'add') or `other * F.linear(...)` (op 'mul'), fused as a post-op.

    x: (..., C_in); other: (..., C_out).
    """
    if fusion_enabled(x):
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other.contiguous(), weight, bias, op)
    out = F.linear(x, weight, bias)
    if op == "add":
        return other + out
    if op == "mul":
        return other * out
    raise ValueError(f"op must be 'add' or 'mul', got {op!r}")


def linear_add(layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`residual + layer(x)`, fused with the add as a post-op. x: (..., C_in), residual: (..., C_out)."""
    return linear_binary(x, residual, layer.weight, layer.bias, "add")


def mlp_residual(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`residual + mlp(x)` for timm's `Mlp`; fused when it has exact GELU, no hidden norm and no active dropout.

    fc1 carries the GELU and fc2 the residual add, so the hidden map is written once and read once.
    """
    plain = (
        isinstance(mlp.act, nn.GELU)
        and mlp.act.approximate == "none"
        and isinstance(mlp.norm, nn.Identity)
        and not (mlp.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0))
    )
    if not (plain and fusion_enabled(x)):
        return residual + mlp(x)
    return linear_add(mlp.fc2, linear(x, mlp.fc1.weight, mlp.fc1.bias, "gelu"), residual)


def conv_pointwise(conv: nn.Conv2d, x: torch.Tensor, attr: str = "none") -> torch.Tensor:
    """`attr(conv(x))`, attr 'none' or 'gelu'; x: (B, C, H, W), a channels_last input gives a channels_last output."""
    if fusion_enabled(x) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            conv.weight,
            conv.bias,
            list(conv.padding),
            list(conv.stride),
            list(conv.dilation),
            conv.groups,
            attr,
            [],
            "none",
        )
    out = conv(x)
    return F.gelu(out) if attr == "gelu" else out


def conv_add(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`other + conv(x)` with the add as a post-op; x, other: (B, C, H, W) of the conv's input/output sizes."""
    if fusion_enabled(x) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x,
            other,
            conv.weight,
            conv.bias,
            list(conv.padding),
            list(conv.stride),
            list(conv.dilation),
            conv.groups,
            "add",
            None,
            None,
            [],
            None,
        )
    return other + conv(x)
