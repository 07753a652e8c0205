"""Multi-axis attention, the token mixer of MaxViT: block attention and grid attention.

Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022 (arXiv:2204.01697); official code and
weights: github.com/google-research/maxvit (TensorFlow).

A MaxViT block follows its MBConv with two transformer layers (`zoo.models.maxvit`): block attention,
where tokens attend within non-overlapping P x P windows (local mixing), and grid attention, where the
map is split into a G x G grid and tokens attend across the windows to the tokens at the same grid cell,
spaced H / G and W / G apart (sparse global mixing). Both attentions add a learned 2-D relative position
bias per head, indexed by the key-minus-query offset as in the official `reindex_2d_einsum_lookup`.

Tensors are channels-last, (B, H, W, C).

Maps whose sides are not multiples of P (or G) are zero-padded on the bottom/right and the padded
keys are masked out of the softmax, so a real token attends to the real tokens of its window or grid
cell only; the official model has no padding and requires every stage map to divide by P and G.

The output projection runs through `zoo.kernels.fused_pointwise`, which takes the module: in CPU inference it
adds the residual as a oneDNN post-op; otherwise (training, hooked or wrapped layers) it calls the module.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resize_rel_pos_bias_table, to_2tuple
from zoo.kernels.fused_pointwise import linear_add

from ._layout import grid_partition, grid_reverse, pad_to_multiple, window_partition, window_reverse

__all__ = ["PartitionAttention", "RelativePositionBias2d"]


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
            # TorchScript cannot hand modules to `zoo.kernels.fused_pointwise`: the modules are called as they are.
            out = self.proj_drop(self.proj(out))
            return out if residual is None else residual + out
        if residual is None:
            return self.proj_drop(self.proj(out))
        if self.training and self.proj_drop.p > 0:  # the dropout sits between the projection and the add
            return residual + self.proj_drop(self.proj(out))
        return linear_add(out, self.proj, residual)
