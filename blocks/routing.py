"""Bi-Level Routing Attention (BRA), the token mixer of BiFormer.

Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023
(arXiv:2303.08810); official code: github.com/rayleizhu/BiFormer.

BRA splits the map into `n_win` x `n_win` regions, scores region pairs by the dot product of
their mean query and mean key, keeps the `topk` best key regions for every query region, and
runs token-to-token attention from each query region to the tokens of its routed regions. A
depthwise convolution on V (local context enhancement, LCE) is added before the output
projection. `GlobalAttentionLePE` is BiFormer's last-stage mixer: full attention plus LCE.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.kernels import block_sparse_attention
from zoo.kernels.fused_pointwise import conv_add, linear

from ._layout import pad_to_multiple, window_partition, window_reverse

__all__ = ["BiLevelRoutingAttention", "GlobalAttentionLePE", "route_regions"]


def route_regions(q_region: torch.Tensor, k_region: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """Region-to-region routing: indices of the `topk` key regions with the largest affinity.

    Args:
        q_region: (B, R, C) mean query of each region.
        k_region: (B, Rk, C) mean key of each region.
        topk: regions kept per query region.
        scale: logit scale (the official code uses qk_dim ** -0.5).

    Returns:
        (B, R, topk) int64 indices, sorted by decreasing affinity. Routing is not differentiated.
    """
    affinity = (q_region.detach() * scale) @ k_region.detach().transpose(-1, -2)
    return torch.topk(affinity, k=topk, dim=-1).indices


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    # A (B, H, W, C) tensor seen as NCHW with channels_last strides: convs run without a copy.
    return x.permute(0, 3, 1, 2)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention on a channels-last map.

    Matches the official released configuration (`kv_downsample_mode='identity'`, `param_routing=False`,
    `diff_routing=False`, `soft_routing=False`, `param_attention='qkvo'`): one fused q/k/v projection, a
    parameter-free router, LCE on V and an output projection. As in the official code, the logit scale
    is `qk_dim ** -0.5` for routing and attention alike (not the per-head dimension).

    Sizes that are not multiples of `n_win` are zero-padded on the bottom/right before the projection and
    cropped after it, as the official `auto_pad=True` (used by its detection/segmentation models) does.

    Args:
        dim: channels C of the input and output.
        num_heads: attention heads; `qk_dim` and `dim` must be divisible by it.
        n_win: regions per side (the map is split into n_win x n_win regions).
        topk: key regions routed to each query region (at most n_win ** 2).
        qk_dim: channels of queries and keys (defaults to `dim`).
        qk_scale: logit scale override (defaults to `qk_dim ** -0.5`).
        side_dwconv: kernel size of the LCE depthwise conv on V; 0 disables it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        topk: int = 4,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim ({self.qk_dim}) and dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 0 < topk <= n_win * n_win:
            raise ValueError(f"topk must lie in [1, n_win ** 2 = {n_win * n_win}], got {topk}")
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_scale or self.qk_dim**-0.5
        self.qkv = nn.Linear(dim, 2 * self.qk_dim + dim, **dd)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd) if side_dwconv > 0 else None
        )
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        _, height, width, _ = x.shape
        x, (pad_b, pad_r) = pad_to_multiple(x, (self.n_win, self.n_win))
        b, hp, wp, _ = x.shape
        n, heads = self.n_win, self.num_heads
        wh, ww = hp // n, wp // n
        tokens = wh * ww

        # Region partition of the input, before the projection: one copy of C channels per token instead of the
        # 2 * qk_dim + C of the projected map (the rows of a GEMM are independent, so the projection of the
        # partitioned map is the partition of the projection). The channels stay innermost: moving the heads out
        # in one copy is several times slower on the CPU.
        x = window_partition(x, (wh, ww)).flatten(1, 3)
        qkv = linear(x, self.qkv)  # (B, R * L, 2 * qk_dim + C), region by region
        regions = qkv.view(b, n * n, tokens, qkv.shape[-1])
        means = regions[..., : 2 * self.qk_dim].mean(2)  # (B, R, 2 * qk_dim): region means of q and k
        region_index = route_regions(means[..., : self.qk_dim], means[..., self.qk_dim :], self.topk, self.scale)
        # The head split as strided views: the op takes them as they are (the masked form of short maps never
        # copies them; the others lay them out as they need).
        q, k, v_regions = (
            t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)  # (B, h, R * L, d)
            for t in qkv.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        )

        # Routed attention is block-sparse attention with one block per region and the routing index as the
        # index table, shared by the heads.
        out = block_sparse_attention(
            q,
            k,
            v_regions,
            region_index.unsqueeze(1),
            block_q=tokens,
            block_k=tokens,
            scale=self.scale,
        )
        # (B, h, R * L, d) -> (B, Hp, Wp, h * d): head merge, then window reverse with the channels innermost.
        out = window_reverse(out.transpose(1, 2).reshape(b, n * n, wh, ww, self.dim), (n, n))
        if self.lepe is not None:
            # V back in map order (the copy the depthwise conv needs anyway), and the sum with the attention output
            # as the conv's post-op (zoo.kernels.fused_pointwise, CPU inference).
            v = window_reverse(qkv[..., 2 * self.qk_dim :].unflatten(1, (n * n, wh, ww)), (n, n))
            out = _channels_last(conv_add(_channels_first(v), self.lepe, _channels_first(out)))
        out = linear(out, self.proj)
        if pad_b or pad_r:
            out = out[:, :height, :width].contiguous()
        return out


class GlobalAttentionLePE(nn.Module):
    """Full multi-head self-attention plus LCE, BiFormer's last-stage mixer (official `AttentionLePE`).

    The official code builds it with its default 8 heads whatever the stage width, a q/k/v projection
    without bias, and the depthwise LCE applied to the mixer's input (not to V).

    Args:
        dim: channels C.
        num_heads: attention heads.
        side_dwconv: kernel size of the LCE depthwise conv; 0 disables it.
        qk_scale: logit scale override (defaults to head_dim ** -0.5).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        side_dwconv: int = 5,
        qk_scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **dd)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd) if side_dwconv > 0 else None
        )
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        if self.lepe is not None:
            out = out + _channels_last(self.lepe(_channels_first(x)))
        return self.proj(out)
