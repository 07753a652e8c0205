"""MaxViT: Multi-Axis Vision Transformer.

Tu et al., ECCV 2022 (arXiv:2204.01697); official code and weights (TensorFlow):
github.com/google-research/maxvit.

A two-conv stem (stride 2), then four stages of MaxViT blocks (MBConv, block attention, grid
attention; the first block of each stage halves the map), global average pooling, LayerNorm, a
tanh pre-logits layer and the classifier. Sizes follow the official `hp/vision.py`; numerics follow
the official TensorFlow code (TF 'same' padding of strided convs and pools, BatchNorm epsilon 1e-3,
tanh-approximate GELU, per-head relative position bias).

Weights: `pretrained=True, pretrained_cfg_overlay=dict(file=PATH)` takes either

- timm's port of the official weights (`maxvit_tiny_tf_224`, `maxvit_small_tf_224`, ... state dicts,
  `.safetensors`/`.pth`/`.bin`); this model's keys are timm's, so these load as they are; or
- the official release, converted from TensorFlow's checkpoint format (which PyTorch cannot read) into
  a flat mapping from TF variable names to arrays, saved as `.npz`, `.safetensors` or `.pth`, e.g.::

      reader = tf.train.load_checkpoint("gs://gresearch/maxvit/ckpts/maxvittiny/i1k/224")
      np.savez("maxvit_t.npz", **{n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()})

  Names are those the official graph creates, `maxvit/stem/conv_0/kernel`,
  `maxvit/block_00_00/mbconv/expand_conv/kernel`, `maxvit/block_00_00/attention/q/weight`, ... (see
  `official_name`); where a variable has an `/ExponentialMovingAverage` copy, that copy is used, as
  the official evaluation does. Optimizer slots and `global_step` are ignored.

The layout is detected from the keys. Any input of at least 32 x 32 works: stage maps whose sides do
not divide by the window or grid are padded and the padded keys masked (see `zoo.blocks.multi_axis`).

Tensors are channels-last, (B, H, W, C), from the stem on; the convolutions see the same memory as an NCHW
view with channels_last strides, so no layout copy is made between the MBConv and the attention. The
projections, convolutions and BatchNorms run through `zoo.kernels.fused_pointwise`, which takes the modules: in
CPU inference it folds the BatchNorms into the convs and applies the tanh-GELU and the residual adds as oneDNN
post-ops; otherwise (training, hooked or wrapped layers) it calls the modules.
"""

import re
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerNorm2d,
    NormMlpClassifierHead,
    SEModule,
    register_notrace_module,
    resize_rel_pos_bias_table,
    to_2tuple,
)
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from zoo.blocks.multi_axis import PartitionAttention
from zoo.kernels.fused_pointwise import (
    bn_pointwise_conv_bn_gelu,
    conv_bn_gelu,
    pointwise_conv,
    pointwise_conv_add,
)

from ._contract import StagedBackbone, backbone_cfg, create_backbone, strict_key_check
from ._mlp import ResidualMlp

__all__ = [
    "MBConv",
    "MaxViT",
    "MaxViTBlock",
    "PartitionTransformerLayer",
    "TfSameConv2d",
    "checkpoint_filter_fn",
    "official_name",
]


class TfSameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'same' padding: output ceil(H / stride), the odd pixel of padding at the bottom/right.

    A depthwise conv takes the extra bottom/right pixel as a leading zero row/column of its kernel and
    symmetric padding instead of a padded copy of its input (timm's `Conv2dSame`): on the 4x-wide
    MBConv maps that copy costs several times the convolution itself. Other convs pad the input.

    `conv_geometry` declares the forward a plain convolution, which `zoo.kernels.fused_pointwise` may fuse.
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
    (`zoo.kernels.fused_pointwise.pointwise_conv`).

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
            # TorchScript cannot hand modules to `zoo.kernels.fused_pointwise`: the modules are called as they are.
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


class MaxViTStem(nn.Module):
    """3x3 conv (stride 2, TF 'same'), BN, GELU, 3x3 conv; x: (B, C_in, H, W) -> (B, H / 2, W / 2, C)."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = TfSameConv2d(in_chans, dim, 3, stride=2, **dd)
        self.norm1 = nn.BatchNorm2d(dim, eps=bn_eps, momentum=bn_momentum, **dd)
        self.conv2 = TfSameConv2d(dim, dim, 3, stride=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last from the start: every conv then runs on NHWC memory and the (B, H, W, C) views
        # the blocks take cost nothing.
        x = x.contiguous(memory_format=torch.channels_last)
        # The official code's GELU is the tanh approximation.
        if torch.jit.is_scripting():  # TorchScript cannot hand modules to the fused op
            x = F.gelu(self.norm1(self.conv1(x)), approximate="tanh")
        else:
            x = conv_bn_gelu(x, self.conv1, self.norm1, "tanh")
        return self.conv2(x).permute(0, 2, 3, 1)


class MaxViTStage(nn.Module):
    """MaxViT blocks, the first with stride 2; takes and returns (B, H, W, C)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        drop_path: Sequence[float] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **block_args,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(
            *[
                MaxViTBlock(
                    in_dim if i == 0 else dim,
                    dim,
                    stride=2 if i == 0 else 1,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    device=device,
                    dtype=dtype,
                    **block_args,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class MaxViT(StagedBackbone):
    """MaxViT backbone and classifier with timm's model interface (`StagedBackbone`).

    Stages run channels-last; `forward_intermediates` index i is stage i (timm's own MaxViT counts the
    stem as intermediate 0).

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage.
        stem_width: channels of the stem.
        head_dim: channels per attention head.
        img_size: nominal input size; the window and grid default to its side / 32 (7 at 224, 12 at 384,
            16 at 512, as the official models).
        window_size: block-attention window P; None for img_size / 32.
        grid_size: grid-attention grid G; None for img_size / 32.
        mlp_ratio: MLP hidden width / channels.
        expand_ratio: MBConv hidden width / channels.
        se_ratio: squeeze-excitation bottleneck / channels.
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: pooling type of the head ('avg' as in the paper).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth; block k of n drops with rate * k / n, as the official code.
        attn_drop_rate: dropout on attention weights.
        proj_drop_rate: dropout after attention projections and MLPs.
    """

    stage_format = "NHWC"

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 5, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        head_dim: int = 32,
        img_size: int | tuple[int, int] = 224,
        window_size: int | tuple[int, int] | None = None,
        grid_size: int | tuple[int, int] | None = None,
        mlp_ratio: float = 4.0,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if len(depths) != len(embed_dims):
            raise ValueError(f"depths and embed_dims must have equal length, got {len(depths)} and {len(embed_dims)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.min_input_size = 32
        self.img_size = to_2tuple(img_size)
        partition = self._partition_size(self.img_size)
        window_size = to_2tuple(window_size) if window_size is not None else partition
        grid_size = to_2tuple(grid_size) if grid_size is not None else partition
        self.stem = MaxViTStem(in_chans, stem_width, **dd)
        total = sum(depths)
        rates = [drop_path_rate * k / total for k in range(total)]
        stages, self.feature_info = [], []
        in_dim, start = stem_width, 0
        for i, (depth, dim) in enumerate(zip(depths, embed_dims, strict=True)):
            stages.append(
                MaxViTStage(
                    in_dim,
                    dim,
                    depth,
                    drop_path=rates[start : start + depth],
                    window_size=window_size,
                    grid_size=grid_size,
                    head_dim=head_dim,
                    mlp_ratio=mlp_ratio,
                    expand_ratio=expand_ratio,
                    se_ratio=se_ratio,
                    attn_drop=attn_drop_rate,
                    proj_drop=proj_drop_rate,
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
            in_dim, start = dim, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dims[-1]
        # Pooling, LayerNorm, tanh pre-logits layer and classifier: the official head.
        self.norm = nn.Identity()
        self.head = NormMlpClassifierHead(
            self.num_features,
            num_classes,
            hidden_size=self.num_features,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-5),
            **dd,
        )
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official initializers: normal(0.02) kernels and relative biases (set in the block), zero biases.
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def _set_input_size(
        self,
        img_size: tuple[int, int],
        window_size: int | tuple[int, int] | None = None,
        grid_size: int | tuple[int, int] | None = None,
    ) -> dict:
        partition = self._partition_size(img_size)
        window_size = to_2tuple(window_size) if window_size is not None else partition
        grid_size = to_2tuple(grid_size) if grid_size is not None else partition
        for stage in self.stages:
            for block in stage.blocks:
                block.attn_block.attn.set_partition_size(window_size)
                block.attn_grid.attn.set_partition_size(grid_size)
        return dict(window_size=window_size, grid_size=grid_size)


# ---------------------------------------------------------------------------------------------------
# Official (TensorFlow) checkpoints.

_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_LN = {"weight": "gamma", "bias": "beta"}
_CONV = {"weight": "kernel", "bias": "bias"}
_DENSE = {"weight": "weight", "bias": "bias"}
# Our module path inside a block -> (official layer path, parameter-name table, tensor conversion).
_BLOCK_LAYERS = {
    "conv.pre_norm": ("mbconv/pre_norm", _BN, None),
    "conv.conv1_1x1": ("mbconv/expand_conv", _CONV, "conv"),
    "conv.norm1": ("mbconv/expand_norm", _BN, None),
    "conv.conv2_kxk": ("mbconv/depthwise_conv", {"weight": "depthwise_kernel"}, "depthwise"),
    "conv.norm2": ("mbconv/depthwise_norm", _BN, None),
    "conv.se.fc1": ("mbconv/se/reduce_conv2d", _CONV, "conv"),
    "conv.se.fc2": ("mbconv/se/expand_conv2d", _CONV, "conv"),
    "conv.conv3_1x1": ("mbconv/shrink_conv", _CONV, "conv"),
    "conv.shortcut.expand": ("mbconv/shortcut_conv", _CONV, "conv"),
}
for _ours, _suffix in (("attn_block", ""), ("attn_grid", "_1")):
    _BLOCK_LAYERS.update(
        {
            f"{_ours}.norm1": (f"attn_layer_norm{_suffix}", _LN, None),
            f"{_ours}.attn.qkv": (f"attention{_suffix}", _DENSE, "qkv"),
            f"{_ours}.attn.rel_pos": (f"attention{_suffix}", {"relative_position_bias_table": "relative_bias"}, None),
            f"{_ours}.attn.proj": (f"attention{_suffix}/o", _DENSE, "out"),
            f"{_ours}.norm2": (f"ffn_layer_norm{_suffix}", _LN, None),
            f"{_ours}.mlp.fc1": (f"ffn{_suffix}/expand_dense", _DENSE, "dense"),
            f"{_ours}.mlp.fc2": (f"ffn{_suffix}/shrink_dense", _DENSE, "dense"),
        }
    )
_TOP_LAYERS = {
    "stem.conv1": ("stem/conv_0", _CONV, "conv"),
    "stem.norm1": ("stem/norm_0", _BN, None),
    "stem.conv2": ("stem/conv_1", _CONV, "conv"),
    "head.norm": ("final_layer_norm", _LN, None),
    "head.pre_logits.fc": ("cls_head/inner_dense", _DENSE, "dense"),
    "head.fc": ("cls_head/logit_dense", _DENSE, "dense"),
}
_OFFICIAL_VARIABLES = {"kernel", "depthwise_kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"}
_OFFICIAL_VARIABLES |= {"weight", "relative_bias"}
_EMA = "/ExponentialMovingAverage"


def official_name(key: str) -> tuple[str, str | None] | None:
    """The official TF variable name of one of our state-dict keys, and how its tensor converts.

    Returns None for keys the official checkpoint has no variable for (BatchNorm's `num_batches_tracked`).
    For the fused q/k/v projection the name returned is the layer (`.../attention`), whose `q`, `k`, `v`
    sub-layers hold the parts.
    """
    module, _, param = key.rpartition(".")
    if param == "num_batches_tracked":
        return None
    match = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", module)
    if match:
        prefix, layers, module = f"maxvit/block_{int(match[1]):02d}_{int(match[2]):02d}/", _BLOCK_LAYERS, match[3]
    else:
        prefix, layers = "maxvit/", _TOP_LAYERS
    if module not in layers or param not in layers[module][1]:
        raise KeyError(f"no official MaxViT variable corresponds to {key!r}")
    path, names, kind = layers[module]
    if kind == "qkv":
        return f"{prefix}{path}", f"qkv_{param}"
    return f"{prefix}{path}/{names[param]}", kind if param == "weight" else None


def _convert(value: torch.Tensor, kind: str | None) -> torch.Tensor:
    if kind == "conv":  # (kh, kw, C_in, C_out) -> (C_out, C_in, kh, kw)
        return value.permute(3, 2, 0, 1)
    if kind == "depthwise":  # (kh, kw, C, 1) -> (C, 1, kh, kw)
        return value.permute(2, 3, 0, 1)
    if kind == "dense":  # (C_in, C_out) -> (C_out, C_in)
        return value.t()
    if kind == "out":  # the output projection's (heads, head_dim, C) -> (C, heads * head_dim)
        return value.flatten(0, 1).t()
    return value


def _from_official(state_dict: dict[str, torch.Tensor], model: MaxViT) -> dict[str, torch.Tensor]:
    tf = {k.removesuffix(":0"): torch.as_tensor(v) for k, v in state_dict.items()}

    def take(name: str) -> torch.Tensor | None:
        used.update((name, name + _EMA))
        return tf.get(name + _EMA, tf.get(name))

    used: set[str] = set()
    converted, missing = {}, []
    for key, ref in model.state_dict().items():
        found = official_name(key)
        if found is None:
            converted[key] = torch.zeros_like(ref, device="cpu")
            continue
        name, kind = found
        if kind in ("qkv_weight", "qkv_bias"):
            leaf = "weight" if kind == "qkv_weight" else "bias"
            parts = [take(f"{name}/{p}/{leaf}") for p in "qkv"]
            if any(p is None for p in parts):
                missing.append(f"{name}/{{q,k,v}}/{leaf}")
                continue
            # (C, heads, head_dim) kernels -> rows ordered (q|k|v, head, head_dim) of a (3C, C) weight.
            converted[key] = torch.cat([p.flatten(-2).t() if leaf == "weight" else p.flatten() for p in parts])
            continue
        value = take(name)
        if value is None:
            missing.append(name)
            continue
        converted[key] = _convert(value, kind)
    left = sorted(
        k
        for k in tf
        if k.startswith("maxvit/") and k not in used and k.removesuffix(_EMA).rsplit("/", 1)[-1] in _OFFICIAL_VARIABLES
    )
    if missing or left:
        raise KeyError(
            f"official MaxViT checkpoint does not match {type(model).__name__}: "
            f"{len(missing)} missing variables {missing[:8]}, {len(left)} unexpected variables {left[:8]}"
        )
    return converted


def _resize_table(table: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A (heads, 2P - 1, 2P - 1) relative-bias table resized to shape with timm's `resize_rel_pos_bias_table`."""
    window = ((shape[1] + 1) // 2, (shape[2] + 1) // 2)
    with torch.device(table.device):  # also under a meta-device context (the result stays with the table)
        return resize_rel_pos_bias_table(table, new_window_size=window, new_bias_shape=tuple(shape))


def _resize_official_tables(state_dict: dict, model: MaxViT) -> dict:
    # The official relative biases are (heads, 2P - 1, 2P - 1) as ours; resized to the model's windows
    # before conversion so that a 224 release loads into a 384 or 512 model.
    ours = {official_name(k)[0]: v for k, v in model.state_dict().items() if k.endswith("relative_position_bias_table")}
    resized = dict(state_dict)
    for name, value in state_dict.items():
        target = ours.get(name.removesuffix(":0").removesuffix(_EMA))
        value = torch.as_tensor(value)
        if target is not None and value.dim() == 3 and value.shape != target.shape:
            resized[name] = _resize_table(value, target.shape)
    return resized


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MaxViT) -> dict[str, torch.Tensor]:
    """Convert an official (TF-named) or timm MaxViT state dict to this model's keys, strictly.

    The layout is detected from the keys: official variable names start with `maxvit/`; timm's keys
    are this model's own.

    Raises:
        KeyError: naming the keys (or official variables) the model needs but the checkpoint lacks, or
            the checkpoint's keys the model has no place for.
        ValueError: naming the first keys whose shapes differ (e.g. a checkpoint of another size).
    """
    if any(k.startswith("maxvit/") for k in state_dict):
        converted, source = (
            _from_official(_resize_official_tables(state_dict, model), model),
            "official MaxViT checkpoint",
        )
    else:
        converted, source = dict(state_dict), "MaxViT checkpoint"
    expected = model.state_dict()
    for key, value in converted.items():
        # Weights of another resolution (a 224 checkpoint into a 384 model): tables resized as timm does. Tables
        # of another head count are left for the strict check to name.
        target = expected.get(key)
        if (
            key.endswith("relative_position_bias_table")
            and target is not None
            and value.dim() == 3
            and value.shape[0] == target.shape[0]
            and value.shape != target.shape
        ):
            converted[key] = _resize_table(value, target.shape)
    strict_key_check(converted, model, classifier="head.fc", source=source)
    return converted


def _load_npz(kwargs: dict) -> dict:
    # NumPy archives (the natural export of a TF checkpoint) are read without pickle.
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    path = overlay.get("file")
    if not path or not str(path).endswith(".npz"):
        return kwargs
    with np.load(path, allow_pickle=False) as archive:
        overlay["state_dict"] = {k: torch.from_numpy(archive[k].copy()) for k in archive.files}
    overlay.pop("file")
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def _create_maxvit(variant: str, pretrained: bool = False, **kwargs) -> MaxViT:
    if pretrained:
        kwargs = _load_npz(kwargs)
    return create_backbone(MaxViT, variant, pretrained, checkpoint_filter_fn, ("state_dict", "model"), **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return backbone_cfg(
        url,
        crop_pct=kwargs.pop("crop_pct", 0.95),
        first_conv="stem.conv1",
        paper_ids="arXiv:2204.01697",
        paper_name="MaxViT: Multi-Axis Vision Transformer",
        origin_url="https://github.com/google-research/maxvit",
        license="apache-2.0",
        **kwargs,
    )


# The official weights are TensorFlow checkpoints (gs://gresearch/maxvit/ckpts/...), which PyTorch cannot
# read; the download URL is timm's conversion of those same weights. ImageNet-1k top-1 from the paper.
_TIMM_HUB = "https://huggingface.co/timm/{}/resolve/main/pytorch_model.bin"
_OFFICIAL = "official TensorFlow checkpoint: gs://gresearch/maxvit/ckpts/{}/i1k/224"

_TIMM_NAMES = {"t": "maxvit_tiny_tf", "s": "maxvit_small_tf", "b": "maxvit_base_tf", "l": "maxvit_large_tf"}
_OFFICIAL_DIRS = {"t": "maxvittiny", "s": "maxvitsmall", "b": "maxvitbase", "l": "maxvitlarge"}
# The authors' 384 and 512 fine-tunes (ImageNet-1k, and ImageNet-21k -> 1k for B and L); top-1 from the paper.
_HIRES_TOP1 = {
    ("t", 384, "in1k"): 85.24,
    ("t", 512, "in1k"): 85.72,
    ("s", 384, "in1k"): 85.74,
    ("s", 512, "in1k"): 86.19,
    ("b", 384, "in1k"): 86.34,
    ("b", 512, "in1k"): 86.66,
    ("l", 384, "in1k"): 86.40,
    ("l", 512, "in1k"): 86.70,
    ("b", 384, "in21k_ft_in1k"): 88.24,
    ("b", 512, "in21k_ft_in1k"): 88.38,
    ("l", 384, "in21k_ft_in1k"): 88.32,
    ("l", 512, "in21k_ft_in1k"): 88.46,
}


def _hires_cfg(size: str, res: int, tag: str, top1: float) -> dict:
    # The high-resolution fine-tunes take inputs normalised to [-1, 1] and resized whole (timm's cfgs).
    official = "i1k" if tag == "in1k" else "i21k_i1k"
    return _cfg(
        url=_TIMM_HUB.format(f"{_TIMM_NAMES[size]}_{res}.{tag}"),
        input_size=(3, res, res),
        pool_size=(res // 32, res // 32),
        crop_pct=1.0,
        crop_mode="squash",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        notes=(
            f"ImageNet-1k top-1 {top1} (paper)",
            f"official TensorFlow checkpoint: gs://gresearch/maxvit/ckpts/{_OFFICIAL_DIRS[size]}/{official}/{res}",
        ),
    )


default_cfgs = generate_default_cfgs(
    {
        "zoo_maxvit_t.in1k": _cfg(
            url=_TIMM_HUB.format("maxvit_tiny_tf_224.in1k"),
            notes=("ImageNet-1k top-1 83.62 (paper)", _OFFICIAL.format("maxvittiny")),
        ),
        "zoo_maxvit_s.in1k": _cfg(
            url=_TIMM_HUB.format("maxvit_small_tf_224.in1k"),
            notes=("ImageNet-1k top-1 84.45 (paper)", _OFFICIAL.format("maxvitsmall")),
        ),
        "zoo_maxvit_b.in1k": _cfg(
            url=_TIMM_HUB.format("maxvit_base_tf_224.in1k"),
            notes=("ImageNet-1k top-1 84.95 (paper)", _OFFICIAL.format("maxvitbase")),
        ),
        "zoo_maxvit_l.in1k": _cfg(
            url=_TIMM_HUB.format("maxvit_large_tf_224.in1k"),
            notes=("ImageNet-1k top-1 85.17 (paper)", _OFFICIAL.format("maxvitlarge")),
        ),
        **{
            f"zoo_maxvit_{size}_{res}.{tag}": _hires_cfg(size, res, tag, top1)
            for (size, res, tag), top1 in _HIRES_TOP1.items()
        },
    }
)


@register_model
def zoo_maxvit_t(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-T: 30.9 M parameters, 5.6 GFLOPs, 83.62% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 5, 2), embed_dims=(64, 128, 256, 512), stem_width=64)
    return _create_maxvit("zoo_maxvit_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_maxvit_s(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-S: 68.9 M parameters, 11.7 GFLOPs, 84.45% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 5, 2), embed_dims=(96, 192, 384, 768), stem_width=64)
    return _create_maxvit("zoo_maxvit_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_maxvit_b(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-B: 119.5 M parameters, 23.4 GFLOPs, 84.95% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 6, 14, 2), embed_dims=(96, 192, 384, 768), stem_width=64)
    return _create_maxvit("zoo_maxvit_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_maxvit_l(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-L: 211.8 M parameters, 43.9 GFLOPs, 85.17% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 6, 14, 2), embed_dims=(128, 256, 512, 1024), stem_width=128)
    return _create_maxvit("zoo_maxvit_l", pretrained=pretrained, **dict(model_args, **kwargs))


_SIZES = {
    "t": dict(depths=(2, 2, 5, 2), embed_dims=(64, 128, 256, 512), stem_width=64),
    "s": dict(depths=(2, 2, 5, 2), embed_dims=(96, 192, 384, 768), stem_width=64),
    "b": dict(depths=(2, 6, 14, 2), embed_dims=(96, 192, 384, 768), stem_width=64),
    "l": dict(depths=(2, 6, 14, 2), embed_dims=(128, 256, 512, 1024), stem_width=128),
}


@register_model
def zoo_maxvit_t_384(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-T at 384 x 384 (12 x 12 windows and grid): 17.7 GFLOPs, 85.24% ImageNet-1k top-1."""
    return _create_maxvit("zoo_maxvit_t_384", pretrained=pretrained, **{**_SIZES["t"], "img_size": 384, **kwargs})


@register_model
def zoo_maxvit_t_512(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-T at 512 x 512 (16 x 16 windows and grid): 33.7 GFLOPs, 85.72% ImageNet-1k top-1."""
    return _create_maxvit("zoo_maxvit_t_512", pretrained=pretrained, **{**_SIZES["t"], "img_size": 512, **kwargs})


@register_model
def zoo_maxvit_s_384(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-S at 384 x 384: 36.1 GFLOPs, 85.74% ImageNet-1k top-1."""
    return _create_maxvit("zoo_maxvit_s_384", pretrained=pretrained, **{**_SIZES["s"], "img_size": 384, **kwargs})


@register_model
def zoo_maxvit_s_512(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-S at 512 x 512: 67.6 GFLOPs, 86.19% ImageNet-1k top-1."""
    return _create_maxvit("zoo_maxvit_s_512", pretrained=pretrained, **{**_SIZES["s"], "img_size": 512, **kwargs})


@register_model
def zoo_maxvit_b_384(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-B at 384 x 384: 74.2 GFLOPs, 86.34% ImageNet-1k top-1 (88.24% from ImageNet-21k)."""
    return _create_maxvit("zoo_maxvit_b_384", pretrained=pretrained, **{**_SIZES["b"], "img_size": 384, **kwargs})


@register_model
def zoo_maxvit_b_512(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-B at 512 x 512: 138.5 GFLOPs, 86.66% ImageNet-1k top-1 (88.38% from ImageNet-21k)."""
    return _create_maxvit("zoo_maxvit_b_512", pretrained=pretrained, **{**_SIZES["b"], "img_size": 512, **kwargs})


@register_model
def zoo_maxvit_l_384(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-L at 384 x 384: 133.1 GFLOPs, 86.40% ImageNet-1k top-1 (88.32% from ImageNet-21k)."""
    return _create_maxvit("zoo_maxvit_l_384", pretrained=pretrained, **{**_SIZES["l"], "img_size": 384, **kwargs})


@register_model
def zoo_maxvit_l_512(pretrained: bool = False, **kwargs) -> MaxViT:
    """MaxViT-L at 512 x 512: 245.4 GFLOPs, 86.70% ImageNet-1k top-1 (88.46% from ImageNet-21k)."""
    return _create_maxvit("zoo_maxvit_l_512", pretrained=pretrained, **{**_SIZES["l"], "img_size": 512, **kwargs})


# torch.fx (timm's feature extraction, `create_feature_extractor`): the blocks dispatch to fused kernels and pad on
# shapes, which symbolic tracing cannot follow, so they are leaves of the traced graph, as timm does for its own.
for _leaf in (MaxViTStem, MaxViTBlock):
    register_notrace_module(_leaf)
