"""Cross-shaped window self-attention with locally-enhanced positional encoding, the token mixer of CSWin.

Dong et al., "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
CVPR 2022 (arXiv:2107.00652); official code: github.com/microsoft/CSWin-Transformer.

The heads are split in two groups of equal width. The first group attends within vertical stripes (full
height, `split_size` columns), the second within horizontal stripes (`split_size` rows, full width), so
every token sees the cross made of its column band and its row band. LePE adds a 3 x 3 depthwise
convolution of V, computed inside each stripe, to the attention output. The last stage of CSWin uses
one group of all heads over the whole map instead (`full_attention=True`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.kernels.fused_pointwise import is_plain

__all__ = ["CrossShapedWindowAttention", "row_stripe_attention"]


def row_stripe_attention(
    qkv: torch.Tensor,
    stripe: int,
    num_heads: int,
    lepe_weight: torch.Tensor,
    lepe_bias: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention within horizontal stripes of `stripe` full-width rows, plus LePE per stripe.

    Rows that do not divide into stripes are zero-padded, half above and half (plus the odd row) below,
    and cropped afterwards, as the official segmentation backbone does; as there, padded keys are not
    masked. A stripe of all rows is full attention. Vertical stripes are this on the transposed map.

    Args:
        qkv: (B, R, S, 3, C) projected queries, keys and values on an R x S map.
        stripe: rows per stripe.
        num_heads: heads over the C channels.
        lepe_weight: (C, 1, 3, 3) depthwise LePE kernel, applied to V inside each stripe.
        lepe_bias: (C,) LePE bias.
        scale: attention logit scale.
        dropout_p: attention-probability dropout.
        out: optional (B, R, S, C) tensor, any strides (e.g. a transposed half of a larger map), that receives
            the result: the sum is written there directly instead of into a new tensor.

    Returns:
        (B, R, S, C) attention output plus LePE (`out` when given).
    """
    b, r, s, _, c = qkv.shape
    pad = (stripe - r % stripe) % stripe
    if pad:
        # F.pad on (B, R, S * 3 * C): only the row dimension is padded.
        qkv = F.pad(qkv.reshape(b, r, s * 3 * c), (0, 0, pad // 2, pad - pad // 2)).reshape(b, r + pad, s, 3, c)
    # Full-width stripes are contiguous runs of rows: partitioning is a view.
    n, tokens = b * (r + pad) // stripe, stripe * s
    q, k, v = qkv.reshape(n, tokens, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    v_map = qkv[:, :, :, 2].reshape(n, stripe, s, c).permute(0, 3, 1, 2)
    pos = F.conv2d(v_map, lepe_weight, lepe_bias, padding=1, groups=c).flatten(2).transpose(1, 2)
    # The CPU kernel lays its output out like q, tokens outer of heads here: the transpose and reshape are views.
    attn = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale).transpose(1, 2)
    attn, pos = attn.reshape(b, r + pad, s, c), pos.reshape(b, r + pad, s, c)
    if pad:
        attn, pos = attn[:, pad // 2 : pad // 2 + r], pos[:, pad // 2 : pad // 2 + r]
    if out is None:
        return attn + pos
    # `add(out=)` has no autograd and Dynamo does not trace it into a strided view; a copy into the view is
    # traced and differentiated (and the compiler fuses it with the add).
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (attn.requires_grad or pos.requires_grad)):
        return out.copy_(attn + pos)
    return torch.add(attn, pos, out=out)


class CrossShapedWindowAttention(nn.Module):
    """Cross-shaped window attention with LePE on a channels-last map (official `CSWinBlock` mixer).

    One q/k/v projection over all channels; channels [0, C/2) (the first half of the heads) attend in
    vertical stripes of `split_size` columns, channels [C/2, C) in horizontal stripes of `split_size`
    rows; each half has its own LePE conv; the halves are concatenated and projected. This is the
    official channel order, and the one its checkpoints need. With `full_attention` all heads attend
    over the whole map (CSWin's last stage).

    Any H, W works: stripes that do not divide the map are zero-padded on both sides and cropped, as
    the official segmentation backbone does (at the classification resolution nothing is padded).

    Args:
        dim: channels C.
        num_heads: heads over all C channels (each stripe direction gets half of them).
        split_size: stripe width sw.
        full_attention: attend over the whole map with all heads instead of stripes.
        qkv_bias: bias in the q/k/v projection (True in every released CSWin).
        qk_scale: logit scale override (defaults to head_dim ** -0.5).
        attn_drop: attention-probability dropout during training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int = 7,
        full_attention: bool = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        branches = 1 if full_attention else 2
        if num_heads % branches or dim % num_heads:
            raise ValueError(
                f"dim ({dim}) must be divisible by num_heads ({num_heads}), and num_heads even for stripes"
            )
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.split_size = split_size
        self.full_attention = full_attention
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        branch_dim = dim // branches
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.lepe = nn.ModuleList(
            [nn.Conv2d(branch_dim, branch_dim, 3, padding=1, groups=branch_dim, **dd) for _ in range(branches)]
        )
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        dropout_p = self.attn_drop if self.training else 0.0
        if self.full_attention:
            qkv = self.qkv(x).reshape(b, h, w, 3, c)
            lepe = self.lepe[0]
            out = row_stripe_attention(qkv, h, self.num_heads, lepe.weight, lepe.bias, self.scale, dropout_p)
            return self.proj(out)
        half, heads, sw = c // 2, self.num_heads // 2, self.split_size
        if is_plain(self.qkv, nn.Linear):
            # Each branch projects only its own q/k/v channels (its rows of the fused weight), so neither has
            # to copy its half out of a fused output. The vertical branch projects the transposed map: its
            # stripes become full-width rows there, and its LePE kernel is transposed to match.
            w_v, w_h = self.qkv.weight.unflatten(0, (3, c)).split(half, dim=1)
            b_v, b_h = (None, None) if self.qkv.bias is None else self.qkv.bias.unflatten(0, (3, c)).split(half, dim=1)
            # The transposed map is copied first (C channels per token, less than the 1.5 C of its projection):
            # on a strided 4-D input `F.linear` runs as a batched matmul, 1.4x the time of one contiguous GEMM
            # (4.5 vs 3.2 ms on 8 x 14 x 14 x 256, one thread).
            x_t = x.transpose(1, 2).contiguous()
            qkv_v = F.linear(x_t, w_v.flatten(0, 1), None if b_v is None else b_v.flatten())
            qkv_h = F.linear(x, w_h.flatten(0, 1), None if b_h is None else b_h.flatten())
        else:
            # A hooked or wrapped projection (LoRA, quantisation) is called as it is, then split.
            qkv = self.qkv(x).unflatten(-1, (3, c))
            qkv_v, qkv_h = qkv[..., :half].transpose(1, 2), qkv[..., half:]
        lepe_v, lepe_h = self.lepe
        # Each branch adds attention and LePE straight into its half of the projection's input (the vertical one
        # through a transposed view), instead of a sum per branch and a `torch.cat` copy of both: one pass over
        # the map instead of two, which is most of the copying on the large early maps.
        mixed = x.new_empty(b, h, w, c)
        row_stripe_attention(
            qkv_v.reshape(b, w, h, 3, half),
            sw,
            heads,
            lepe_v.weight.transpose(2, 3),
            lepe_v.bias,
            self.scale,
            dropout_p,
            out=mixed[..., :half].transpose(1, 2),
        )
        row_stripe_attention(
            qkv_h.reshape(b, h, w, 3, half),
            sw,
            heads,
            lepe_h.weight,
            lepe_h.bias,
            self.scale,
            dropout_p,
            out=mixed[..., half:],
        )
        return self.proj(mixed)
