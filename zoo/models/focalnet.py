"""FocalNet: Focal Modulation Networks.

Yang et al., NeurIPS 2022 (arXiv:2203.11926); official code and weights: github.com/microsoft/FocalNet.

A strided-conv patch stem (4x4 stride 4, or 7x7 with `use_overlap_down`), then four stages of
`FocalNetBlock` (the focal modulation of `zoo.blocks.focal_modulation`, an MLP); each stage after the first
starts with a 2x2 stride-2 conv (3x3 with `use_overlap_down`) and LayerNorm. A final LayerNorm, average
pooling and a linear layer classify. The registered sizes are the paper's ImageNet-1k models with small
(focal levels 2, kernels 3, 5) and large (levels 3, kernels 3, 5, 7) receptive fields; the post-norm,
layer-scale and overlapping-stem options of the official large models are arguments of `FocalNet`.

`checkpoint_filter_fn` takes the official release checkpoints (`classification/focalnet.py` layout)
and timm's `focalnet_*` ones (NCHW, 1x1 convs where we use linears), told apart by their keys.

Like the official model, any input of at least 32 x 32 works: each strided conv drops the rows and
columns that do not fill a whole stride, so a side of 200 gives maps of 50, 25, 12, 6.
"""

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, LayerScale, register_notrace_module, to_2tuple
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from zoo.blocks.focal_modulation import FocalModulation

from ._contract import StagedBackbone, backbone_cfg, create_backbone, rename_keys, strict_key_check
from ._mlp import ResidualMlp

__all__ = ["FocalNet", "FocalNetBlock", "checkpoint_filter_fn"]


class FocalNetBlock(nn.Module):
    """Focal modulation and MLP residuals on a channels-last map.

    Pre-norm by default; with `use_post_norm` the norms move after the modulation and the MLP, as in
    the official large models (`use_postln`). `layerscale_value` enables per-channel layer scale
    (`use_layerscale`), initialised to that value.

    Args:
        dim: channels C.
        focal_level: context levels of the modulation.
        focal_window: first kernel size of the modulation.
        mlp_ratio: MLP hidden width / channels.
        use_post_norm: norm after each branch instead of before it.
        use_post_norm_in_modulation: LayerNorm inside the modulation, before its projection.
        normalize_modulator: divide the aggregated context by `focal_level + 1`.
        layerscale_value: initial layer-scale value; None disables layer scale.
        proj_drop: dropout in the modulation projection and the MLP.
        drop_path: stochastic depth of both branches.
        norm_layer: channels-last norm.
    """

    def __init__(
        self,
        dim: int,
        focal_level: int = 2,
        focal_window: int = 3,
        mlp_ratio: float = 4.0,
        use_post_norm: bool = False,
        use_post_norm_in_modulation: bool = False,
        normalize_modulator: bool = False,
        layerscale_value: float | None = None,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.Identity() if use_post_norm else norm_layer(dim, **dd)
        self.modulation = FocalModulation(
            dim,
            focal_level=focal_level,
            focal_window=focal_window,
            use_post_norm=use_post_norm_in_modulation,
            normalize_modulator=normalize_modulator,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **dd,
        )
        self.norm1_post = norm_layer(dim, **dd) if use_post_norm else nn.Identity()
        self.ls1 = LayerScale(dim, layerscale_value, **dd) if layerscale_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.Identity() if use_post_norm else norm_layer(dim, **dd)
        self.mlp = ResidualMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.norm2_post = norm_layer(dim, **dd) if use_post_norm else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale_value, **dd) if layerscale_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # The plain pre-norm block can add each residual inside the preceding projection.
        self._plain = not use_post_norm and layerscale_value is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if torch.jit.is_scripting():
            x = x + self.drop_path1(self.ls1(self.norm1_post(self.modulation(self.norm1(x)))))
            return x + self.drop_path2(self.ls2(self.norm2_post(self.mlp(self.norm2(x)))))
        # Without an active drop-path the residual adds go into the projections before them.
        if self._plain and not (self.training and not isinstance(self.drop_path1, nn.Identity)):
            x = self.modulation(self.norm1(x), residual=x)
        else:
            x = x + self.drop_path1(self.ls1(self.norm1_post(self.modulation(self.norm1(x)))))
        if self._plain and not (self.training and not isinstance(self.drop_path2, nn.Identity)):
            return self.mlp(self.norm2(x), residual=x)
        return x + self.drop_path2(self.ls2(self.norm2_post(self.mlp(self.norm2(x)))))


