"""Dual attention, the token mixers of DaViT: spatial window attention and channel group attention.

Ding et al., "DaViT: Dual Attention Vision Transformers", ECCV 2022 (arXiv:2204.03645); official
code: github.com/dingmyu/davit.

A DaViT stage alternates two blocks (`zoo.models.davit`). The spatial block's mixer runs multi-head
self-attention inside non-overlapping windows (tokens attend to tokens). The channel block's runs attention
across channels within each of `num_heads` channel groups, over all positions at once (channels attend to
channels), which gives every block a global receptive field at linear cost in the number of tokens.

Everything here is channels-last, (B, H, W, C). Maps whose sides are not multiples of the window
are zero-padded after the norm and cropped after the attention, as the official code does; the
padded tokens take part in the attention unmasked, also as there.

The projections run through `zoo.kernels.fused_pointwise`, which takes the modules: in CPU inference it adds
the residual as a oneDNN post-op; otherwise (training, hooked or wrapped layers) it calls the modules.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple
from zoo.kernels.fused_pointwise import is_plain, linear, linear_add

from ._layout import pad_to_multiple, window_partition, window_reverse

__all__ = ["ChannelAttention", "WindowAttention"]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, without position bias.

    Args:
        dim: channels C.
        num_heads: heads; dim must be divisible by it.
        window_size: window (wh, ww) or side.
        qkv_bias: bias of the fused q/k/v projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.window_size = to_2tuple(window_size)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); plus `residual` (B, H, W, C) when given."""
        b, h, w, c = x.shape
        x, (pad_b, pad_r) = pad_to_multiple(x, self.window_size)
        grid = ((h + pad_b) // self.window_size[0], (w + pad_r) // self.window_size[1])
        tokens = self.window_size[0] * self.window_size[1]
        # Cutting windows before the q/k/v projection moves C channels instead of 3C.
        windows = window_partition(x, self.window_size)
        # TorchScript cannot hand modules to `zoo.kernels.fused_pointwise`: the modules are called as they are.
        qkv = self.qkv(windows) if torch.jit.is_scripting() else linear(windows, self.qkv)
        n_windows = grid[0] * grid[1]  # explicit (not -1): a batch of 0 images reshapes too
        qkv = qkv.view(b * n_windows, tokens, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        out = out.transpose(1, 2).reshape(b, n_windows, self.window_size[0], self.window_size[1], c)
        out = window_reverse(out, grid)
        if pad_b > 0 or pad_r > 0:
            out = out[:, :h, :w]
        if torch.jit.is_scripting():
            out = self.proj(out)
            return out if residual is None else residual + out
        if residual is None:
            return linear(out, self.proj)
        return linear_add(out, self.proj, residual)


class ChannelAttention(nn.Module):
    """Channel group attention: within each of `num_heads` groups of d = C / num_heads channels, every
    channel attends to every channel, with logits summed over all positions.

    As in the official code the logits are keys^T values (d x d per group) scaled by d ** -0.5, and
    the softmax weights mix the query channels. Where the map has more positions than channels, the
    weights are folded into the output projection (C x C per image) so that the mixed queries are
    never written out; the result is the same up to float rounding.

    Args:
        dim: channels C.
        num_heads: channel groups; dim must be divisible by it.
        qkv_bias: bias of the fused q/k/v projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); plus `residual` (B, H, W, C) when given."""
        b, h, w, c = x.shape
        n, d = h * w, c // self.num_heads
        if torch.jit.is_scripting():
            # TorchScript cannot hand modules to `zoo.kernels.fused_pointwise`: the modules are called as they are.
            q, k, v = self.qkv(x).view(b, n, 3, c).unbind(2)
            k = k.view(b, n, self.num_heads, d).permute(0, 2, 3, 1)  # (B, groups, d, N)
            weights = ((k @ v.view(b, n, self.num_heads, d).transpose(1, 2)) * self.scale).softmax(-1)
            out = q.view(b, n, self.num_heads, d).transpose(1, 2) @ weights.transpose(-1, -2)  # (B, groups, N, d)
            out = self.proj(out.transpose(1, 2).reshape(b, h, w, c))
            return out if residual is None else residual + out
        qkv = linear(x, self.qkv).view(b, n, 3, c)
        if torch.is_grad_enabled():
            # One unbind: its backward stacks the three gradients instead of zero-filling per slice.
            q, k, v = qkv.unbind(2)
            k = k.view(b, n, self.num_heads, d).permute(0, 2, 3, 1)  # (B, groups, d, N)
            logits = k @ v.view(b, n, self.num_heads, d).transpose(1, 2)
        else:
            # Per-group k^T v on strided slices of the projection: bmm reads them in place.
            q = qkv[:, :, 0]
            groups = [slice(g * d, (g + 1) * d) for g in range(self.num_heads)]
            logits = torch.stack([qkv[:, :, 1, g].transpose(1, 2) @ qkv[:, :, 2, g] for g in groups], 1)
        weights = (logits * self.scale).softmax(-1)  # (B, groups, d, d)
        if n > c and is_plain(self.proj, nn.Linear):
            # proj(mix(q)) = q @ (W_proj . blockdiag(weights))^T + b: one (N x C) @ (C x C) per image. Only
            # for a plain Linear: a hooked or wrapped projection is called on the mixed queries instead.
            mixed_proj = torch.einsum("ogi,bgij->bogj", self.proj.weight.view(c, self.num_heads, d), weights)
            mixed_proj = mixed_proj.reshape(b, c, c).transpose(1, 2)
            if q.requires_grad:
                # Saved for the backward, a view of q would keep the whole 3C-wide projection alive.
                q = q.contiguous()
            if residual is None:
                out = torch.matmul(q, mixed_proj)
            else:
                out = torch.baddbmm(residual.reshape(b, n, c), q, mixed_proj)
            if self.proj.bias is not None:
                out.add_(self.proj.bias)  # out is fresh and baddbmm's backward does not need it
            return out.view(b, h, w, c)
        out = q.view(b, n, self.num_heads, d).transpose(1, 2) @ weights.transpose(-1, -2)  # (B, groups, N, d)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        if residual is None:
            return linear(out, self.proj)
        return linear_add(out, self.proj, residual)
