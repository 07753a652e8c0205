"""CSWin's and LITv2's attention as the official code computes it, over the zoo's weights.

Anchors, not layers to use: each recomputes a zoo attention module the way the authors' code does (token-sequence
layout, explicit `q @ k^T`, softmax and `attn @ v`, the official reshapes, `.contiguous()` copies and per-window
LePE), written from reading microsoft/CSWin-Transformer `models/cswin.py` (`LePEAttention`, `CSWinBlock`) and
ziplab/LITv2 `classification/models/attentions.py` (`HiLo`). `swap_official_attention(model)` puts them in place
of a zoo CSWin or LITv2 model's attention; everything else (norms, MLPs, stems, merges) stays the zoo's. Tests
check that the zoo model computes the same logits; `benchmarks/cswin_litv2_vs_official.py` times the two.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["OfficialCSWinAttention", "OfficialHiLo", "swap_official_attention"]


class OfficialCSWinAttention(nn.Module):
    """The official `CSWinBlock` attention path (qkv, two `LePEAttention` branches, proj) over zoo weights.

    Works on the (B, L, C) token sequence the way the official code does: q, k, v are sliced per branch,
    turned back into (B, C, H, W) images, cut into stripes with `.contiguous()` copies, LePE runs per
    stripe, and attention is an explicit scaled `q @ k^T`, softmax and `@ v`.
    """

    def __init__(self, zoo_attn: nn.Module):
        super().__init__()
        self.zoo = zoo_attn

    @staticmethod
    def _to_windows(x: torch.Tensor, h_sp: int, w_sp: int) -> torch.Tensor:
        # (B, C, H, W) -> (B * nW, h_sp * w_sp, C)
        b, c, h, w = x.shape
        x = x.view(b, c, h // h_sp, h_sp, w // w_sp, w_sp).permute(0, 2, 4, 3, 5, 1).contiguous()
        return x.reshape(-1, h_sp * w_sp, c)

    def _branch(self, q, k, v, h, w, h_sp, w_sp, heads, lepe_conv):
        b, _, c = q.shape
        scale = self.zoo.scale

        def image(t):
            return t.transpose(-2, -1).contiguous().view(b, c, h, w)

        def split_heads(t):
            return t.reshape(-1, h_sp * w_sp, heads, c // heads).permute(0, 2, 1, 3).contiguous()

        q = split_heads(self._to_windows(image(q), h_sp, w_sp))
        k = split_heads(self._to_windows(image(k), h_sp, w_sp))
        v_img = image(v).view(b, c, h // h_sp, h_sp, w // w_sp, w_sp)
        v_img = v_img.permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, c, h_sp, w_sp)
        lepe = lepe_conv(v_img).reshape(-1, heads, c // heads, h_sp * w_sp).permute(0, 1, 3, 2).contiguous()
        v = v_img.reshape(-1, heads, c // heads, h_sp * w_sp).permute(0, 1, 3, 2).contiguous()
        attn = (q * scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        out = (attn @ v + lepe).transpose(1, 2).reshape(-1, h_sp * w_sp, c)
        out = out.view(b, h // h_sp, w // w_sp, h_sp, w_sp, c).permute(0, 1, 3, 2, 4, 5).contiguous()
        return out.view(b, -1, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        zoo = self.zoo
        qkv = zoo.qkv(x.reshape(b, h * w, c)).reshape(b, -1, 3, c).permute(2, 0, 1, 3)
        if zoo.full_attention:
            out = self._branch(qkv[0], qkv[1], qkv[2], h, w, h, w, zoo.num_heads, zoo.lepe[0])
        else:
            half, sw, heads = c // 2, zoo.split_size, zoo.num_heads // 2
            parts = qkv[..., :half], qkv[..., half:]
            x1 = self._branch(parts[0][0], parts[0][1], parts[0][2], h, w, h, sw, heads, zoo.lepe[0])
            x2 = self._branch(parts[1][0], parts[1][1], parts[1][2], h, w, sw, w, heads, zoo.lepe[1])
            out = torch.cat([x1, x2], dim=2)
        return zoo.proj(out).view(b, h, w, c)


class OfficialHiLo(nn.Module):
    """The official `HiLo.forward` over zoo weights: explicit matmul attention, `AvgPool2d`, official reshapes."""

    def __init__(self, zoo_attn: nn.Module):
        super().__init__()
        self.zoo = zoo_attn
        if zoo_attn.window_size > 1:
            self.sr = nn.AvgPool2d(zoo_attn.window_size, zoo_attn.window_size)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        zoo = self.zoo
        b, h, w, c = x.shape
        ws, heads, dim = zoo.window_size, zoo.hi_heads, zoo.hi_dim
        hg, wg = h // ws, w // ws
        x = x.reshape(b, hg, ws, wg, ws, c).transpose(2, 3)
        qkv = zoo.hi_qkv(x).reshape(b, hg * wg, -1, 3, heads, dim // heads).permute(3, 0, 1, 4, 2, 5)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * zoo.scale
        attn = (attn.softmax(dim=-1) @ qkv[2]).transpose(2, 3).reshape(b, hg, wg, ws, ws, dim)
        return zoo.hi_proj(attn.transpose(2, 3).reshape(b, hg * ws, wg * ws, dim))

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        zoo = self.zoo
        b, h, w, c = x.shape
        heads, dim = zoo.lo_heads, zoo.lo_dim
        q = zoo.lo_q(x).reshape(b, h * w, heads, dim // heads).permute(0, 2, 1, 3)
        if zoo.window_size > 1:
            pooled = self.sr(x.permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
            kv = zoo.lo_kv(pooled).reshape(b, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        else:
            kv = zoo.lo_kv(x).reshape(b, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ kv[0].transpose(-2, -1)) * zoo.scale).softmax(dim=-1)
        return zoo.lo_proj((attn @ kv[1]).transpose(1, 2).reshape(b, h, w, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official classifier reshapes (B, N, C) to (B, H, W, C): the same memory as ours.
        if self.zoo.hi_heads == 0:
            return self.lofi(x)
        if self.zoo.lo_heads == 0:
            return self.hifi(x)
        return torch.cat((self.hifi(x), self.lofi(x)), dim=-1)


def swap_official_attention(model: nn.Module) -> nn.Module:
    """Replace, in place, every CSWin and HiLo attention module of a zoo model by its official-path anchor over the
    same weights; returns the model."""
    from zoo.blocks.cross_shaped import CrossShapedWindowAttention
    from zoo.blocks.hilo import HiLoAttention

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, CrossShapedWindowAttention):
                setattr(module, name, OfficialCSWinAttention(child))
            elif isinstance(child, HiLoAttention):
                setattr(module, name, OfficialHiLo(child))
    return model
