"""HiLo attention and the other LITv2 pieces: the convolutional FFN and deformable token merging.

Pan, Cai and Zhuang, "Fast Vision Transformers with HiLo Attention", NeurIPS 2022 (arXiv:2205.13213);
official code: github.com/ziplab/LITv2. Deformable token merging comes from LITv1 (Pan et al.,
"Less is More: Pay Less Attention in Vision Transformers", AAAI 2022, arXiv:2105.14217).

HiLo splits the heads in two groups. A fraction `alpha` of them (Lo-Fi) attends from every token to
keys and values computed from the map average-pooled by the window size s, which captures the low
frequencies at 1/s^2 of the key count. The remaining heads (Hi-Fi) attend within non-overlapping
s x s windows, which captures local high frequencies. Each group has its own output projection;
the outputs are concatenated (Hi-Fi first). With s = 1 all heads are Lo-Fi over unpooled keys: plain
multi-head self-attention with separate q and kv projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula
from torchvision.ops import deform_conv2d

from ._layout import pad_to_multiple, window_partition, window_reverse

__all__ = ["ConvFFN", "DeformableTokenMerging", "HiLoAttention"]


def _deform_conv2d_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # Bilinear sampling aside, a deformable conv multiplies and adds as often as a plain conv of its shape.
    return conv_flop_count(list(input_shape), list(weight_shape), list(out_shape), transposed=False)


# torch's FlopCounterMode knows no formula for torchvision's op and would count LITv2's token merging
# as free (0.17 of LITv2-S's 3.7 GMACs); registered once, whoever imports first.
if torch.ops.torchvision.deform_conv2d.default not in flop_registry:
    register_flop_formula(torch.ops.torchvision.deform_conv2d)(_deform_conv2d_flops)


class HiLoAttention(nn.Module):
    """HiLo attention on a channels-last map (official `HiLo`).

    Heads split as the official code does: `int(num_heads * alpha)` Lo-Fi heads, the rest Hi-Fi, all
    Lo-Fi when `window_size == 1`. H and W that are not multiples of the window are zero-padded on the
    bottom/right and cropped after both paths, as the official detection/segmentation backbones do
    (the classification model only ever sees multiples).

    Args:
        dim: channels C.
        num_heads: total heads; head_dim = C // num_heads for both paths.
        window_size: s, the Hi-Fi window side and the Lo-Fi pooling factor.
        alpha: fraction of heads on the Lo-Fi path.
        qkv_bias: bias in the q/k/v projections (True in every released LITv2).
        qk_scale: logit scale override (defaults to head_dim ** -0.5).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int = 2,
        alpha: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        head_dim = dim // num_heads
        self.dim = dim
        self.window_size = window_size
        self.lo_heads = num_heads if window_size == 1 else int(num_heads * alpha)
        self.hi_heads = num_heads - self.lo_heads
        self.lo_dim = self.lo_heads * head_dim
        self.hi_dim = self.hi_heads * head_dim
        self.scale = qk_scale or head_dim**-0.5
        if self.hi_heads:
            self.hi_qkv = nn.Linear(dim, 3 * self.hi_dim, bias=qkv_bias, **dd)
            self.hi_proj = nn.Linear(self.hi_dim, self.hi_dim, **dd)
        if self.lo_heads:
            self.lo_q = nn.Linear(dim, self.lo_dim, bias=qkv_bias, **dd)
            self.lo_kv = nn.Linear(dim, 2 * self.lo_dim, bias=qkv_bias, **dd)
            self.lo_proj = nn.Linear(self.lo_dim, self.lo_dim, **dd)

    def high_frequency(self, x: torch.Tensor) -> torch.Tensor:
        """Hi-Fi path: attention within s x s windows. x: (B, H, W, C), H and W multiples of s -> (B, H, W, hi_dim)."""
        b, h, w, _ = x.shape
        s, heads = self.window_size, self.hi_heads
        # The projection is per token, so it runs on the map and only its output is partitioned.
        qkv = window_partition(self.hi_qkv(x), (s, s))  # (B, nW, s, s, 3 * hi_dim)
        windows = (h // s) * (w // s)  # explicit (not -1): a batch of 0 images reshapes too
        qkv = qkv.reshape(b * windows, s * s, 3, heads, self.hi_dim // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        out = out.transpose(1, 2).reshape(b, windows, s, s, self.hi_dim)
        return self.hi_proj(window_reverse(out, (h // s, w // s)))

    def low_frequency(self, x: torch.Tensor) -> torch.Tensor:
        """Lo-Fi path: all queries attend to s x s average-pooled keys/values. x: (B, H, W, C) -> (B, H, W, lo_dim)."""
        b, h, w, _ = x.shape
        s, heads = self.window_size, self.lo_heads
        head_dim = self.lo_dim // heads
        q = self.lo_q(x).reshape(b, h * w, heads, head_dim).transpose(1, 2)
        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1) if s > 1 else x
        kv = self.lo_kv(pooled).reshape(b, pooled.shape[1] * pooled.shape[2], 2, heads, head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], scale=self.scale)
        return self.lo_proj(out.transpose(1, 2).reshape(b, h, w, self.lo_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C), channels [0, hi_dim) from Hi-Fi, the rest from Lo-Fi."""
        _, h, w, _ = x.shape
        x, (pad_b, pad_r) = pad_to_multiple(x, (self.window_size, self.window_size))
        outs = []
        if self.hi_heads:
            outs.append(self.high_frequency(x))
        if self.lo_heads:
            outs.append(self.low_frequency(x))
        out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        if pad_b or pad_r:
            out = out[:, :h, :w]
        return out


class ConvFFN(nn.Module):
    """LITv2's feed-forward: fc1, 3 x 3 depthwise conv, GELU, fc2 on a channels-last map (official `DWMlp`).

    Args:
        dim: input and output channels C.
        hidden_dim: hidden channels.
        drop: dropout after the activation and after fc2.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        # As the official DWMlp: He-normal over the depthwise fan-out, zero bias.
        nn.init.normal_(self.dwconv.weight, 0.0, math.sqrt(2.0 / 9))
        nn.init.zeros_(self.dwconv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = self.fc1(x)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class DeformableTokenMerging(nn.Module):
    """2 x 2 stride-2 deformable convolution, BatchNorm and GELU (official `DTM` with `DeformConv2dPack`).

    A plain conv predicts one (dy, dx) offset per kernel tap from the input; torchvision's
    `deform_conv2d` samples bilinearly at the shifted taps (zero outside the map), as the DCN kernel
    of the official code does. Offsets start at zero, so a fresh module is an ordinary strided conv.

    Output size is floor(H / 2) x floor(W / 2), as in the official backbones.

    Two guards around torchvision's kernel, which turns sampling positions into integer indices unchecked
    (offsets that are not finite, or near 1e20, crash the process):

    - an output position whose predicted offsets are not all finite (NaN or Inf in the input, a diverged
      run) is NaN, as a plain convolution over such an input would be; its sampling position is undefined.
    - finite offsets are clamped to +-(max(H, W) + 2) pixels. Every tap shifted that far or further lands
      outside the map, where bilinear sampling reads zero, so the clamp changes no value and no gradient.

    torchvision's `deform_conv2d` has kernels for float32 and float64 only: in any other dtype (a bf16
    model, CPU or CUDA autocast) the op alone is computed in float32 and its output cast back to the
    input's dtype (what torchvision's own CUDA autocast rule does); the offset conv, BatchNorm and GELU run
    as autocast or the model's dtype decide.

    Args:
        dim: input channels.
        out_dim: output channels.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.offset = nn.Conv2d(dim, 2 * 2 * 2, 2, stride=2, **dd)
        self.weight = nn.Parameter(torch.empty(out_dim, dim, 2, 2, **dd))
        self.bias = nn.Parameter(torch.empty(out_dim, **dd))
        self.norm = nn.BatchNorm2d(out_dim, **dd)
        self.act = nn.GELU()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PyTorch's conv default for the deformable weights, zero offsets (the official init_offset).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / math.sqrt(self.weight[0].numel()), 1 / math.sqrt(self.weight[0].numel()))
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H // 2, W // 2, out_dim)."""
        if x.shape[1] < 2 or x.shape[2] < 2:
            raise ValueError(f"DeformableTokenMerging needs a map of at least 2 x 2, got {tuple(x.shape[1:3])}")
        x = x.permute(0, 3, 1, 2)
        offset = self.offset(x)
        undefined = ~torch.isfinite(offset).all(1, keepdim=True)  # (B, 1, H // 2, W // 2)
        limit = float(max(x.shape[-2:]) + 2)
        offset = offset.nan_to_num(0.0).clamp(-limit, limit)
        # All four operands in one dtype the kernel has (autocast leaves the op alone on the CPU, and on CUDA
        # torchvision's own rule casts to float32 as well).
        compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        out = deform_conv2d(x.to(compute), offset.to(compute), self.weight.to(compute), self.bias.to(compute), stride=2)
        out = out.masked_fill(undefined, float("nan")).to(x.dtype)
        return self.act(self.norm(out)).permute(0, 2, 3, 1)
