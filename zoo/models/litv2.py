"""LITv2: Fast Vision Transformers with HiLo Attention.

Pan, Cai and Zhuang, NeurIPS 2022 (arXiv:2205.13213); official code and weights: github.com/ziplab/LITv2.

A 4 x 4 patch-embedding conv with LayerNorm, four stages joined by deformable token merging (2 x 2
stride-2 deformable conv, BatchNorm, GELU). The first two stages have no attention: their blocks are a
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
process): see `blocks.hilo.DeformableTokenMerging`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, register_notrace_module, to_2tuple
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from blocks._layout import pad_to_multiple
from blocks.hilo import ConvFFN, DeformableTokenMerging, HiLoAttention

from ._contract import StagedBackbone, backbone_cfg, convert_state_dict, create_backbone

__all__ = ["LITv2", "checkpoint_filter_fn"]


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
