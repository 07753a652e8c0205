"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Zhu et al., CVPR 2023 (arXiv:2303.08810); official code and weights: github.com/rayleizhu/BiFormer.

Four stages (overlapping conv stem, strided-conv downsampling), blocks of depthwise-conv positional
embedding, pre-norm Bi-Level Routing Attention (full attention with LCE in the last stage) and an MLP,
BatchNorm on the last map, average pooling and a linear classifier. Sizes and the layout of the
released checkpoints follow the official `models/biformer.py`; `checkpoint_filter_fn` converts its
keys to ours.

Any input of at least 32 x 32 works: regions pad as the official `auto_pad` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, register_notrace_module, to_2tuple
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from zoo.blocks.routing import BiLevelRoutingAttention, GlobalAttentionLePE
from zoo.kernels.fused_pointwise import conv_add

from ._contract import StagedBackbone, backbone_cfg, convert_state_dict, create_backbone
from ._mlp import ResidualMlp

__all__ = ["BiFormer", "checkpoint_filter_fn"]


class BiFormerBlock(nn.Module):
    """Depthwise-conv position embedding, then pre-norm attention and MLP residuals; x: (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        topk: int,
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        # The official block's 3x3 depthwise conv ("before_attn_dwconv") added to its input.
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads=num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv, **dd
            )
        else:
            # The official "topk=-2" stage: full attention with its default 8 heads.
            self.attn = GlobalAttentionLePE(dim, num_heads=8, side_dwconv=side_dwconv, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = ResidualMlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_cf = x.permute(0, 3, 1, 2)  # NCHW view of the channels-last map
        x = conv_add(x_cf, self.pos_embed, x_cf).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if self.training and isinstance(self.drop_path, DropPath):  # drop-path sits between the MLP and the add
            return x + self.drop_path(self.mlp(self.norm2(x)))
        # The residual add inside fc2's GEMM (zoo.kernels.fused_pointwise, CPU inference).
        return self.mlp(self.norm2(x), residual=x)


class BiFormerStage(nn.Module):
    """Optional strided-conv downsampling, then blocks; takes and returns (B, C, H, W)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        topk: int,
        downsample: bool,
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
        drop_path: Sequence[float] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, **dd), nn.BatchNorm2d(dim, **dd)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                BiFormerBlock(
                    dim,
                    num_heads,
                    topk,
                    n_win=n_win,
                    mlp_ratio=mlp_ratio,
                    side_dwconv=side_dwconv,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    **dd,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class BiFormer(StagedBackbone):
    """BiFormer backbone and classifier with timm's model interface.

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage.
        head_dim: channels per head of the routing attention (heads = embed_dim // head_dim).
        topks: routed regions per stage; a value <= 0 makes the stage full attention with LCE.
        n_win: regions per side for routing attention.
        mlp_ratio: MLP hidden width / channels.
        side_dwconv: LCE kernel size.
        img_size: nominal input size (recorded for timm; routing uses n_win regions per side at any size).
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: pooling type of the head ('avg' as in the paper).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        head_dim: int = 32,
        topks: Sequence[int] = (1, 4, 16, -2),
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
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
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.min_input_size = 32
        self.img_size = to_2tuple(img_size)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0] // 2, **dd),
            nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0], **dd),
        )
        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        in_dim = embed_dims[0]
        for i, (depth, dim, topk) in enumerate(zip(depths, embed_dims, topks, strict=True)):
            stages.append(
                BiFormerStage(
                    in_dim,
                    dim,
                    depth,
                    num_heads=dim // head_dim,
                    topk=topk,
                    downsample=i > 0,
                    n_win=n_win,
                    mlp_ratio=mlp_ratio,
                    side_dwconv=side_dwconv,
                    drop_path=dpr[i],
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.BatchNorm2d(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)


# Official key -> ours. The official model is a flat list of downsample layers and stages of blocks;
# ours nests the downsampling inside each stage, names the stem, and uses timm's Mlp and head.
_KEY_RULES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.attn\.qkv\.qkv\.", ".attn.qkv."),
    (r"\.attn\.wo\.", ".attn.proj."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
    (r"^head\.", "head.fc."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: BiFormer) -> dict[str, torch.Tensor]:
    """Convert an official BiFormer state dict (or one of ours) to this model's keys, strictly.

    Raises:
        KeyError, ValueError: as `convert_state_dict`, naming the keys that do not match.
    """
    return convert_state_dict(state_dict, model, _KEY_RULES, own_key="stem.0.weight", source="BiFormer checkpoint")


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return create_backbone(BiFormer, variant, pretrained, checkpoint_filter_fn, ("model", "state_dict"), **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return backbone_cfg(
        url,
        crop_pct=0.875,
        first_conv="stem.0",
        paper_ids="arXiv:2303.08810",
        paper_name="BiFormer: Vision Transformer with Bi-Level Routing Attention",
        origin_url="https://github.com/rayleizhu/BiFormer",
        license="mit",
        **kwargs,
    )


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/{}/root/content"

# The authors' release links (README of rayleizhu/BiFormer); ImageNet-1k top-1 from the paper.
default_cfgs = generate_default_cfgs(
    {
        "zoo_biformer_t.in1k": _cfg(
            url=_ONEDRIVE.format("s!AkBbczdRlZvChHEOoGkgwgQzEDlM"), notes=("ImageNet-1k top-1 81.4 (paper)",)
        ),
        "zoo_biformer_s.in1k": _cfg(
            url=_ONEDRIVE.format("s!AkBbczdRlZvChHDyM-x9KWRBZ832"), notes=("ImageNet-1k top-1 83.8 (paper)",)
        ),
        "zoo_biformer_b.in1k": _cfg(
            url=_ONEDRIVE.format("s!AkBbczdRlZvChHI_XPhoadjaNxtO"), notes=("ImageNet-1k top-1 84.3 (paper)",)
        ),
    }
)

_ARGS = dict(head_dim=32, topks=(1, 4, 16, -2), n_win=7, mlp_ratio=3.0, side_dwconv=5)


@register_model
def zoo_biformer_t(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1 M parameters, 2.2 GFLOPs, 81.4% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), **_ARGS)
    return _create_biformer("zoo_biformer_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_biformer_s(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5 M parameters, 4.5 GFLOPs, 83.8% ImageNet-1k top-1."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), **_ARGS)
    return _create_biformer("zoo_biformer_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_biformer_b(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: 56.8 M parameters, 9.8 GFLOPs, 84.3% ImageNet-1k top-1."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), **_ARGS)
    return _create_biformer("zoo_biformer_b", pretrained=pretrained, **dict(model_args, **kwargs))


# torch.fx (timm's feature extraction, `create_feature_extractor`): the blocks dispatch to fused kernels and pad on
# shapes, which symbolic tracing cannot follow, so they are leaves of the traced graph, as timm does for its own.
for _leaf in (BiFormerBlock,):
    register_notrace_module(_leaf)