class FocalNetDownsample(nn.Module):
    """Strided conv and LayerNorm: (B, C_in, H, W) NCHW view -> (B, H / stride, W / stride, C_out).

    Args:
        in_dim: input channels.
        dim: output channels.
        stride: 4 for the stem, 2 between stages.
        overlap: 7x7 (stem) or 3x3 kernels with padding instead of non-overlapping patches.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        stride: int,
        overlap: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        kernel, padding = ((7, 2) if stride == 4 else (3, 1)) if overlap else (stride, 0)
        self.proj = nn.Conv2d(in_dim, dim, kernel, stride=stride, padding=padding, **dd)
        self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last in means the conv writes a map whose NHWC view is contiguous.
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return self.norm(x.permute(0, 2, 3, 1))


class FocalNetStage(nn.Module):
    """Optional downsampling, then FocalNet blocks; (B, H, W, C) in and out."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        focal_level: int,
        focal_window: int,
        mlp_ratio: float = 4.0,
        use_overlap_down: bool = False,
        use_post_norm: bool = False,
        use_post_norm_in_modulation: bool = False,
        normalize_modulator: bool = False,
        layerscale_value: float | None = None,
        proj_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = (
            FocalNetDownsample(in_dim, dim, stride=2, overlap=use_overlap_down, **dd) if downsample else None
        )
        rates = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(
            *[
                FocalNetBlock(
                    dim,
                    focal_level=focal_level,
                    focal_window=focal_window,
                    mlp_ratio=mlp_ratio,
                    use_post_norm=use_post_norm,
                    use_post_norm_in_modulation=use_post_norm_in_modulation,
                    normalize_modulator=normalize_modulator,
                    layerscale_value=layerscale_value,
                    proj_drop=proj_drop,
                    drop_path=rates[i],
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


class FocalNet(StagedBackbone):
    """FocalNet backbone and classifier with timm's model interface.

    Args:
        depths: blocks per stage.
        embed_dim: channels of the first stage; doubled at each later stage.
        focal_levels: focal levels per stage (2: small receptive field, 3: large).
        focal_windows: first focal kernel size per stage.
        mlp_ratio: MLP hidden width / channels.
        use_overlap_down: overlapping convs in the stem and downsampling (official `use_conv_embed`).
        use_post_norm: norms after the branches (official `use_postln`, large models).
        use_post_norm_in_modulation: LayerNorm inside the modulation (official `use_postln_in_modulation`).
        normalize_modulator: divide the aggregated context by the number of levels.
        layerscale_value: initial layer scale (official `use_layerscale`, `layerscale_value`); None for none.
        img_size: nominal input size (recorded for timm; focal kernels do not depend on it).
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: pooling type of the head ('avg' as in the paper).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the blocks (official `drop_rate`).
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
    """

    stage_format = "NHWC"

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 6, 2),
        embed_dim: int = 96,
        focal_levels: Sequence[int] = (2, 2, 2, 2),
        focal_windows: Sequence[int] = (3, 3, 3, 3),
        mlp_ratio: float = 4.0,
        use_overlap_down: bool = False,
        use_post_norm: bool = False,
        use_post_norm_in_modulation: bool = False,
        normalize_modulator: bool = False,
        layerscale_value: float | None = None,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not len(depths) == len(focal_levels) == len(focal_windows):
            raise ValueError(
                f"depths, focal_levels and focal_windows need one entry per stage, got {depths}, {focal_levels}, "
                f"{focal_windows}"
            )
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.use_post_norm = use_post_norm
        # Each strided conv needs one whole stride: 4 for the stem, then 2 per later stage.
        self.min_input_size = 2 ** (len(depths) + 1)
        self.img_size = to_2tuple(img_size)
        self.stem = FocalNetDownsample(in_chans, dims[0], stride=4, overlap=use_overlap_down, **dd)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        in_dim, start = dims[0], 0
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            stages.append(
                FocalNetStage(
                    in_dim,
                    dim,
                    depth,
                    downsample=i > 0,
                    focal_level=focal_levels[i],
                    focal_window=focal_windows[i],
                    mlp_ratio=mlp_ratio,
                    use_overlap_down=use_overlap_down,
                    use_post_norm=use_post_norm,
                    use_post_norm_in_modulation=use_post_norm_in_modulation,
                    normalize_modulator=normalize_modulator,
                    layerscale_value=layerscale_value,
                    proj_drop=proj_drop_rate,
                    drop_path=rates[start : start + depth],
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
            in_dim, start = dim, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm/head) that the requested intermediates do not need."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        self.num_features = self.head_hidden_size = self.feature_info[len(self.stages) - 1]["num_chs"]
        return take_indices


# Official key -> ours. The official stages (`layers`) end with the downsampling into the next stage;
# ours begin with it. The rest of the names are timm's `focalnet_*` ones, with `stages` for `layers`.
_KEY_RULES = (
    (r"^patch_embed\.", "stem."),
    (r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
    (r"^layers\.", "stages."),
    (r"\.gamma_([12])$", r".ls\1.gamma"),
    (r"\.modulation\.ln\.", ".modulation.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)
_POST_NORM_RULE = (r"\.norm([12])\.", r".norm\1_post.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: FocalNet) -> dict[str, torch.Tensor]:
    """Convert an official FocalNet state dict or timm's `focalnet_*` one to this model's keys, strictly.

    timm's port keeps NCHW 1x1 convs where we (and the official code, except for `h`) use linears;
    those weights are reshaped.

    Raises:
        KeyError: naming the keys the model needs but the checkpoint lacks, or the checkpoint's keys
            the model has no place for (e.g. a checkpoint of another family or depth).
        ValueError: naming the first keys whose shapes differ (e.g. a checkpoint of another width).
    """
    if "patch_embed.proj.weight" not in state_dict:
        timm_layout = "stem.proj.weight" in state_dict and "stem.norm.weight" in state_dict
        layout = "timm's or our layout" if timm_layout else "neither the official nor timm's layout"
        converted, source = {}, f"FocalNet checkpoint ({layout})"
        for key, value in state_dict.items():
            converted[re.sub(r"^layers\.", "stages.", key) if timm_layout else key] = value
    else:
        rules = _KEY_RULES + ((_POST_NORM_RULE,) if model.use_post_norm else ())
        converted, source = rename_keys(state_dict, rules), "FocalNet checkpoint (official layout)"
    expected = model.state_dict()
    for key, value in converted.items():
        target = expected.get(key)
        if target is not None and value.dim() == 4 and target.dim() == 2 and value.shape[2:] == (1, 1):
            converted[key] = value.flatten(1)
    strict_key_check(converted, model, classifier="head.fc", source=source)
    return converted


def _create_focalnet(variant: str, pretrained: bool = False, **kwargs) -> FocalNet:
    return create_backbone(FocalNet, variant, pretrained, checkpoint_filter_fn, ("model", "state_dict"), **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return backbone_cfg(
        url,
        crop_pct=kwargs.pop("crop_pct", 0.875),
        first_conv="stem.proj",
        paper_ids="arXiv:2203.11926",
        paper_name="Focal Modulation Networks",
        origin_url="https://github.com/microsoft/FocalNet",
        license="mit",
        **kwargs,
    )


_RELEASE = "https://github.com/microsoft/FocalNet/releases/download/v1.0.0/{}.pth"

# The authors' release links (README of microsoft/FocalNet); ImageNet-1k top-1 from the paper.
default_cfgs = generate_default_cfgs(
    {
        "zoo_focalnet_t.in1k": _cfg(url=_RELEASE.format("focalnet_tiny_lrf"), notes=("ImageNet-1k top-1 82.3",)),
        "zoo_focalnet_s.in1k": _cfg(url=_RELEASE.format("focalnet_small_lrf"), notes=("ImageNet-1k top-1 83.5",)),
        "zoo_focalnet_b.in1k": _cfg(url=_RELEASE.format("focalnet_base_lrf"), notes=("ImageNet-1k top-1 83.9",)),
        "zoo_focalnet_t_srf.in1k": _cfg(url=_RELEASE.format("focalnet_tiny_srf"), notes=("ImageNet-1k top-1 82.1",)),
        "zoo_focalnet_s_srf.in1k": _cfg(url=_RELEASE.format("focalnet_small_srf"), notes=("ImageNet-1k top-1 83.4",)),
        "zoo_focalnet_b_srf.in1k": _cfg(url=_RELEASE.format("focalnet_base_srf"), notes=("ImageNet-1k top-1 83.7",)),
        # The ImageNet-22k pre-trained large models (21842 classes, the first 1000 ordered as ImageNet-1k's;
        # README of microsoft/FocalNet, "ImageNet-22K Pretraining"). No ImageNet-1k head was released.
        **{
            f"zoo_focalnet_{size}_{fl}.in22k": _cfg(
                url=_RELEASE.format(file),
                input_size=(3, 384, 384),
                pool_size=(12, 12),
                crop_pct=1.0,
                num_classes=21842,
                notes=("ImageNet-22k pre-trained classifier (21842 classes)", f"timm's port: {timm_name}.ms_in22k"),
            )
            for size, fl, file, timm_name in (
                ("l", "fl3", "focalnet_large_lrf_384", "focalnet_large_fl3"),
                ("l", "fl4", "focalnet_large_lrf_384_fl4", "focalnet_large_fl4"),
                ("xl", "fl3", "focalnet_xlarge_lrf_384", "focalnet_xlarge_fl3"),
                ("xl", "fl4", "focalnet_xlarge_lrf_384_fl4", "focalnet_xlarge_fl4"),
            )
        },
    }
)

_LRF = dict(focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3))
_SRF = dict(focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3))


@register_model
def zoo_focalnet_t(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-T (LRF): 28.6 M parameters, 4.5 GFLOPs, 82.3% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 6, 2), embed_dim=96, **_LRF)
    return _create_focalnet("zoo_focalnet_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_focalnet_s(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-S (LRF): 50.3 M parameters, 8.7 GFLOPs, 83.5% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 18, 2), embed_dim=96, **_LRF)
    return _create_focalnet("zoo_focalnet_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_focalnet_b(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-B (LRF): 88.7 M parameters, 15.4 GFLOPs, 83.9% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 18, 2), embed_dim=128, **_LRF)
    return _create_focalnet("zoo_focalnet_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_focalnet_t_srf(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-T (SRF): 28.4 M parameters, 4.4 GFLOPs, 82.1% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 6, 2), embed_dim=96, **_SRF)
    return _create_focalnet("zoo_focalnet_t_srf", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_focalnet_s_srf(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-S (SRF): 49.9 M parameters, 8.6 GFLOPs, 83.4% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 18, 2), embed_dim=96, **_SRF)
    return _create_focalnet("zoo_focalnet_s_srf", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_focalnet_b_srf(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-B (SRF): 88.1 M parameters, 15.3 GFLOPs, 83.7% ImageNet-1k top-1."""
    model_args = dict(depths=(2, 2, 18, 2), embed_dim=128, **_SRF)
    return _create_focalnet("zoo_focalnet_b_srf", pretrained=pretrained, **dict(model_args, **kwargs))


# The authors' large-model configs (configs/focalnet_{large,xlarge}_fl{3,4}.yaml): overlapping convs, post-norms,
# layer scale 1e-4; fl3 with focal kernels from 5, fl4 from 3; L-fl4 also normalises its modulator.
_LARGE = dict(depths=(2, 2, 18, 2), use_overlap_down=True, use_post_norm=True, layerscale_value=1e-4, img_size=384)
_FL3 = dict(focal_levels=(3, 3, 3, 3), focal_windows=(5, 5, 5, 5))
_FL4 = dict(focal_levels=(4, 4, 4, 4), focal_windows=(3, 3, 3, 3))


@register_model
def zoo_focalnet_l_fl3(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-L (3 focal levels), ImageNet-22k pre-trained at 384 x 384."""
    model_args = dict(embed_dim=192, **_LARGE, **_FL3)
    return _create_focalnet("zoo_focalnet_l_fl3", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_focalnet_l_fl4(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-L (4 focal levels, normalised modulator), ImageNet-22k pre-trained at 384 x 384."""
    model_args = dict(embed_dim=192, normalize_modulator=True, **_LARGE, **_FL4)
    return _create_focalnet("zoo_focalnet_l_fl4", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_focalnet_xl_fl3(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-XL (3 focal levels), ImageNet-22k pre-trained at 384 x 384."""
    model_args = dict(embed_dim=256, **_LARGE, **_FL3)
    return _create_focalnet("zoo_focalnet_xl_fl3", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def zoo_focalnet_xl_fl4(pretrained: bool = False, **kwargs) -> FocalNet:
    """FocalNet-XL (4 focal levels), ImageNet-22k pre-trained at 384 x 384."""
    model_args = dict(embed_dim=256, **_LARGE, **_FL4)
    return _create_focalnet("zoo_focalnet_xl_fl4", pretrained=pretrained, **dict(model_args, **kwargs))


# torch.fx (timm's feature extraction, `create_feature_extractor`): the blocks dispatch to fused kernels and pad on
# shapes, which symbolic tracing cannot follow, so they are leaves of the traced graph, as timm does for its own.
for _leaf in (FocalNetDownsample, FocalNetBlock):
    register_notrace_module(_leaf)
