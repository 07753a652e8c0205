"""DaViT: Dual Attention Vision Transformers.

Ding et al., ECCV 2022 (arXiv:2204.03645); official code and weights: github.com/dingmyu/davit.

A 7x7 stride-4 conv stem, then four stages; each stage after the first starts with LayerNorm and a
2x2 stride-2 conv, and stacks pairs of a spatial (window attention) block and a channel (group
attention) block, whose mixers are `zoo.blocks.dual`'s. Each block adds a 3x3 depthwise convolution
(convolutional position encoding) to its input before the attention and again before the MLP. The head
pools, normalises and classifies. Sizes and the
released checkpoints' layout follow the official `timm/models/davit.py` of dingmyu/davit;
`checkpoint_filter_fn` also takes timm's `davit_*` checkpoints, whose keys are ours.

Any input size works: as in the official code the stem and every downsampling pad the bottom/right
to the stride, and the window attention pads to the window and crops back.

The blocks are channels-last, (B, H, W, C). Their projections, MLPs and position-encoding convs run through
`zoo.kernels.fused_pointwise`, which takes the modules: in CPU inference it applies GELU and the residual adds as
oneDNN post-ops; otherwise (training, hooked or wrapped layers) it calls the modules.
"""

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, NormMlpClassifierHead, register_notrace_module, to_2tuple
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.blocks.dual import ChannelAttention, WindowAttention
from zoo.kernels.fused_pointwise import conv_add

from ._contract import StagedBackbone, backbone_cfg, create_backbone, rename_keys, strict_key_check
from ._mlp import ResidualMlp

__all__ = ["ChannelBlock", "ConvPosEnc", "DaVit", "SpatialBlock", "checkpoint_filter_fn"]


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: x + act(depthwise_conv(x)); x: (B, H, W, C).

    Args:
        dim: channels C.
        kernel_size: depthwise kernel size.
        act: GELU on the conv output (the Florence-2 variant); off in the DaViT paper.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        act: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=device, dtype=dtype)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The NCHW view of a contiguous channels-last map has channels_last strides: no layout copy.
        x_nchw = x.permute(0, 3, 1, 2)
        if torch.jit.is_scripting():  # TorchScript cannot hand modules to the fused op
            return x + self.act(self.proj(x_nchw)).permute(0, 2, 3, 1)
        if isinstance(self.act, nn.Identity):
            return conv_add(x_nchw, self.proj, x_nchw).permute(0, 2, 3, 1)
        return x + self.act(self.proj(x_nchw)).permute(0, 2, 3, 1)


class _DualBlock(nn.Module):
    """Shared body of the spatial and channel blocks: CPE, attention residual, CPE, MLP residual."""

    def _build(
        self,
        dim: int,
        mlp_ratio: float,
        drop_path: float,
        norm_layer: type[nn.Module],
        ffn: bool,
        cpe_act: bool,
        dd: dict,
    ) -> None:
        self.cpe1 = ConvPosEnc(dim, 3, act=cpe_act, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = ConvPosEnc(dim, 3, act=cpe_act, **dd)
        if ffn:
            self.norm2 = norm_layer(dim, **dd)
            self.mlp = ResidualMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, **dd)
            self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        else:
            self.norm2 = self.mlp = self.drop_path2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if torch.jit.is_scripting():
            x = self.cpe1(x)
            x = self.cpe2(x + self.drop_path1(self.attn(self.norm1(x))))
            if self.mlp is None:
                return x
            else:
                return x + self.drop_path2(self.mlp(self.norm2(x)))
        # Without an active drop-path the residual adds go into the projections.
        fold = not self.training or isinstance(self.drop_path1, nn.Identity)
        x = self.cpe1(x)
        x = self.attn(self.norm1(x), residual=x) if fold else x + self.drop_path1(self.attn(self.norm1(x)))
        x = self.cpe2(x)
        if self.mlp is None:
            return x
        return self.mlp(self.norm2(x), residual=x) if fold else x + self.drop_path2(self.mlp(self.norm2(x)))


