"""Focal modulation, the token mixer of FocalNet.

Yang et al., "Focal Modulation Networks", NeurIPS 2022 (arXiv:2203.11926); official code:
github.com/microsoft/FocalNet.

A linear projection gives every token a query, a context map and one gate per focal level. The
context passes through `focal_level` stacked depthwise convolutions (kernels `focal_window`,
`focal_window + focal_factor`, ...), each followed by GELU, so level l sees a growing receptive
field; a global level is the GELU of the spatial mean of the last one. The levels are summed with
their gates, mixed across channels by `h` (the modulator) and multiply the query; an output
projection follows. The small- and large-receptive-field (SRF/LRF) models differ only in
`focal_level` (2 vs 3). The block around the mixer is `zoo.models.focalnet`'s.

Everything here is channels-last, (B, H, W, C). The official code's 1x1 convolution `h` is a
Linear of the same weights (C, C), and the depthwise convolutions run on the NCHW view of the
channels-last map, which oneDNN handles without a layout copy.

The projections and convolutions run through `zoo.kernels.fused_pointwise`, which takes the modules: in CPU
inference it applies GELU, the modulator's product with q and the residual adds as oneDNN post-ops;
otherwise (training, hooked or wrapped layers) it calls the modules.
"""

import torch
import torch.nn as nn
from zoo.kernels.fused_pointwise import conv_gelu, linear, linear_add, linear_mul, linear_split

__all__ = ["FocalModulation"]


class FocalModulation(nn.Module):
    """Focal modulation on a channels-last map.

    Args:
        dim: channels C of the input and output.
        focal_level: number of depthwise-conv context levels (the global level comes on top).
        focal_window: kernel size of the first level.
        focal_factor: kernel growth per level (level l has kernel `focal_window + focal_factor * l`).
        bias: bias of the input projection `f` and the modulator `h`.
        use_post_norm: LayerNorm on the modulated tokens before the output projection (FocalNet-H).
        normalize_modulator: divide the aggregated context by `focal_level + 1`.
        proj_drop: dropout after the output projection.
        norm_layer: norm of `use_post_norm`.
    """

    def __init__(
        self,
        dim: int,
        focal_level: int,
        focal_window: int = 3,
        focal_factor: int = 2,
        bias: bool = True,
        use_post_norm: bool = False,
        normalize_modulator: bool = False,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if focal_level < 1:
            raise ValueError(f"focal_level must be >= 1, got {focal_level}")
        self.dim = dim
        self.focal_level = focal_level
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1, bias=bias, **dd)
        self.h = nn.Linear(dim, dim, bias=bias, **dd)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kernel_sizes = [focal_window + focal_factor * level for level in range(focal_level)]
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False, **dd), nn.GELU())
            for k in self.kernel_sizes
        )
        self.norm = norm_layer(dim, **dd) if use_post_norm else nn.Identity()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); plus `residual` (B, H, W, C) when given, added inside the projection."""
        c, levels = self.dim, self.focal_level
        if torch.jit.is_scripting():
            # TorchScript cannot hand modules to `zoo.kernels.fused_pointwise`: the modules are called as they are.
            q, ctx, gates = self.f(x).split([c, c, levels + 1], dim=-1)
            ctx = ctx.permute(0, 3, 1, 2)
            ctx_all = torch.zeros_like(q)
            for level, layer in enumerate(self.focal_layers):
                ctx = layer(ctx)
                ctx_all = ctx_all + ctx.permute(0, 2, 3, 1) * gates[..., level : level + 1]
            ctx_global = self.act(ctx.mean((2, 3), keepdim=True)).permute(0, 2, 3, 1)
            ctx_all = ctx_all + ctx_global * gates[..., levels:]
            if self.normalize_modulator:
                ctx_all = ctx_all / (levels + 1)
            out = self.proj_drop(self.proj(self.norm(q * self.h(ctx_all))))
            return out if residual is None else residual + out
        # Fused, q and the context come out contiguous (one GEMM per row block of `f`), so the depthwise
        # convs read the context without a copy and `h` can multiply q in its epilogue.
        q, ctx, gates = linear_split(x, self.f, (c, c, levels + 1))
        ctx = ctx.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # a no-op when fused
        ctx_all = None
        for level, (conv, act) in enumerate(self.focal_layers):
            ctx = conv_gelu(ctx, conv, act.approximate)  # (B, C, H, W), channels_last
            term, gate = ctx.permute(0, 2, 3, 1), gates[..., level : level + 1]
            ctx_all = term * gate if ctx_all is None else torch.addcmul(ctx_all, term, gate)
        ctx_global = self.act(ctx.mean((2, 3), keepdim=True)).permute(0, 2, 3, 1)
        ctx_all = torch.addcmul(ctx_all, ctx_global, gates[..., levels:])
        if self.normalize_modulator:
            ctx_all = ctx_all / (levels + 1)
        out = self.norm(linear_mul(ctx_all, self.h, q))
        if residual is None:
            return self.proj_drop(linear(out, self.proj))
        if self.training and self.proj_drop.p > 0:  # the dropout sits between the projection and the add
            return residual + self.proj_drop(linear(out, self.proj))
        return linear_add(out, self.proj, residual)
