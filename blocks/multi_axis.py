"""Multi-axis attention, the token mixer of MaxViT: MBConv, block attention and grid attention.

Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022 (arXiv:2204.01697); official code and
weights: github.com/google-research/maxvit (TensorFlow).

A MaxViT block is an MBConv (pre-norm inverted bottleneck with squeeze-excitation) followed by two
transformer layers: block attention, where tokens attend within non-overlapping P x P windows (local
mixing), and grid attention, where the map is split into a G x G grid and tokens attend across the
windows to the tokens at the same grid cell, spaced H / G and W / G apart (sparse global mixing).
Both attentions add a learned 2-D relative position bias per head, indexed by the key-minus-query
offset as in the official `reindex_2d_einsum_lookup`.

Tensors are channels-last, (B, H, W, C), everywhere; the convolutions see the same memory as an NCHW
view with channels_last strides, so no layout copy is made between the MBConv and the attention.

Maps whose sides are not multiples of P (or G) are zero-padded on the bottom/right and the padded
keys are masked out of the softmax, so a real token attends to the real tokens of its window or grid
cell only; the official model has no padding and requires every stage map to divide by P and G.

The projections, convolutions and BatchNorms run through `kernels.fused_pointwise`, which takes the
modules: in CPU inference it folds the BatchNorms into the convs and applies the tanh-GELU and the
residual adds as oneDNN post-ops; otherwise (training, hooked or wrapped layers) it calls the modules.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, SEModule, resize_rel_pos_bias_table, to_2tuple

from kernels.fused_pointwise import (
    bn_pointwise_conv_bn_gelu,
    conv_bn_gelu,
    linear_add,
    pointwise_conv,
    pointwise_conv_add,
)

from ._layout import grid_partition, grid_reverse, pad_to_multiple, window_partition, window_reverse
from ._mlp import ResidualMlp

__all__ = [
    "MBConv",
    "TfSameConv2d",
    "MaxViTBlock",
    "PartitionAttention",
    "PartitionTransformerLayer",
    "RelativePositionBias2d",
]


class TfSameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'same' padding: output ceil(H / stride), the odd pixel of padding at the bottom/right.

    A depthwise conv takes the extra bottom/right pixel as a leading zero row/column of its kernel and
    symmetric padding instead of a padded copy of its input (timm's `Conv2dSame`): on the 4x-wide
    MBConv maps that copy costs several times the convolution itself. Other convs pad the input.

    `conv_geometry` declares the forward a plain convolution, which `kernels.fused_pointwise` may fuse.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, 0, groups=groups, bias=bias, device=device, dtype=dtype
        )

    def conv_geometry(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(input, weight, symmetric padding) whose plain convolution is the 'same' one of (x, weight).

        Args:
            x: (B, C_in, H, W).
            weight: (C_out, C_in / groups, k, k).

        Returns:
            x, possibly padded at the bottom/right; weight, possibly with a leading zero row/column; the padding.
        """
        before: list[int] = []
        extra: list[int] = []
        for i in range(2):  # indexed, not zipped: TorchScript iterates over nothing of unknown length
            size, k, s = x.shape[i - 2], self.kernel_size[i], self.stride[i]
            total = max((-(-size // s) - 1) * s + k - size, 0)
            before.append(total // 2)
            extra.append(total - 2 * (total // 2))
        if extra[0] > 0 or extra[1] > 0:
            # Exported and scripted graphs pad the input instead: the ONNX optimizer folds a padded weight into
            # nothing, and TorchScript cannot ask whether it is exporting.
            if not torch.jit.is_scripting():
                if self.groups == self.in_channels and self.groups > 1 and not torch.compiler.is_exporting():
                    weight = F.pad(weight, (extra[1], 0, extra[0], 0))
                    return x, weight, [before[0] + extra[0], before[1] + extra[1]]
            x = F.pad(x, (0, extra[1], 0, extra[0]))
        return x, weight, before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        x, weight, padding = self.conv_geometry(x, self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)


class RelativePositionBias2d(nn.Module):
    """Learned 2-D relative position bias of an h x w attention window.

    The table holds one value per head and per offset (dy, dx) in [-(h-1), h-1] x [-(w-1), w-1];
    the bias of query (i, j) to key (y, x) is `table[:, y - i + h - 1, x - j + w - 1]`.

    Args:
        num_heads: heads.
        size: window (h, w) the attention runs on.
    """

    def __init__(
        self,
        num_heads: int,
        size: int | tuple[int, int],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.size = h, w = to_2tuple(size)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(num_heads, 2 * h - 1, 2 * w - 1, device=device, dtype=dtype)
        )
        self.register_buffer("index", self._offset_index(h, w, device), persistent=False)
        nn.init.normal_(self.relative_position_bias_table, std=0.02)

    @staticmethod
    def _offset_index(h: int, w: int, device: torch.device | str | None) -> torch.Tensor:
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        offset_rows = rows[None, :] - rows[:, None] + h - 1
        offset_cols = cols[None, :] - cols[:, None] + w - 1
        return offset_rows * (2 * w - 1) + offset_cols

    def set_size(self, size: int | tuple[int, int]) -> None:
        """Change the window to `size`, resizing the table as timm resizes its MaxViT tables."""
        size = to_2tuple(size)
        if tuple(size) == tuple(self.size):
            return
        table = self.relative_position_bias_table
        shape = (table.shape[0], 2 * size[0] - 1, 2 * size[1] - 1)
        with torch.no_grad(), torch.device(table.device):
            resized = resize_rel_pos_bias_table(table.detach(), new_window_size=size, new_bias_shape=shape)
        self.relative_position_bias_table = nn.Parameter(resized.to(table.dtype), requires_grad=table.requires_grad)
        self.size = tuple(size)
        self.index = self._offset_index(size[0], size[1], self.index.device)

    def forward(self) -> torch.Tensor:
        """Returns the bias (heads, h * w, h * w), queries along dim 1."""
        return self.relative_position_bias_table.flatten(1)[:, self.index]


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for q, k, v: (B, heads, N, d) and bias broadcastable to (B, heads, N, N).

    Without autograd: PyTorch's fused CPU kernel, given the bias expanded to 4-D (a 3-D mask sends
    the call to the unfused path, which also scans the logits for -inf rows). With autograd, the bias
    (a parameter) needs its gradient, which only the unfused path gives; written out here, it skips
    that scan and scales and biases the logits in place.
    """
    if not (torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad)):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.expand(q.shape[0], -1, -1, -1), dropout_p=dropout_p
        )
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).add_(bias)
    return torch.matmul(F.dropout(logits.softmax(-1), dropout_p), v)


class PartitionAttention(nn.Module):
    """Multi-head self-attention within windows ('block') or across a grid ('grid'), with relative bias.

    Args:
        dim: channels C.
        partition: 'block' (P x P windows) or 'grid' (G x G grid of dilated groups).
        size: P or G.
        head_dim: channels per head (heads = dim // head_dim).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        partition: str = "block",
        size: int | tuple[int, int] = 7,
        head_dim: int = 32,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if partition not in ("block", "grid"):
            raise ValueError(f"partition must be 'block' or 'grid', got {partition!r}")
        if dim % head_dim:
            raise ValueError(f"dim ({dim}) must be divisible by head_dim ({head_dim})")
        self.partition = partition
        self.size = to_2tuple(size)
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.attn_drop = attn_drop
        # q, k and v in one projection, output channels ordered (q|k|v, head, head_dim) as the
        # official per-head q/k/v kernels concatenated.
        self.qkv = nn.Linear(dim, 3 * dim, **dd)
        self.rel_pos = RelativePositionBias2d(self.num_heads, self.size, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def set_partition_size(self, size: int | tuple[int, int]) -> None:
        """Change the window P (or grid G); the relative-position table is resized to match."""
        self.size = to_2tuple(size)
        self.rel_pos.set_size(self.size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return window_partition(x, self.size) if self.partition == "block" else grid_partition(x, self.size)

    def _merge(self, groups: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.partition == "block":
            return window_reverse(groups, (size[0] // self.size[0], size[1] // self.size[1]))
        return grid_reverse(groups, size)

    def _padding_mask(self, size: tuple[int, int], pad: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """Additive mask (G, 1, 1, N): -inf on the keys that are padding, for each of the G groups."""
        h, w = size
        padded = torch.zeros(1, h, w, 1, dtype=torch.bool, device=like.device)
        padded[:, h - pad[0] :] = True
        padded[:, :, w - pad[1] :] = True
        padded = self._split(padded).flatten(2)  # (1, G, N)
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return torch.where(padded, float("-inf"), zero)[0, :, None, None, :]

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output before the output projection; x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        x, pad = pad_to_multiple(x, self.size)
        size = (x.shape[1], x.shape[2])
        # Partition before the q/k/v projection (a per-token op): the layout copy moves C channels, not 3C.
        groups = self.qkv(self._split(x))  # (B, G, p, p, 3C)
        n_groups, tokens = groups.shape[1], self.size[0] * self.size[1]
        qkv = groups.reshape(b * n_groups, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if torch.is_grad_enabled():
            # Batched matmuls need (B * heads) to flatten into one batch dim; the fused inference
            # kernel takes the strided views as they are.
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(0)
        bias = self.rel_pos()
        if pad[0] or pad[1]:
            bias = (bias + self._padding_mask(size, pad, bias)).repeat(b, 1, 1, 1)
        out = _attention(q, k, v, bias, self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n_groups, self.size[0], self.size[1], c)
        out = self._merge(out, size)
        return out[:, :h, :w] if pad[0] or pad[1] else out

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); plus `residual` (B, H, W, C) when given, added inside the projection."""
        out = self.mix(x)
        if torch.jit.is_scripting():
            # TorchScript cannot hand modules to `kernels.fused_pointwise`: the modules are called as they are.
            out = self.proj_drop(self.proj(out))
            return out if residual is None else residual + out
        if residual is None:
            return self.proj_drop(self.proj(out))
        if self.training and self.proj_drop.p > 0:  # the dropout sits between the projection and the add
            return residual + self.proj_drop(self.proj(out))
        return linear_add(out, self.proj, residual)


class PartitionTransformerLayer(nn.Module):
    """Pre-norm partition attention and MLP, each a residual; x: (B, H, W, C).

    Args:
        dim: channels C.
        partition: 'block' or 'grid'.
        size: window P or grid G.
        head_dim: channels per head.
        mlp_ratio: MLP hidden width / C.
        drop_path: stochastic depth of both residuals.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the attention projection and the MLP.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        partition: str = "block",
        size: int | tuple[int, int] = 7,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = PartitionAttention(
            dim, partition, size, head_dim=head_dim, attn_drop=attn_drop, proj_drop=proj_drop, **dd
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        # The official code's GELU is the tanh approximation.
        self.mlp = ResidualMlp(
            dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"), drop=proj_drop, **dd
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if torch.jit.is_scripting():
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        if self.training and not isinstance(self.drop_path, nn.Identity):
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        # Without an active drop-path each residual add goes into the projection before it.
        x = self.attn(self.norm1(x), residual=x)
        return self.mlp(self.norm2(x), residual=x)


class _Shortcut(nn.Module):
    """MBConv shortcut of a strided block: 2x2 average pooling ('same' padding), then a 1x1 conv if C changes."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        # ceil_mode without padding averages the valid pixels of an overhanging window, which is
        # TensorFlow's 'same' pooling on odd sizes.
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.expand = nn.Conv2d(in_dim, dim, 1, device=device, dtype=dtype) if in_dim != dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C_in) -> (B, ceil(H / 2), ceil(W / 2), C)."""
        if torch.jit.is_scripting():
            return self.expand(self.pool(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x if isinstance(self.expand, nn.Identity) else pointwise_conv(x, self.expand)


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck with squeeze-excitation, MaxViT's conv layer; x: (B, H, W, C_in).

    BN -> 1x1 conv (C_in -> 4 C) -> BN, GELU -> 3x3 depthwise conv (stride s, TF 'same' padding) -> BN,
    GELU -> SE -> 1x1 conv (4 C -> C), plus the shortcut (average-pooled and projected when strided).

    The 1x1 convs keep Conv2d weights (the checkpoints' layout) but run as GEMMs on the channels-last map
    (`kernels.fused_pointwise.pointwise_conv`).

    Args:
        in_dim: input channels C_in.
        dim: output channels C.
        stride: 1 or 2 (first block of a stage).
        expand_ratio: hidden width / C (the official code expands from the output width).
        se_ratio: SE bottleneck width / C.
        drop_path: stochastic depth of the residual branch.
        bn_eps: BatchNorm epsilon (TensorFlow's 1e-3 in the official model).
        bn_momentum: PyTorch BatchNorm momentum (TensorFlow's decay 0.99 is 0.01 here).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        stride: int = 1,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        drop_path: float = 0.0,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if stride == 1 and in_dim != dim:
            raise ValueError(f"an unstrided MBConv keeps the width, got {in_dim} -> {dim}")
        hidden = int(dim * expand_ratio)
        bn = dict(eps=bn_eps, momentum=bn_momentum, **dd)
        self.shortcut = _Shortcut(in_dim, dim, **dd) if stride == 2 else nn.Identity()
        self.pre_norm = nn.BatchNorm2d(in_dim, **bn)
        self.conv1_1x1 = nn.Conv2d(in_dim, hidden, 1, bias=False, **dd)
        self.norm1 = nn.BatchNorm2d(hidden, **bn)
        self.conv2_kxk = TfSameConv2d(hidden, hidden, 3, stride=stride, groups=hidden, bias=False, **dd)
        self.norm2 = nn.BatchNorm2d(hidden, **bn)
        self.se = SEModule(hidden, rd_channels=max(1, int(dim * se_ratio)), act_layer=nn.SiLU, **dd)
        self.conv3_1x1 = nn.Conv2d(hidden, dim, 1, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C_in) -> (B, ceil(H / s), ceil(W / s), C)."""
        if torch.jit.is_scripting():
            # TorchScript cannot hand modules to `kernels.fused_pointwise`: the modules are called as they are.
            y = F.gelu(self.norm1(self.conv1_1x1(self.pre_norm(x.permute(0, 3, 1, 2)))), approximate="tanh")
            y = self.se(F.gelu(self.norm2(self.conv2_kxk(y)), approximate="tanh"))
            return self.shortcut(x) + self.drop_path(self.conv3_1x1(y).permute(0, 2, 3, 1))
        y = bn_pointwise_conv_bn_gelu(x, self.pre_norm, self.conv1_1x1, self.norm1, "tanh")
        # The NCHW views of the contiguous (B, H, W, C) maps have channels_last strides: no layout copies.
        y = conv_bn_gelu(y.permute(0, 3, 1, 2), self.conv2_kxk, self.norm2, "tanh")
        y = self.se(y).permute(0, 2, 3, 1)
        if self.training and not isinstance(self.drop_path, nn.Identity):
            return self.shortcut(x) + self.drop_path(pointwise_conv(y, self.conv3_1x1))
        return pointwise_conv_add(y, self.conv3_1x1, self.shortcut(x))


class MaxViTBlock(nn.Module):
    """MBConv, block attention + MLP, grid attention + MLP; x: (B, H, W, C_in) -> (B, H / s, W / s, C).

    Args:
        in_dim: input channels.
        dim: output channels.
        stride: stride of the MBConv (2 in the first block of a stage).
        window_size: block-attention window P.
        grid_size: grid-attention grid G.
        head_dim: channels per head.
        mlp_ratio: MLP hidden width / C.
        expand_ratio: MBConv hidden width / C.
        se_ratio: SE bottleneck width / C.
        drop_path: stochastic depth of all five residuals.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after attention projections and MLPs.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        stride: int = 1,
        window_size: int | tuple[int, int] = 7,
        grid_size: int | tuple[int, int] = 7,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        layer = dict(
            head_dim=head_dim,
            mlp_ratio=mlp_ratio,
            drop_path=drop_path,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **dd,
        )
        self.conv = MBConv(in_dim, dim, stride, expand_ratio, se_ratio, drop_path=drop_path, **dd)
        self.attn_block = PartitionTransformerLayer(dim, "block", window_size, **layer)
        self.attn_grid = PartitionTransformerLayer(dim, "grid", grid_size, **layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn_grid(self.attn_block(self.conv(x)))
