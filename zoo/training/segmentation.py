"""Semantic segmentation as a LightningModule: a Semantic FPN head on any zoo backbone in its dense form.

    from zoo.training.segmentation import SemanticSegmentation
    from zoo.training.seg_data import SegmentationData
    data = SegmentationData(image_size=64, scale=(1.0, 1.0), hflip=0.0)  # digits canvases, 11 classes
    task = SemanticSegmentation("zoo_biformer_t", num_classes=data.num_classes, model_kwargs={"n_win": 4})
    lightning.Trainer(max_epochs=3).fit(task, data)

The head is the Semantic FPN of Kirillov et al. (Panoptic FPN, CVPR 2019), the one BiFormer, PVT and most
hierarchical ViTs report on ADE20K: torchvision's `FeaturePyramidNetwork`, then per level 3x3 conv + norm +
ReLU blocks with 2x upsampling down to the finest stride, summed, and a 1x1 classifier. Training uses pixel
cross-entropy that skips `ignore_index`; validation reports dataset-level mIoU (torchmetrics'
`MulticlassJaccardIndex`, classes absent from both prediction and annotation left out, as mmseg does).
The best weights leave as safetensors (`zoo.training.task.export_safetensors`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchvision.ops import FeaturePyramidNetwork

from ..integrations.dense import DenseBackbone
from .task import TrainingTask

__all__ = ["SemanticFPNHead", "SemanticSegmentation", "SemanticSegmentationModel"]


def _conv_norm_relu(in_channels: int, out_channels: int, device=None, dtype=None) -> nn.Sequential:
    # GroupNorm: statistics per sample, so the head behaves the same at any batch size and needs no SyncBN.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False, device=device, dtype=dtype),
        nn.GroupNorm(math.gcd(32, out_channels), out_channels, device=device, dtype=dtype),
        nn.ReLU(inplace=True),
    )


class SemanticFPNHead(nn.Module):
    """Semantic FPN: an FPN over the backbone's maps, merged at the finest stride into per-pixel logits.

    Args:
        in_channels: channels of each backbone map, finest first.
        strides: stride of each map, finest first (powers of two apart).
        num_classes: output classes.
        fpn_channels: channels of the FPN levels.
        channels: channels of the merging blocks.
        dropout: channel dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        fpn_channels: int = 256,
        channels: int = 128,
        dropout: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels ({len(in_channels)}) and strides ({len(strides)}) must match in length")
        dd = {"device": device, "dtype": dtype}
        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels).to(**dd)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            ups = int(round(math.log2(stride / strides[0])))
            layers = []
            for k in range(max(ups, 1)):
                layers.append(_conv_norm_relu(fpn_channels if k == 0 else channels, channels, **dd))
                if ups:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1, **dd)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """feats: one (B, C_i, H_i, W_i) map per level, finest first -> logits (B, num_classes, H_0, W_0)."""
        levels = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values()
        size = feats[0].shape[-2:]
        out = None
        for head, level in zip(self.scale_heads, levels, strict=True):
            # Odd sizes round up at every stride, so 2x upsampling can overshoot the finest map by a pixel.
            y = F.interpolate(head(level), size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return self.classifier(self.dropout(out))


class SemanticSegmentationModel(nn.Module):
    """A zoo backbone in its dense form (`DenseBackbone`) with a `SemanticFPNHead`.

    The state dict is `backbone.*` (the DenseBackbone's) and `decode_head.*`; an exported `best.safetensors`
    loads back with `load_state_dict` into a model built with the same arguments.

    Args:
        model_name: a registered backbone, e.g. "zoo_biformer_t".
        num_classes: output classes.
        out_indices: backbone stages fed to the head.
        fpn_channels: channels of the FPN levels.
        head_channels: channels of the head's merging blocks.
        dropout: channel dropout before the classifier.
        drop_path_rate: stochastic depth of the backbone.
        frozen_stages: -1 freezes nothing; k >= 0 freezes the stem and the first k stages.
        norm_eval: keep the backbone's BatchNorm statistics frozen while training.
        with_cp: gradient checkpointing inside the backbone's stages.
        pretrained_file: backbone weights (a classification release or a zoo/mmseg checkpoint, see DenseBackbone).
        model_kwargs: further arguments of the backbone constructor (e.g. `n_win` for BiFormer).
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        fpn_channels: int = 256,
        head_channels: int = 128,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = DenseBackbone(
            model_name,
            out_indices=tuple(out_indices),
            drop_path_rate=drop_path_rate,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            with_cp=with_cp,
            pretrained=pretrained_file,
            **(model_kwargs or {}),
        )
        self.decode_head = SemanticFPNHead(
            self.backbone.channels, self.backbone.strides, num_classes, fpn_channels, head_channels, dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> logits (B, num_classes, H, W)."""
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def no_weight_decay(self) -> set[str]:
        """The backbone's own no-decay parameters, by their names in this model."""
        return {f"backbone.body.{n}" for n in getattr(self.backbone.body, "no_weight_decay", set)()}


class SemanticSegmentation(TrainingTask):
    """Semantic segmentation of `SemanticSegmentationModel` with pixel cross-entropy.

    Logs `train/loss`, `train/lr`, `val/loss`, `val/miou` and `val/pixel_acc`. Optimizer, schedule, epoch
    reseeding (resumed runs repeat uninterrupted ones), the non-finite-loss stop and the export of the best
    checkpoint (by `val/miou`) as `best.safetensors` are `TrainingTask`'s.

    Args:
        model_name: backbone, any registered zoo model (`zoo_biformer_t`, `zoo_cswin_t`, ...).
        num_classes: classes; the CLI links it to the data's.
        ignore_index: label of unlabelled pixels; the CLI links it to the data's.
        out_indices, fpn_channels, head_channels, dropout, drop_path_rate, frozen_stages, norm_eval, with_cp,
            pretrained_file, model_kwargs: see `SemanticSegmentationModel`.
        opt: timm optimizer name ('adamw', 'sgd', ...).
        lr: peak learning rate of the backbone.
        head_lr_scale: learning-rate factor of the decode head (SegFormer-style recipes use 10).
        weight_decay: decoupled weight decay; norms, biases and `no_weight_decay()` get none.
        momentum: SGD-family momentum.
        opt_eps: optimizer epsilon; None for the optimizer's default.
        opt_betas: Adam-family betas; None for the optimizer's default.
        sched: timm scheduler name ('poly', 'cosine', 'step', ...).
        decay_rate: the schedule's decay: the power of 'poly' (mmseg's PolyLR uses 1.0), the factor of 'step'.
        warmup_epochs: linear warm-up length in epochs (fractions allowed when the schedule steps on updates).
        warmup_lr: learning rate at the first update.
        min_lr: floor of the decay.
        cooldown_epochs: epochs at `min_lr` after the decay.
        step_on_epochs: set the learning rate once per epoch instead of after every update.
    """

    monitor: ClassVar[str | None] = "val/miou"
    linked: ClassVar[tuple[str, ...]] = ("num_classes", "ignore_index")

    def __init__(
        self,
        model_name: str = "zoo_biformer_t",
        num_classes: int = 150,
        ignore_index: int = 255,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        fpn_channels: int = 256,
        head_channels: int = 128,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        opt: str = "adamw",
        lr: float = 1e-4,
        head_lr_scale: float = 1.0,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        opt_eps: float | None = None,
        opt_betas: tuple[float, float] | None = None,
        sched: str = "poly",
        decay_rate: float = 1.0,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 0.0,
        cooldown_epochs: int = 0,
        step_on_epochs: bool = False,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"model.ignore_index ({ignore_index}) must not be a class index (< {num_classes})")
        self.save_hyperparameters()
        if not timm.is_model(model_name):
            raise ValueError(f"model.model_name: timm has no model {model_name!r} (after `import zoo`)")
        self.model = SemanticSegmentationModel(
            model_name,
            num_classes,
            out_indices=out_indices,
            fpn_channels=fpn_channels,
            head_channels=head_channels,
            dropout=dropout,
            drop_path_rate=drop_path_rate,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            with_cp=with_cp,
            pretrained_file=pretrained_file,
            model_kwargs=model_kwargs,
        )
        self.val_miou = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
        self.val_pixel_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> logits (B, num_classes, H, W)."""
        return self.model(x)

    def _loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not (mask != self.hparams.ignore_index).any():
            return logits.sum() * 0.0  # nothing labelled: no signal, and mean cross-entropy would be nan
        return F.cross_entropy(logits, mask, ignore_index=self.hparams.ignore_index)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, mask = batch["image"], batch["mask"]
        loss = self._loss(self.model(x), mask)
        self.log_train_loss(loss, x.shape[0], batch_idx)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, mask = batch["image"], batch["mask"]
        logits = self.model(x)
        sizes, mask_sizes = batch["image_size"].tolist(), batch["mask_size"].tolist()
        if all(s == list(x.shape[-2:]) == list(mask.shape[-2:]) for s in sizes + mask_sizes):
            pairs = [(logits, mask)]
        else:
            # Different sizes in one batch: score each image's unpadded logits at its annotation's resolution.
            pairs = [
                (
                    F.interpolate(logits[i : i + 1, :, :h, :w], size=(mh, mw), mode="bilinear", align_corners=False),
                    mask[i : i + 1, :mh, :mw],
                )
                for i, ((h, w), (mh, mw)) in enumerate(zip(sizes, mask_sizes, strict=True))
            ]
        loss = torch.stack([self._loss(lg, m) for lg, m in pairs]).mean()
        for lg, m in pairs:
            pred = lg.argmax(1)
            self.val_miou.update(pred, m)
            self.val_pixel_acc.update(pred, m)
        batch_size = x.shape[0]
        self.log("val/loss", loss, sync_dist=True, batch_size=batch_size)
        self.log("val/miou", self.val_miou, prog_bar=True, batch_size=batch_size)
        self.log("val/pixel_acc", self.val_pixel_acc, batch_size=batch_size)

    def optimizer_params(self) -> list[dict]:
        """The decode head at `head_lr_scale`."""
        scale = self.hparams.head_lr_scale
        return self.param_groups(lambda name: scale if name.startswith("decode_head.") else 1.0)
