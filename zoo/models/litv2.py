"""LITv2: Fast Vision Transformers with HiLo Attention.

Pan, Cai and Zhuang, NeurIPS 2022 (arXiv:2205.13213); official code and weights: github.com/ziplab/LITv2.

A 4 x 4 patch-embedding conv with LayerNorm, four stages joined by deformable token merging (2 x 2
stride-2 deformable conv, BatchNorm, GELU; from LITv1: Pan et al., "Less is More: Pay Less Attention in Vision
Transformers", AAAI 2022, arXiv:2105.14217). The first two stages have no attention: their blocks are a
pre-norm ConvFFN only. The last two use pre-norm HiLo attention (window 2 in stage 3; window 1, i.e.
plain multi-head attention, in stage 4) and the ConvFFN. A final LayerNorm, average pooling and a
linear classifier. Sizes and the layout of the released checkpoints follow the official
`classification/models/litv2.py` and its configs; `checkpoint_filter_fn` converts its keys to ours.

Input sizes: any H, W >= 32. At 224 x 224 (the released classification models) nothing is padded and
the outputs equal the official classifier's. Otherwise, as the official detection/segmentation
backbone does, the image is zero-padded on the bottom/right to a multiple of 4, HiLo pads each map to
a multiple of its window and crops, and each token merging halves the size rounding down.

Precision and bad values: torchvision's deformable convolution has kernels for float32 and float64 only, so in
bf16/fp16 (a bf16 model, CPU or CUDA autocast) the token merging computes that one op in float32 and casts its
output back; everything else runs in the model's or autocast's dtype. NaN or Inf pixels make that image's
outputs NaN, as in any network; they never reach torchvision's kernel as sampling offsets (which crashed the
process): see `DeformableTokenMerging`.

FLOPs: torch's `FlopCounterMode` has no formula for torchvision's deformable convolution and counts the token
merging as free; `register_deform_conv_flops()` gives it one (a plain convolution's count), once, where FLOPs
are counted. Importing this module changes nothing in torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, register_notrace_module, to_2tuple
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula
from torchvision.ops import deform_conv2d

from zoo.blocks._layout import pad_to_multiple
from zoo.blocks.hilo import HiLoAttention

from ._contract import StagedBackbone, backbone_cfg, convert_state_dict, create_backbone

__all__ = ["ConvFFN", "DeformableTokenMerging", "LITv2", "checkpoint_filter_fn", "register_deform_conv_flops"]


def _deform_conv2d_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # Bilinear sampling aside, a deformable conv multiplies and adds as often as a plain conv of its shape.
    return conv_flop_count(list(input_shape), list(weight_shape), list(out_shape), transposed=False)


def register_deform_conv_flops() -> None:
    """Give torch's `FlopCounterMode` a formula for torchvision's `deform_conv2d`: a plain conv's count.

    Without it the counter counts LITv2's token merging as free (0.17 of LITv2-S's 3.7 GMACs). Call it before
    counting; a second call (or a formula registered by someone else) leaves the registry as it is.
    """
    if torch.ops.torchvision.deform_conv2d not in flop_registry:  # keyed by the op's overload packet
        register_flop_formula(torch.ops.torchvision.deform_conv2d)(_deform_conv2d_flops)


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


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv then LayerNorm; (B, C, H, W) -> (B, ceil(H / p), ceil(W / p), D)."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        patch_size: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = patch_size
        self.conv = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, **dd)
        self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official detection backbone pads the image on the bottom/right to whole patches.
        x, _ = pad_to_multiple(x.permute(0, 2, 3, 1), (self.patch_size, self.patch_size))
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class LITv2Block(nn.Module):
    """Pre-norm HiLo attention (absent in the early stages) and ConvFFN residuals; x: (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 2,
        alpha: float = 0.9,
        has_attention: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if has_attention:
            self.norm1 = nn.LayerNorm(dim, **dd)
            self.attn = HiLoAttention(
                dim, num_heads, window_size=window_size, alpha=alpha, qkv_bias=qkv_bias, qk_scale=qk_scale, **dd
            )
        else:
            self.norm1 = self.attn = None
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class LITv2Stage(nn.Module):
    """Optional deformable token merging, then blocks; takes and returns channels-last (B, H, W, C)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        has_attention: bool,
        window_size: int = 2,
        alpha: float = 0.9,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        drop_path: Sequence[float] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = DeformableTokenMerging(in_dim, dim, **dd) if downsample else None
        self.blocks = nn.Sequential(
            *[
                LITv2Block(
                    dim,
                    num_heads,
                    window_size=window_size,
                    alpha=alpha,
                    has_attention=has_attention,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    **dd,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class LITv2(StagedBackbone):
    """LITv2 backbone and classifier with timm's model interface.

    Args:
        embed_dim: channels of the first stage (doubled at each token merging).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        has_attention: per stage, whether blocks have HiLo attention (the official `has_msa`).
        window_sizes: HiLo window per stage (the official `local_ws`; unused where there is no attention).
        alpha: fraction of heads on HiLo's low-frequency path.
        mlp_ratio: ConvFFN hidden width / channels.
        qkv_bias: bias in the q/k/v projections.
        qk_scale: logit scale override.
        img_size: nominal input size (recorded for timm; HiLo windows do not depend on it).
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: pooling type of the head ('avg' as in the paper).
        drop_rate: dropout inside the ConvFFNs (where the official model applies its `drop_rate`).
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
    """

    stage_format = "NHWC"

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        has_attention: Sequence[bool] = (False, False, True, True),
        window_sizes: Sequence[int] = (0, 0, 2, 1),
        alpha: float = 0.9,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        # Three token mergings need a map of at least 8 x 8 after the stem.
        self.min_input_size = 32
        self.img_size = to_2tuple(img_size)
        self.stem = PatchEmbed(in_chans, embed_dim, **dd)
        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        in_dim = embed_dim
        per_stage = zip(depths, num_heads, has_attention, window_sizes, strict=True)
        for i, (depth, heads, attention, window) in enumerate(per_stage):
            dim = embed_dim * 2**i
            stages.append(
                LITv2Stage(
                    in_dim,
                    dim,
                    depth,
                    heads,
                    downsample=i > 0,
                    has_attention=attention,
                    window_size=window,
                    alpha=alpha,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    drop_path=dpr[i],
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_dim
        self.norm = nn.LayerNorm(in_dim, **dd)
        self.head = ClassifierHead(in_dim, num_classes, pool_type=global_pool, **dd)
        self.apply(self._init_weights)


def _downsample_key(match: re.Match) -> str:
    # Officially each layer ends with the merging that feeds the next one; ours starts the next stage.
    part = {"dconv.conv_offset": "offset", "dconv": "", "norm_layer": "norm"}[match.group(2)]
    return f"stages.{int(match.group(1)) + 1}.downsample." + (f"{part}." if part else "")


# Official key -> ours, applied in order.
_KEY_RULES = (
    (r"^patch_embed\.proj\.", "stem.conv."),
    (r"^patch_embed\.norm\.", "stem.norm."),
    (r"^layers\.(\d+)\.downsample\.(dconv\.conv_offset|dconv|norm_layer)\.", _downsample_key),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.attn\.h_", ".attn.hi_"),
    (r"\.attn\.l_", ".attn.lo_"),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"^head\.", "head.fc."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: LITv2) -> dict[str, torch.Tensor]:
    """Convert an official LITv2 state dict (or one of ours) to this model's keys, strictly.

    Raises:
        KeyError, ValueError: as `convert_state_dict`, naming the keys that do not match.
    """
    return convert_state_dict(state_dict, model, _KEY_RULES, own_key="stem.conv.weight", source="LITv2 checkpoint")


def _create_litv2(variant: str, pretrained: bool = False, **kwargs) -> LITv2:
    # The official trainer saves {'model': state_dict, 'optimizer': ..., ...} and evaluates 'model'.
    return create_backbone(LITv2, variant, pretrained, checkpoint_filter_fn, ("model", "state_dict"), **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return backbone_cfg(
        url,
        crop_pct=kwargs.pop("crop_pct", 0.875),
        first_conv="stem.conv",
        paper_ids="arXiv:2205.13213",
        paper_name="Fast Vision Transformers with HiLo Attention",
        origin_url="https://github.com/ziplab/LITv2",
        license="apache-2.0",
        **kwargs,
    )


_RELEASE = "https://github.com/ziplab/LITv2/releases/download/v1.0/{}"

# The authors' release links (README of ziplab/LITv2); ImageNet-1k top-1 from the paper.
default_cfgs = generate_default_cfgs(
    {
        "zoo_litv2_s.in1k": _cfg(url=_RELEASE.format("litv2_s.pth"), notes=("ImageNet-1k top-1 82.0 (paper)",)),
        "zoo_litv2_m.in1k": _cfg(url=_RELEASE.format("litv2_m.pth"), notes=("ImageNet-1k top-1 83.3 (paper)",)),
        "zoo_litv2_b.in1k": _cfg(url=_RELEASE.format("litv2_b.pth"), notes=("ImageNet-1k top-1 83.6 (paper)",)),
        # Fine-tuned at 384 (configs/litv2-base-finetune-384.yaml: same windows; evaluated without a crop).
        "zoo_litv2_b_384.in1k": _cfg(
            url=_RELEASE.format("litv2_b_384.pth"),
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
            notes=("ImageNet-1k top-1 84.7 (paper)",),
        ),
    }
)

_ARGS = dict(has_attention=(False, False, True, True), window_sizes=(0, 0, 2, 1), alpha=0.9)


@register_model
def zoo_litv2_s(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S: 27.8 M parameters, 3.7 GFLOPs, 82.0% ImageNet-1k top-1."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), **_ARGS)
    return _create_litv2("zoo_litv2_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_litv2_m(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-M: 48.8 M parameters, 7.5 GFLOPs, 83.3% ImageNet-1k top-1."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_ARGS)
    return _create_litv2("zoo_litv2_m", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_litv2_b(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-B: 86.5 M parameters, 13.2 GFLOPs, 83.6% ImageNet-1k top-1."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_ARGS)
    return _create_litv2("zoo_litv2_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_litv2_b_384(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-B at 384 x 384: 86.5 M parameters, 39.7 GFLOPs, 84.7% ImageNet-1k top-1."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), img_size=384, **_ARGS)
    return _create_litv2("zoo_litv2_b_384", pretrained=pretrained, **dict(model_args, **kwargs))


# torch.fx (timm's feature extraction, `create_feature_extractor`): the blocks dispatch to fused kernels and pad on
# shapes, which symbolic tracing cannot follow, so they are leaves of the traced graph, as timm does for its own.
for _leaf in (PatchEmbed, LITv2Block, DeformableTokenMerging):
    register_notrace_module(_leaf)