class SpatialBlock(_DualBlock):
    """DaViT spatial block: CPE, pre-norm window attention, CPE, pre-norm MLP; x: (B, H, W, C).

    Args:
        dim: channels C.
        num_heads: attention heads.
        window_size: attention window side.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias of the q/k/v projection.
        drop_path: stochastic depth of both residual branches.
        norm_layer: channels-last norm.
        ffn: keep the MLP (the paper's models do).
        cpe_act: GELU in the position encodings.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ffn: bool = True,
        cpe_act: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias, **dd)
        self._build(dim, mlp_ratio, drop_path, norm_layer, ffn, cpe_act, dd)


class ChannelBlock(_DualBlock):
    """DaViT channel block: CPE, pre-norm channel group attention, CPE, pre-norm MLP; x: (B, H, W, C).

    Args:
        dim: channels C.
        num_heads: channel groups.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias of the q/k/v projection.
        drop_path: stochastic depth of both residual branches.
        norm_layer: channels-last norm.
        ffn: keep the MLP (the paper's models do).
        cpe_act: GELU in the position encodings.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ffn: bool = True,
        cpe_act: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.attn = ChannelAttention(dim, num_heads, qkv_bias=qkv_bias, **dd)
        self._build(dim, mlp_ratio, drop_path, norm_layer, ffn, cpe_act, dd)


class DaVitStem(nn.Module):
    """Pad to a multiple of 4, 7x7 stride-4 conv, LayerNorm: (B, C_in, H, W) -> (B, ceil(H/4), ceil(W/4), C)."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_chans, dim, 7, stride=4, padding=3, **dd)
        self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            x = F.pad(x, (0, -w % 4, 0, -h % 4))
        # A channels_last input makes the conv write a map whose NHWC view is contiguous.
        x = self.conv(x.contiguous(memory_format=torch.channels_last))
        return self.norm(x.permute(0, 2, 3, 1))


class DaVitDownsample(nn.Module):
    """LayerNorm, pad to even, 2x2 stride-2 conv: (B, H, W, C_in) -> (B, ceil(H/2), ceil(W/2), C_out)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(in_dim, **dd)
        self.conv = nn.Conv2d(in_dim, dim, 2, stride=2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2)).contiguous(memory_format=torch.channels_last)
        return self.conv(x).permute(0, 2, 3, 1)


