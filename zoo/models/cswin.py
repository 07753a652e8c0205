"""CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows.

Dong et al., CVPR 2022 (arXiv:2107.00652); official code and weights: github.com/microsoft/CSWin-Transformer.

A 7 x 7 stride-4 conv stem, four stages joined by 3 x 3 stride-2 conv merges, pre-norm blocks of
cross-shaped window attention with LePE and an MLP; the last stage attends over the whole map. A final
LayerNorm, average pooling and a linear classifier. Sizes and the layout of the released checkpoints
follow the official `models/cswin.py`; `checkpoint_filter_fn` converts its keys to ours.

Input sizes: any H, W >= 32. At 224 x 224 (the released classification models) no stripe is padded and
the outputs equal the official classifier's. At other sizes stripes that do not divide the map are
zero-padded on both sides, as the official segmentation backbone does (its classifier only accepts
the size it was built for); the stem gives floor((H - 3) / 4) + 1 rows, each merge ceil(h / 2).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, Mlp, register_notrace_module, to_2tuple
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from zoo.blocks.cross_shaped import CrossShapedWindowAttention

from ._contract import StagedBackbone, backbone_cfg, convert_state_dict, create_backbone

__all__ = ["CSWin", "checkpoint_filter_fn"]


class ConvNorm(nn.Module):
    """Strided conv then LayerNorm over channels: the stem and the merges between stages.

    Takes (B, C, H, W) and returns channels-last (B, H', W', C').
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int,
        stride: int,
        padding: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride=stride, padding=padding, **dd)
        self.norm = nn.LayerNorm(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class CSWinBlock(nn.Module):
    """Pre-norm cross-shaped window attention and MLP residuals; x: (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int,
        full_attention: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = CrossShapedWindowAttention(
            dim,
            num_heads,
            split_size=split_size,
            full_attention=full_attention,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            **dd,
        )
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class CSWinStage(nn.Module):
    """Optional conv merge, then blocks; takes and returns channels-last (B, H, W, C)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        split_size: int,
        downsample: bool,
        full_attention: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = ConvNorm(in_dim, dim, 3, 2, 1, **dd) if downsample else None
        self.blocks = nn.Sequential(
            *[
                CSWinBlock(
                    dim,
                    num_heads,
                    split_size,
                    full_attention=full_attention,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    **dd,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class CSWin(StagedBackbone):
    """CSWin Transformer backbone and classifier with timm's model interface.

    Args:
        embed_dim: channels of the first stage (doubled at each merge).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        split_sizes: stripe width per stage (the last stage attends over the whole map); None for the
            authors' choice at img_size: (1, 2, side / 32, side / 32), i.e. (1, 2, 7, 7) at 224, (1, 2, 12, 12) at 384.
        img_size: nominal input size.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias in the q/k/v projections.
        qk_scale: logit scale override.
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: pooling type of the head ('avg' as in the paper).
        drop_rate: dropout inside the MLPs (where the official model applies its `drop_rate`).
        attn_drop_rate: attention-probability dropout.
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
    """

    stage_format = "NHWC"

    def __init__(
        self,
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 2, 21, 1),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        split_sizes: Sequence[int] | None = None,
        img_size: int | tuple[int, int] = 224,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.min_input_size = 32
        self.img_size = to_2tuple(img_size)
        split_sizes = self._split_sizes(self.img_size, split_sizes, len(depths))
        self.stem = ConvNorm(in_chans, embed_dim, 7, 4, 2, **dd)
        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        in_dim = embed_dim
        last = len(depths) - 1
        for i, (depth, heads, split) in enumerate(zip(depths, num_heads, split_sizes, strict=True)):
            dim = embed_dim * 2**i
            stages.append(
                CSWinStage(
                    in_dim,
                    dim,
                    depth,
                    heads,
                    split,
                    downsample=i > 0,
                    full_attention=i == last,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
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

    def _split_sizes(self, img_size: tuple[int, int], split_sizes: Sequence[int] | None, stages: int) -> tuple:
        if split_sizes is not None:
            if len(split_sizes) != stages:
                raise ValueError(f"split_sizes needs one entry per stage ({stages}), got {tuple(split_sizes)}")
            return tuple(int(s) for s in split_sizes)
        # The authors' stripes: 1 and 2 in the first stages, the last-stage side from the third (7 at 224, 12 at 384).
        return (1, 2, *[min(self._partition_size(img_size))] * (stages - 2))

    def _set_input_size(self, img_size: tuple[int, int], split_sizes: Sequence[int] | None = None) -> dict:
        split_sizes = self._split_sizes(img_size, split_sizes, len(self.stages))
        for stage, split in zip(self.stages, split_sizes, strict=True):
            for block in stage.blocks:
                block.attn.split_size = split
        return dict(split_sizes=split_sizes)


def _shift_stage(match: re.Match) -> str:
    # The official modules count stages from 1 (stage1..stage4) and merges by the stage they feed.
    return f"stages.{int(match.group(1)) - 1}.blocks.{match.group(2)}."


# Official key -> ours, applied in order.
_KEY_RULES = (
    (r"^stage1_conv_embed\.0\.", "stem.conv."),
    (r"^stage1_conv_embed\.2\.", "stem.norm."),
    (r"^merge(\d)\.", r"stages.\1.downsample."),
    (r"^stage(\d)\.(\d+)\.", _shift_stage),
    (r"(\.blocks\.\d+)\.qkv\.", r"\1.attn.qkv."),
    (r"(\.blocks\.\d+)\.proj\.", r"\1.attn.proj."),
    (r"(\.blocks\.\d+)\.attns\.(\d)\.get_v\.", r"\1.attn.lepe.\2."),
    (r"^head\.", "head.fc."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CSWin) -> dict[str, torch.Tensor]:
    """Convert an official CSWin state dict (or one of ours) to this model's keys, strictly.

    Raises:
        KeyError, ValueError: as `convert_state_dict`, naming the keys that do not match.
    """
    return convert_state_dict(state_dict, model, _KEY_RULES, own_key="stem.conv.weight", source="CSWin checkpoint")


def _create_cswin(variant: str, pretrained: bool = False, **kwargs) -> CSWin:
    # The authors evaluate their EMA weights (main.py: --model-ema defaults to True), which the release
    # files keep under `state_dict_ema`.
    keys = ("state_dict_ema", "state_dict", "model")
    return create_backbone(CSWin, variant, pretrained, checkpoint_filter_fn, keys, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return backbone_cfg(
        url,
        crop_pct=kwargs.pop("crop_pct", 0.9),
        first_conv="stem.conv",
        paper_ids="arXiv:2107.00652",
        paper_name="CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
        origin_url="https://github.com/microsoft/CSWin-Transformer",
        license="mit",
        **kwargs,
    )


_RELEASE = "https://github.com/microsoft/CSWin-Transformer/releases/download/v0.1.0/{}"

# The authors' release links (README of microsoft/CSWin-Transformer); ImageNet-1k top-1 from the paper.
default_cfgs = generate_default_cfgs(
    {
        "zoo_cswin_t.in1k": _cfg(url=_RELEASE.format("cswin_tiny_224.pth"), notes=("ImageNet-1k top-1 82.7 (paper)",)),
        "zoo_cswin_s.in1k": _cfg(url=_RELEASE.format("cswin_small_224.pth"), notes=("ImageNet-1k top-1 83.6 (paper)",)),
        "zoo_cswin_b.in1k": _cfg(url=_RELEASE.format("cswin_base_224.pth"), notes=("ImageNet-1k top-1 84.2 (paper)",)),
        "zoo_cswin_l.in22k_ft_in1k": _cfg(
            url=_RELEASE.format("cswin_large_224.pth"),
            notes=("ImageNet-22k pre-trained, ImageNet-1k fine-tuned; top-1 86.5 (paper)",),
        ),
        "zoo_cswin_l.in22k": _cfg(
            url=_RELEASE.format("cswin_large_22k_224.pth"),
            num_classes=21841,
            notes=("ImageNet-22k pre-trained classifier (21841 classes)",),
        ),
        # The 384 fine-tunes (stripes of 12 in stage 3, the official CSWin_*_384 and its cfg: crop 1.0).
        "zoo_cswin_b_384.in1k": _cfg(
            url=_RELEASE.format("cswin_base_384.pth"),
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
            notes=("ImageNet-1k top-1 85.5 (authors' README)",),
        ),
        "zoo_cswin_l_384.in22k_ft_in1k": _cfg(
            url=_RELEASE.format("cswin_large_384.pth"),
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
            notes=("ImageNet-22k pre-trained, ImageNet-1k fine-tuned at 384; top-1 87.5 (authors' README)",),
        ),
    }
)


@register_model
def zoo_cswin_t(pretrained: bool = False, **kwargs) -> CSWin:
    """CSWin-T: 22.3 M parameters, 4.3 GFLOPs, 82.7% ImageNet-1k top-1 (official CSWin_64_12211_tiny_224)."""
    model_args = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16))
    return _create_cswin("zoo_cswin_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_cswin_s(pretrained: bool = False, **kwargs) -> CSWin:
    """CSWin-S: 34.6 M parameters, 6.9 GFLOPs, 83.6% ImageNet-1k top-1 (official CSWin_64_24322_small_224)."""
    model_args = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16))
    return _create_cswin("zoo_cswin_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_cswin_b(pretrained: bool = False, **kwargs) -> CSWin:
    """CSWin-B: 77.4 M parameters, 15.0 GFLOPs, 84.2% ImageNet-1k top-1 (official CSWin_96_24322_base_224)."""
    model_args = dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32))
    return _create_cswin("zoo_cswin_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_cswin_l(pretrained: bool = False, **kwargs) -> CSWin:
    """CSWin-L: 173.3 M parameters, 31.5 GFLOPs, 86.5% top-1 after ImageNet-22k (official CSWin_144_24322_large_224)."""
    model_args = dict(embed_dim=144, depths=(2, 4, 32, 2), num_heads=(6, 12, 24, 24))
    return _create_cswin("zoo_cswin_l", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_cswin_b_384(pretrained: bool = False, **kwargs) -> CSWin:
    """CSWin-B at 384 x 384 (stripes 1, 2, 12, 12): 47.0 GFLOPs, 85.5% ImageNet-1k top-1 (CSWin_96_24322_base_384)."""
    model_args = dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), img_size=384)
    return _create_cswin("zoo_cswin_b_384", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_cswin_l_384(pretrained: bool = False, **kwargs) -> CSWin:
    """CSWin-L at 384 x 384: 96.8 GFLOPs, 87.5% top-1 after ImageNet-22k (CSWin_144_24322_large_384)."""
    model_args = dict(embed_dim=144, depths=(2, 4, 32, 2), num_heads=(6, 12, 24, 24), img_size=384)
    return _create_cswin("zoo_cswin_l_384", pretrained=pretrained, **dict(model_args, **kwargs))


# torch.fx (timm's feature extraction, `create_feature_extractor`): the blocks dispatch to fused kernels and pad on
# shapes, which symbolic tracing cannot follow, so they are leaves of the traced graph, as timm does for its own.
for _leaf in (ConvNorm, CSWinBlock):
    register_notrace_module(_leaf)
