"""HiLo attention, the token mixer of LITv2.

Pan, Cai and Zhuang, "Fast Vision Transformers with HiLo Attention", NeurIPS 2022 (arXiv:2205.13213);
official code: github.com/ziplab/LITv2. The family's other layers (the convolutional FFN, deformable token
merging) are in `zoo.models.litv2`.

HiLo splits the heads in two groups. A fraction `alpha` of them (Lo-Fi) attends from every token to
keys and values computed from the map average-pooled by the window size s, which captures the low
frequencies at 1/s^2 of the key count. The remaining heads (Hi-Fi) attend within non-overlapping
s x s windows, which captures local high frequencies. Each group has its own output projection;
the outputs are concatenated (Hi-Fi first). With s = 1 all heads are Lo-Fi over unpooled keys: plain
multi-head self-attention with separate q and kv projections.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._layout import pad_to_multiple, window_partition, window_reverse

__all__ = ["HiLoAttention"]


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