class DaVitStage(nn.Module):
    """Optional downsampling, then `depth` (spatial block, channel block) pairs; (B, H, W, C) in and out."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: Sequence[float] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = DaVitDownsample(in_dim, dim, **dd) if downsample else nn.Identity()
        rates = list(drop_path) or [0.0] * (2 * depth)
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(
                    SpatialBlock(
                        dim,
                        num_heads,
                        window_size=window_size,
                        mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias,
                        drop_path=rates[2 * i],
                        **dd,
                    ),
                    ChannelBlock(
                        dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rates[2 * i + 1], **dd
                    ),
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class DaVit(StagedBackbone):
    """DaViT backbone and classifier with timm's model interface.

    Args:
        depths: (spatial, channel) block pairs per stage.
        embed_dims: channels per stage.
        num_heads: heads (spatial) and channel groups (channel) per stage.
        window_size: spatial attention window side; None for img_size / 32 (7 at 224, 12 at 384).
        img_size: nominal input size.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias of the q/k/v projections.
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: pooling type of the head ('avg' as in the paper).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly over every spatial and channel block, as the
            official code spaces it.
    """

    stage_format = "NHWC"

    def __init__(
        self,
        depths: Sequence[int] = (1, 1, 3, 1),
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | None = None,
        img_size: int | tuple[int, int] = 224,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
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
        if not len(depths) == len(embed_dims) == len(num_heads):
            raise ValueError(
                f"depths, embed_dims and num_heads need one entry per stage, got {depths}, {embed_dims}, {num_heads}"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.min_input_size = 1  # every stride and window pads
        self.img_size = to_2tuple(img_size)
        window_size = window_size if window_size is not None else min(self._partition_size(self.img_size))
        self.stem = DaVitStem(in_chans, embed_dims[0], **dd)
        rates = torch.linspace(0, drop_path_rate, 2 * sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        in_dim, start = embed_dims[0], 0
        for i, (depth, dim, heads) in enumerate(zip(depths, embed_dims, num_heads, strict=True)):
            stages.append(
                DaVitStage(
                    in_dim,
                    dim,
                    depth,
                    heads,
                    downsample=i > 0,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=rates[start : start + 2 * depth],
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
            in_dim, start = dim, start + 2 * depth
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        # DaViT normalises after pooling, inside the head: average pool, LayerNorm (PyTorch's default eps,
        # not timm's 1e-6), linear. No norm on the map.
        self.norm = nn.Identity()
        self.head = NormMlpClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-5),
            **dd,
        )
        self.apply(self._init_weights)

    def _set_input_size(self, img_size: tuple[int, int], window_size: int | None = None) -> dict:
        window_size = window_size if window_size is not None else min(self._partition_size(img_size))
        for module in self.stages.modules():
            if isinstance(module, WindowAttention):
                module.window_size = to_2tuple(window_size)
        return dict(window_size=window_size)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        truncated = max_index < len(self.feature_info) - 1
        if truncated:  # the head's norm is sized for the last stage, so it goes with it
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_norm or truncated:
            self.num_classes = 0
            self.head.reset(0, "", reset_other=True, in_features=self.num_features)
        return take_indices


# Official key -> ours (ours are timm's `davit_*` keys). The official model keeps the stem and the
# downsampling layers in one list, the blocks in `main_blocks`, the two CPEs of a block in a list.
_KEY_RULES = (
    (r"^patch_embeds\.0\.proj\.", "stem.conv."),
    (r"^patch_embeds\.0\.norm\.", "stem.norm."),
    (r"^patch_embeds\.(\d+)\.proj\.", r"stages.\1.downsample.conv."),
    (r"^patch_embeds\.(\d+)\.norm\.", r"stages.\1.downsample.norm."),
    (r"^main_blocks\.(\d+)\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.\3."),
    (r"\.cpe\.0\.", ".cpe1."),
    (r"\.cpe\.1\.", ".cpe2."),
    (r"^norms\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: DaVit) -> dict[str, torch.Tensor]:
    """Convert an official DaViT state dict, or timm's `davit_*` one (keys already ours), strictly.

    Raises:
        KeyError: naming the keys the model needs but the checkpoint lacks, or the checkpoint's keys
            the model has no place for (e.g. a checkpoint of another family or depth).
        ValueError: naming the first keys whose shapes differ (e.g. a checkpoint of another width).
    """
    if "patch_embeds.0.proj.weight" not in state_dict:
        layout = "timm layout" if "stem.conv.weight" in state_dict else "neither the official nor timm's layout"
        converted, source = dict(state_dict), f"DaViT checkpoint ({layout})"
    else:
        converted, source = rename_keys(state_dict, _KEY_RULES), "DaViT checkpoint (official layout)"
    strict_key_check(converted, model, classifier="head.fc", source=source)
    return converted


def _create_davit(variant: str, pretrained: bool = False, **kwargs) -> DaVit:
    return create_backbone(DaVit, variant, pretrained, checkpoint_filter_fn, ("state_dict", "model"), **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return backbone_cfg(
        url,
        crop_pct=0.875,
        first_conv="stem.conv",
        paper_ids="arXiv:2204.03645",
        paper_name="DaViT: Dual Attention Vision Transformers",
        origin_url="https://github.com/dingmyu/davit",
        license="mit",
        min_input_size=(3, 1, 1),
        **kwargs,
    )


_SHAREPOINT = "https://connecthkuhk-my.sharepoint.com/:u:/g/personal/u3007305_connect_hku_hk/{}"

# The authors' release links (README of dingmyu/davit); ImageNet-1k top-1 from the paper.
default_cfgs = generate_default_cfgs(
    {
        "zoo_davit_t.in1k": _cfg(
            url=_SHAREPOINT.format("EcJYlVYP9y5FsDbMP-nwjtABgLmdrNGZBxgR5--Kg3MZ7Q?e=v9OrXB"),
            notes=("ImageNet-1k top-1 82.8 (paper)",),
        ),
        "zoo_davit_s.in1k": _cfg(
            url=_SHAREPOINT.format("ERN_Gzm8oKdIvO01r0X2cscB_owuRAnnQPNGJEVGP23xHQ?e=MVW3ZO"),
            notes=("ImageNet-1k top-1 84.2 (paper)",),
        ),
        "zoo_davit_b.in1k": _cfg(
            url=_SHAREPOINT.format("Ea8kCpdM949CvTM0w7DWbGwBxxiACMSik4zx-emrNY0uKQ?e=aEjC7u"),
            notes=("ImageNet-1k top-1 84.6 (paper)",),
        ),
    }
)


@register_model
def zoo_davit_t(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-T: 28.4 M parameters, 4.5 GFLOPs, 82.8% ImageNet-1k top-1."""
    model_args = dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("zoo_davit_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_davit_s(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-S: 49.7 M parameters, 8.8 GFLOPs, 84.2% ImageNet-1k top-1."""
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("zoo_davit_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_davit_b(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-B: 88.0 M parameters, 15.5 GFLOPs, 84.6% ImageNet-1k top-1."""
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
    return _create_davit("zoo_davit_b", pretrained=pretrained, **dict(model_args, **kwargs))


# torch.fx (timm's feature extraction, `create_feature_extractor`): the blocks dispatch to fused kernels and pad on
# shapes, which symbolic tracing cannot follow, so they are leaves of the traced graph, as timm does for its own.
for _leaf in (DaVitStem, DaVitDownsample, SpatialBlock, ChannelBlock):
    register_notrace_module(_leaf)
