"""A projection or convolution and the pointwise op after it (GELU, residual add, multiply, BatchNorm), one call.

The ops take the modules, not their weights (`linear_gelu(x, fc)`, `conv_bn_gelu(x, conv, bn)`), so that a
block has one forward for training and inference, and forward hooks and wrapped layers are seen in both.
Each call picks one of three paths, logged at debug level:

- `onednn` (`onednn_impl.py`): oneDNN post-op fusion, for CPU inference. Taken only when every module is a
  plain one (`is_plain`: exactly `nn.Linear` / `nn.Conv2d` / `nn.BatchNorm2d` in eval, no hooks of its own
  and no global module hooks), the input is a CPU fp32/bf16 tensor, nothing records gradients, and neither
  autocast, a dispatch mode (FLOP counters, fake tensors), tracing, scripting nor compilation is active:
  the fused ops have no autograd formulas, and those must see (and cast) the plain ops.
- `torch` (`torch_impl.py`): for the 1x1 convs of channels-last maps, the GEMM they are, with autograd; taken
  for plain convs where `onednn` is not. The other ops have no such path and take the reference.
- `reference` (`reference.py`): the module called as it is, then the plain op. Taken for any module that is
  not plain (a LoRA or quantisation wrapper substituted for the Linear, a subclass with its own forward, a
  hooked module) and whenever the `zoo.kernels` switch asks for the reference (`ZOO_KERNELS=reference`).

`ZOO_CPU_FUSION=0` turns the `onednn` path off alone (the switch this fusion had before it moved here).

A `nn.Conv2d` subclass whose forward is a plain zero-padded convolution of rearranged operands (TensorFlow
'same' padding, say) can declare so with a method `conv_geometry(x, weight) -> (x, weight, padding)` defined
in the same class as its forward; a subclass that overrides forward again without it is not plain.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_state
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._backend import select_backend
from . import onednn_impl, reference, torch_impl
from ._ops import OPS

__all__ = [*OPS, "fusion_allowed", "is_plain"]

_log = logging.getLogger(__name__)
_ONEDNN = onednn_impl.available()
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_APPROXIMATIONS = ("none", "tanh")


def _has_hooks(module: nn.Module) -> bool:
    # The same hook tables nn.Module.__call__ consults; global ones are read at each call (tests register them).
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _module_state._global_forward_hooks
        or _module_state._global_forward_pre_hooks
        or _module_state._global_backward_hooks
        or _module_state._global_backward_pre_hooks
    )


def is_plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling `module` runs exactly `cls.forward`: its type is `cls` itself and no hook would run.

    A subclass (a parametrised or quantised layer, a wrapper) or a hooked module is not plain, so a path that
    reads its weights instead of calling it would skip what it adds.
    """
    return type(module) is cls and not _has_hooks(module)


def fusion_allowed(x: torch.Tensor) -> bool:
    """Whether the oneDNN inference path may run for x: CPU fp32/bf16, no grad, eager, no autocast or dispatch mode."""
    # Compilation is asked first: Dynamo cannot trace the dispatch-mode query.
    return (
        _ONEDNN
        and not torch.compiler.is_compiling()
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and x.device.type == "cpu"
        and x.dtype in _FUSED_DTYPES
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")  # autocast must see (and cast) the plain ops
        and _get_current_dispatch_mode() is None
        and os.environ.get("ZOO_CPU_FUSION", "1") != "0"
    )


