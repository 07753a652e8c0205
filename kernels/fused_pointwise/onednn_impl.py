"""oneDNN post-op fusion for CPU inference: a projection or convolution and the pointwise op after it in one pass.

On CPU the element-wise passes that follow a projection (GELU on the 4C-wide MLP hidden map, the residual
add after a block, BatchNorm after a conv) cost about as much as the projection itself, because they stream
the whole map through memory again. oneDNN, which PyTorch already uses for CPU convolutions and linears,
applies them as post-ops of the matmul/conv while the output is still in cache, and eval-mode BatchNorms fold
into the adjacent conv's weight and bias. These are the ops torch.compile's CPU backend emits
(`torch.ops.mkldnn._linear_pointwise`, `_convolution_pointwise`).

They have no autograd formulas: the dispatch in `__init__.py` calls them only for plain modules (checked
there) in inference. Results equal the reference to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._ops import OPS

__all__ = ["available", *OPS]


def available() -> bool:
    """Whether this PyTorch build has oneDNN and its pointwise-fused linear and conv ops."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attr: str = "none", algorithm: str = "none"
) -> torch.Tensor:
    # Fused, the bias is applied in the matmul's epilogue instead of being broadcast into the output first.
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, attr, [], algorithm)


def _linear_binary(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor, op: str
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other.contiguous(), weight, bias, op)


def linear(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """fc(x); x: (..., C_in) -> (..., C_out)."""
    return _linear(x, fc.weight, fc.bias)


def linear_gelu(x: torch.Tensor, fc: nn.Linear, approximate: str = "none") -> torch.Tensor:
    """gelu(fc(x)); x: (..., C_in) -> (..., C_out)."""
    return _linear(x, fc.weight, fc.bias, "gelu", approximate)


def linear_add(x: torch.Tensor, fc: nn.Linear, other: torch.Tensor) -> torch.Tensor:
    """other + fc(x); x: (..., C_in), other: (..., C_out)."""
    return _linear_binary(x, fc.weight, fc.bias, other, "add")


def linear_mul(x: torch.Tensor, fc: nn.Linear, other: torch.Tensor) -> torch.Tensor:
    """other * fc(x); x: (..., C_in), other: (..., C_out)."""
    return _linear_binary(x, fc.weight, fc.bias, other, "mul")


def linear_split(x: torch.Tensor, fc: nn.Linear, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """fc(x) split along its channels, one GEMM per row block of the weight; x: (..., C_in) -> (..., size) each.

    Each output comes out contiguous, so a consumer that needs one chunk on its own (a depthwise conv over
    the context channels, a post-op operand) reads it without a copy.
    """
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        out.append(_linear(x, fc.weight[rows], None if fc.bias is None else fc.bias[rows]))
        start += size
    return tuple(out)


def _conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: list[int],
    conv: nn.Conv2d,
    attr: str,
    algorithm: str = "none",
) -> torch.Tensor:
    # A channels_last input gives a channels_last output.
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, padding, list(conv.stride), list(conv.dilation), conv.groups, attr, [], algorithm
    )


def conv_geometry(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(input, weight, symmetric zero padding) whose plain convolution is conv's forward on x with `weight`.

    A plain `nn.Conv2d` pads as configured; a subclass that declares its forward as a plain convolution of
    rearranged operands (TensorFlow 'same' padding, say) gives them through its `conv_geometry(x, weight)`.
    """
    if type(conv) is nn.Conv2d:
        return x, weight, list(conv.padding)
    return conv.conv_geometry(x, weight)


def conv_gelu(x: torch.Tensor, conv: nn.Conv2d, approximate: str = "none") -> torch.Tensor:
    """gelu(conv(x)); x: (B, C_in, H, W) -> (B, C_out, H', W')."""
    x, weight, padding = conv_geometry(conv, x, conv.weight)
    return _conv(x, weight, conv.bias, padding, conv, "gelu", approximate)


def conv_add(x: torch.Tensor, conv: nn.Conv2d, other: torch.Tensor) -> torch.Tensor:
    """other + conv(x); x: (B, C_in, H, W), other: (B, C_out, H', W')."""
    x, weight, padding = conv_geometry(conv, x, conv.weight)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x,
        other,
        weight,
        conv.bias,
        padding,
        list(conv.stride),
        list(conv.dilation),
        conv.groups,
        "add",
        None,
        None,
        [],
        None,
    )


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that bn(x) = x * scale + shift per channel, in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def conv_bn_gelu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, approximate: str = "none") -> torch.Tensor:
    """gelu(bn(conv(x))) with bn folded into conv: one oneDNN call; x: (B, C_in, H, W) -> (B, C_out, H', W')."""
    scale, shift = _bn_affine(bn)
    bias = shift if conv.bias is None else shift + conv.bias * scale
    x, weight, padding = conv_geometry(conv, x, conv.weight * scale[:, None, None, None])
    return _conv(x, weight, bias, padding, conv, "gelu", approximate)


def pointwise_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv of a channels-last map as a GEMM; x: (B, H, W, C_in) -> (B, H, W, C_out)."""
    return _linear(x, conv.weight.flatten(1), conv.bias)


def pointwise_conv_add(x: torch.Tensor, conv: nn.Conv2d, other: torch.Tensor) -> torch.Tensor:
    """other + pointwise_conv(x, conv); x: (B, H, W, C_in), other: (B, H, W, C_out)."""
    return _linear_binary(x, conv.weight.flatten(1), conv.bias, other, "add")


def bn_pointwise_conv_bn_gelu(
    x: torch.Tensor, pre_bn: nn.BatchNorm2d, conv: nn.Conv2d, bn: nn.BatchNorm2d, approximate: str = "none"
) -> torch.Tensor:
    """gelu(bn(conv(pre_bn(x)))), both BatchNorms folded into the 1x1 conv; x: (B, H, W, C_in) -> (B, H, W, C_out)."""
    scale0, shift0 = _bn_affine(pre_bn)
    scale1, shift1 = _bn_affine(bn)
    weight = conv.weight.flatten(1)
    # conv(pre_bn(x)) = x @ (W * scale0)^T + W @ shift0 (+ b), then bn scales rows and shifts.
    bias = weight @ shift0
    if conv.bias is not None:
        bias = bias + conv.bias
    return _linear(x, weight * scale0 * scale1[:, None], bias * scale1 + shift1, "gelu", approximate)