def _plain_params(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    # oneDNN reads the storage: a tensor subclass (quantised weight) or another dtype/device is not its business.
    return all(
        p is None or (type(p) in (torch.Tensor, nn.Parameter) and p.dtype == x.dtype and p.device == x.device)
        for p in params
    )


def _fusable_linear(x: torch.Tensor, fc: nn.Module) -> bool:
    return is_plain(fc, nn.Linear) and x.shape[-1] == fc.in_features and _plain_params(x, fc.weight, fc.bias)


def _fusable_conv(x: torch.Tensor, conv: nn.Module) -> bool:
    if (
        not isinstance(conv, nn.Conv2d)
        or _has_hooks(conv)
        or x.dim() != 4
        or not _plain_params(x, conv.weight, conv.bias)
    ):
        return False
    cls = type(conv)
    if cls is nn.Conv2d:
        return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    forward_owner = next(c for c in cls.__mro__ if "forward" in vars(c))
    return "conv_geometry" in vars(forward_owner)


def _fusable_bn(x: torch.Tensor, bn: nn.Module) -> bool:
    # In training mode (BN recalibration runs it under no_grad) the statistics must update: no folding.
    return (
        is_plain(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.running_var is not None
        and _plain_params(x, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    )


def _plain_pointwise_conv(x: torch.Tensor, conv: nn.Module) -> bool:
    return (
        is_plain(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and x.dim() == 4
        and x.shape[-1] == conv.in_channels
    )


def _same_layout(other: torch.Tensor, shape: torch.Size | tuple[int, ...], x: torch.Tensor) -> bool:
    # The binary post-ops take an operand of the output's exact shape and dtype; broadcasting is the reference's.
    return tuple(other.shape) == tuple(shape) and other.dtype == x.dtype and type(other) is torch.Tensor


def _conv_output_shape(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, ...]:
    size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True)
    ]
    return (x.shape[0], conv.out_channels, *size)


def _check_approximate(approximate: str) -> None:
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")


def _path(op: str, x: torch.Tensor, onednn: bool, torch_path: bool = False) -> str:
    """'onednn', 'torch' or 'reference' for an op whose module checks gave `onednn` / `torch_path`."""
    if select_backend(op, x) == "reference":
        path = "reference"
    elif onednn:
        path = "onednn"
    elif torch_path:
        path = "torch"
    else:
        path = "reference"
    if not torch.compiler.is_compiling():  # a logging call inside a compiled region is a graph break
        _log.debug("%s: %s path", op, path)
    return path


def linear(x: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    """fc(x), the bias added in the GEMM's epilogue when fused.

    Args:
        x: (..., C_in).
        fc: an `nn.Linear`, or any module (called as it is).

    Returns:
        (..., C_out).
    """
    if _path("linear", x, fusion_allowed(x) and _fusable_linear(x, fc)) == "onednn":
        return onednn_impl.linear(x, fc)
    return reference.linear(x, fc)


def linear_gelu(x: torch.Tensor, fc: nn.Module, approximate: str = "none") -> torch.Tensor:
    """gelu(fc(x)), GELU as a post-op of the GEMM when fused.

    Args:
        x: (..., C_in).
        fc: an `nn.Linear`, or any module (called as it is).
        approximate: 'none' (exact erf GELU) or 'tanh'.

    Returns:
        (..., C_out).
    """
    _check_approximate(approximate)
    if _path("linear_gelu", x, fusion_allowed(x) and _fusable_linear(x, fc)) == "onednn":
        return onednn_impl.linear_gelu(x, fc, approximate)
    return reference.linear_gelu(x, fc, approximate)


def _linear_binary(op: str, x: torch.Tensor, fc: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """`op` ("linear_add" or "linear_mul") on its fused path when `other` has the output's exact layout."""
    fused = fusion_allowed(x) and _fusable_linear(x, fc) and _same_layout(other, (*x.shape[:-1], fc.out_features), x)
    impl = onednn_impl if _path(op, x, fused) == "onednn" else reference
    return getattr(impl, op)(x, fc, other)


def linear_add(x: torch.Tensor, fc: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other + fc(x) (a residual add), the add as a post-op of the GEMM when fused.

    Args:
        x: (..., C_in).
        fc: an `nn.Linear`, or any module (called as it is).
        other: (..., C_out), or broadcastable to it (then unfused).

    Returns:
        (..., C_out).
    """
    return _linear_binary("linear_add", x, fc, other)


def linear_mul(x: torch.Tensor, fc: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other * fc(x) (a gate or modulator), the product as a post-op of the GEMM when fused.

    Args:
        x: (..., C_in).
        fc: an `nn.Linear`, or any module (called as it is).
        other: (..., C_out), or broadcastable to it (then unfused).

    Returns:
        (..., C_out).
    """
    return _linear_binary("linear_mul", x, fc, other)


def linear_split(x: torch.Tensor, fc: nn.Module, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """fc(x) split along its output channels; fused, one GEMM per chunk, each chunk contiguous.

    Args:
        x: (..., C_in).
        fc: an `nn.Linear`, or any module (called as it is).
        sizes: channels of each chunk, summing to C_out.

    Returns:
        One (..., size) tensor per entry of `sizes` (views of one output on the reference path).
    """
    if isinstance(fc, nn.Linear) and sum(sizes) != fc.out_features:
        raise ValueError(f"linear_split: sizes {tuple(sizes)} do not sum to out_features {fc.out_features}")
    if _path("linear_split", x, fusion_allowed(x) and _fusable_linear(x, fc)) == "onednn":
        return onednn_impl.linear_split(x, fc, tuple(sizes))
    return reference.linear_split(x, fc, tuple(sizes))


def conv_gelu(x: torch.Tensor, conv: nn.Module, approximate: str = "none") -> torch.Tensor:
    """gelu(conv(x)), GELU as a post-op of the convolution when fused.

    Args:
        x: (B, C_in, H, W); a channels_last input gives a channels_last output.
        conv: an `nn.Conv2d` (or one declaring `conv_geometry`), or any module (called as it is).
        approximate: 'none' (exact erf GELU) or 'tanh'.

    Returns:
        (B, C_out, H', W').
    """
    _check_approximate(approximate)
    if _path("conv_gelu", x, fusion_allowed(x) and _fusable_conv(x, conv)) == "onednn":
        return onednn_impl.conv_gelu(x, conv, approximate)
    return reference.conv_gelu(x, conv, approximate)


def conv_add(x: torch.Tensor, conv: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other + conv(x) (a residual add), the add as a post-op of the convolution when fused.

    Args:
        x: (B, C_in, H, W).
        conv: an `nn.Conv2d` (fused only when exactly one), or any module (called as it is).
        other: (B, C_out, H', W'), the convolution's output shape; of another shape the call is unfused.

    Returns:
        (B, C_out, H', W').
    """
    fused = (
        fusion_allowed(x)
        and type(conv) is nn.Conv2d  # the output size is known beforehand, to check `other` against
        and _fusable_conv(x, conv)
        and _same_layout(other, _conv_output_shape(x, conv), x)
    )
    if _path("conv_add", x, fused) == "onednn":
        return onednn_impl.conv_add(x, conv, other)
    return reference.conv_add(x, conv, other)


def conv_bn_gelu(x: torch.Tensor, conv: nn.Module, bn: nn.Module, approximate: str = "none") -> torch.Tensor:
    """gelu(bn(conv(x))); fused, the eval-mode BatchNorm folded into the convolution and GELU as its post-op.

    Args:
        x: (B, C_in, H, W).
        conv: an `nn.Conv2d` (or one declaring `conv_geometry`), or any module (called as it is).
        bn: an `nn.BatchNorm2d` (folded only in eval mode with running statistics), or any module.
        approximate: 'none' (exact erf GELU) or 'tanh'.

    Returns:
        (B, C_out, H', W').
    """
    _check_approximate(approximate)
    fused = fusion_allowed(x) and _fusable_conv(x, conv) and _fusable_bn(x, bn)
    if _path("conv_bn_gelu", x, fused) == "onednn":
        return onednn_impl.conv_bn_gelu(x, conv, bn, approximate)
    return reference.conv_bn_gelu(x, conv, bn, approximate)


def pointwise_conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """A 1x1 convolution of a channels-last map, run as a GEMM on its rows when the conv is plain.

    Args:
        x: (B, H, W, C_in), channels-last.
        conv: an `nn.Conv2d` 1x1 (stride 1, no padding, one group), or any module taking the NCHW view.

    Returns:
        (B, H, W, C_out).
    """
    plain = _plain_pointwise_conv(x, conv)
    path = _path("pointwise_conv", x, plain and fusion_allowed(x) and _plain_params(x, conv.weight, conv.bias), plain)
    if path == "onednn":
        return onednn_impl.pointwise_conv(x, conv)
    if path == "torch":
        return torch_impl.pointwise_conv(x, conv)
    return reference.pointwise_conv(x, conv)


def pointwise_conv_add(x: torch.Tensor, conv: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other + pointwise_conv(x, conv) (a residual add), the add as a post-op of the GEMM when fused.

    Args:
        x: (B, H, W, C_in), channels-last.
        conv: an `nn.Conv2d` 1x1 (stride 1, no padding, one group), or any module taking the NCHW view.
        other: (B, H, W, C_out), or broadcastable to it (then unfused).

    Returns:
        (B, H, W, C_out).
    """
    plain = _plain_pointwise_conv(x, conv)
    fused = (
        plain
        and fusion_allowed(x)
        and _plain_params(x, conv.weight, conv.bias)
        and _same_layout(other, (*x.shape[:-1], conv.out_channels), x)
    )
    path = _path("pointwise_conv_add", x, fused, plain)
    if path == "onednn":
        return onednn_impl.pointwise_conv_add(x, conv, other)
    if path == "torch":
        return torch_impl.pointwise_conv_add(x, conv, other)
    return reference.pointwise_conv_add(x, conv, other)


def bn_pointwise_conv_bn_gelu(
    x: torch.Tensor, pre_bn: nn.Module, conv: nn.Module, bn: nn.Module, approximate: str = "none"
) -> torch.Tensor:
    """gelu(bn(conv(pre_bn(x)))) for a 1x1 conv between two BatchNorms (an MBConv's expansion) on a channels-last map.

    Fused, both eval-mode BatchNorms fold into the conv's weight and bias and GELU is the GEMM's post-op: the
    whole expansion reads the narrow input once and writes the wide output once.

    Args:
        x: (B, H, W, C_in), channels-last.
        pre_bn: `nn.BatchNorm2d` over C_in, or any module taking the NCHW view.
        conv: an `nn.Conv2d` 1x1 (stride 1, no padding, one group), or any module taking the NCHW view.
        bn: `nn.BatchNorm2d` over C_out, or any module taking the NCHW view.
        approximate: 'none' (exact erf GELU) or 'tanh'.

    Returns:
        (B, H, W, C_out).
    """
    _check_approximate(approximate)
    plain = _plain_pointwise_conv(x, conv)
    fused = (
        plain
        and fusion_allowed(x)
        and _plain_params(x, conv.weight, conv.bias)
        and _fusable_bn(x, pre_bn)
        and _fusable_bn(x, bn)
    )
    path = _path("bn_pointwise_conv_bn_gelu", x, fused, plain)
    if path == "onednn":
        return onednn_impl.bn_pointwise_conv_bn_gelu(x, pre_bn, conv, bn, approximate)
    if path == "torch":
        return torch_impl.bn_pointwise_conv_bn_gelu(x, pre_bn, conv, bn, approximate)
    return reference.bn_pointwise_conv_bn_gelu(x, pre_bn, conv, bn, approximate)
