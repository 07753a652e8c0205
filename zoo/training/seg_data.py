"""Data for semantic segmentation: canvases of scikit-learn's digits (ships with the package) or an ADE20K-style tree.

`SegmentationData()` with no `root` trains on `DigitsSegmentation`: scikit-learn's 8x8 digits pasted onto
blank canvases, every pixel labelled with its digit + 1, or 0 for background; 11 classes, made offline and
identically on every run. With `root=DIR` it reads ADE20K's layout,

    DIR/images/train/*.jpg        DIR/annotations/train/*.png
    DIR/images/val/*.jpg          DIR/annotations/val/*.png

pairing an image with the annotation of the same name (relative path without extension). An annotation is
a single-channel PNG of class indices. `reduce_zero_label=True` treats 0 as "not labelled" (ignored) and
shifts 1..N down to 0..N-1, as ADE20K's 150-class benchmark and mmseg's `reduce_zero_label` do; otherwise 0
is an ordinary class (background).

Training draws reuse the classification recipe's machinery (`SeededDataModule`, `SeededAugmentation`): each
crop, scale and flip is a function of (seed, epoch, position), so a resumed run repeats an uninterrupted one.
Transforms are torchvision's `transforms.v2`, which move an image and its mask together.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .data import _IMAGE_ERRORS, DataError, SeededAugmentation, SeededDataModule, image_extensions, load_rgb_image

__all__ = [
    "DigitsSegmentation",
    "SegmentationData",
    "SegmentationFolder",
    "check_segmentation_folder",
    "collate_segmentation",
]

Sample = tuple[tv_tensors.Image, tv_tensors.Mask]


def _files_by_stem(folder: str, extensions: tuple[str, ...]) -> dict[str, str]:
    """relative path without extension -> path, for every file under `folder` with one of `extensions`."""
    found = {}
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for name in names:
            if name.lower().endswith(extensions):
                path = os.path.join(dirpath, name)
                found[os.path.splitext(os.path.relpath(path, folder))[0]] = path
    return found


def check_segmentation_folder(root: str) -> dict[str, list[tuple[str, str]]]:
    """Check `root/{images,annotations}/{train,val}/` (or ADE20K's `training`, `validation`) and pair every image
    with its annotation.

    Returns:
        split -> sorted list of (image path, annotation path).

    Raises:
        FileNotFoundError: naming the missing directory.
        ValueError: naming an empty split, or images and annotations without a partner.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: directory {root!r} does not exist")
    extensions = image_extensions()
    layout = f"expected {root}/images/{{train,val}}/* and {root}/annotations/{{train,val}}/*.png"
    pairs = {}
    for split, release_name in (("train", "training"), ("val", "validation")):
        # ADE20K's own release names its splits training/validation.
        release = not os.path.isdir(os.path.join(root, "images", split))
        name = release_name if release and os.path.isdir(os.path.join(root, "images", release_name)) else split
        image_dir, ann_dir = os.path.join(root, "images", name), os.path.join(root, "annotations", name)
        for folder in (image_dir, ann_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"data.root: {folder!r} does not exist ({layout})")
        images, annotations = _files_by_stem(image_dir, extensions), _files_by_stem(ann_dir, (".png",))
        if not images:
            raise ValueError(f"data.root: {image_dir!r} holds no image files")
        lone_images = sorted(set(images) - set(annotations))
        lone_annotations = sorted(set(annotations) - set(images))
        if lone_images or lone_annotations:
            raise ValueError(
                f"data.root: images and annotations of {split!r} do not pair up: {len(lone_images)} image(s) "
                f"without a PNG in {ann_dir!r} (e.g. {lone_images[:3]}), {len(lone_annotations)} annotation(s) "
                f"without an image in {image_dir!r} (e.g. {lone_annotations[:3]})"
            )
        pairs[split] = [(images[k], annotations[k]) for k in sorted(images)]
    return pairs


class SegmentationFolder(Dataset):
    """Image/annotation pairs from `check_segmentation_folder`, as (RGB image, class-index mask) tv_tensors.

    Args:
        pairs: (image path, annotation path) list.
        num_classes: classes after `reduce_zero_label`; any other value than these and `ignore_index` is an error.
        ignore_index: the mask value that marks unlabelled pixels.
        reduce_zero_label: map 0 to `ignore_index` and every other index k to k - 1.
        transform: applied to the (image, mask) pair.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        num_classes: int,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.pairs, self.num_classes, self.ignore_index = list(pairs), num_classes, ignore_index
        self.reduce_zero_label, self.transform = reduce_zero_label, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load_mask(self, path: str) -> np.ndarray:
        """The (H, W) int64 class indices of an annotation file, with `reduce_zero_label` applied."""
        try:
            with Image.open(path) as f:
                if f.mode not in ("L", "P", "I", "I;16"):
                    raise ValueError(f"annotation {path!r} has PIL mode {f.mode!r}; expected class indices (L, P or I)")
                mask = np.asarray(f).astype(np.int64)
        except _IMAGE_ERRORS as e:
            if str(e).startswith("annotation "):
                raise
            raise DataError(f"cannot read annotation {path!r}: {type(e).__name__}: {e}") from None
        if self.reduce_zero_label:
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
            mask[mask == self.ignore_index - 1] = self.ignore_index  # mmseg's rule: 255 stays ignored
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"annotation {path!r} holds class index {int(mask[bad].max())} >= data.num_classes "
                f"({self.num_classes}) that is not data.ignore_index ({self.ignore_index})"
            )
        return mask

    def __getitem__(self, i: int) -> Sample:
        image_path, ann_path = self.pairs[i]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb_image(image_path)))
        mask = tv_tensors.Mask(torch.from_numpy(self.load_mask(ann_path)))
        if mask.shape != image.shape[-2:]:
            raise ValueError(
                f"annotation {ann_path!r} is {tuple(mask.shape)} (H, W) but its image is {tuple(image.shape[-2:])}"
            )
        return self.transform((image, mask)) if self.transform else (image, mask)


class DigitsSegmentation(Dataset):
    """Canvases of scikit-learn's handwritten digits with per-pixel labels: 0 background, d + 1 for digit d.

    A canvas of `image_size // digit_scale` cells is a grid of 8x8-cell slots; 1 to `max_digits` digits,
    cropped to their ink, each take a slot of their own at a random offset in it, and the canvas is upscaled
    `digit_scale` times (bilinear for the image, nearest for the labels). A cell belongs to a digit where its
    ink is at least `ink_threshold`.
    The val canvases use only the digits held out by the same stratified split as `DigitsDataset`.

    Args:
        split: 'train' or 'val'.
        size: canvases in the split.
        image_size: canvas side in pixels.
        digit_scale: pixels per side of one 8x8-digit cell; 4 matches the stride of the finest feature map
            of a hierarchical backbone, so its predictions can follow the labels exactly.
        max_digits: digits per canvas are drawn from 1..max_digits (at most the number of slots).
        ink_threshold: ink share (0..1) from which a cell is labelled as its digit.
        val_fraction: share of the 1797 digits held out for val.
        split_seed: seed of the digit split and of the canvases.
        transform: applied to the (image, mask) pair.
    """

    classes = ["background", *(str(d) for d in range(10))]

    def __init__(
        self,
        split: str,
        size: int,
        image_size: int = 64,
        digit_scale: int = 4,
        max_digits: int = 4,
        ink_threshold: float = 0.25,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        transform: Callable[[Sample], Sample] | None = None,
    ):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        cells = image_size // digit_scale
        if image_size % digit_scale or cells < 8:
            raise ValueError(
                f"data.image_size ({image_size}) must be a multiple of data.digit_scale ({digit_scale}) "
                f"holding at least 8 cells, to fit one 8x8 digit"
            )
        digits = load_digits()
        ink = digits.images / 16.0  # (1797, 8, 8) in [0, 1]
        train_idx, val_idx = train_test_split(
            np.arange(len(ink)), test_size=val_fraction, random_state=split_seed, stratify=digits.target
        )
        keep = np.sort(train_idx if split == "train" else val_idx)
        # The canvas is a grid of 8 x 8-cell slots; each digit takes a slot of its own, at a random offset in it.
        slots = [(r, c) for r in range(0, cells - 7, 8) for c in range(0, cells - 7, 8)]
        if not 1 <= max_digits <= len(slots):
            raise ValueError(f"data.max_digits must lie in [1, {len(slots)}] for {image_size}-pixel canvases")
        rng = np.random.default_rng([split_seed, 0 if split == "train" else 1])
        self.images, self.masks = [], []
        for _ in range(size):
            canvas, labels = np.zeros((cells, cells)), np.zeros((cells, cells), dtype=np.uint8)
            count = int(rng.integers(1, max_digits + 1))
            for slot, index in zip(
                rng.choice(len(slots), count, replace=False), rng.choice(keep, count, replace=False), strict=True
            ):
                rows, cols = np.nonzero(ink[index] > 0)
                glyph = ink[index][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
                h, w = glyph.shape
                y = slots[slot][0] + int(rng.integers(0, 8 - h + 1))
                x = slots[slot][1] + int(rng.integers(0, 8 - w + 1))
                canvas[y : y + h, x : x + w] = glyph
                labels[y : y + h, x : x + w] = np.where(glyph >= ink_threshold, digits.target[index] + 1, 0)
            gray = Image.fromarray(np.round(canvas * 255).astype(np.uint8), mode="L")
            self.images.append(gray.resize((image_size, image_size), Image.BILINEAR).convert("RGB"))
            label_image = Image.fromarray(labels, mode="L").resize((image_size, image_size), Image.NEAREST)
            self.masks.append(np.asarray(label_image).astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        image = tv_tensors.Image(v2.functional.pil_to_tensor(self.images[i]))
        mask = tv_tensors.Mask(torch.from_numpy(self.masks[i]))
        return self.transform((image, mask)) if self.transform else (image, mask)


class _WithDummyTarget(Dataset):
    """Presents (image, mask) samples as `(sample, 0)` so `SeededAugmentation` transforms the pair together."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Sample, int]:
        return self.dataset[i], 0


def collate_segmentation(
    batch: Sequence[Sample | tuple[Sample, int]], ignore_index: int = 255
) -> dict[str, torch.Tensor]:
    """Stack (image, mask) samples, padding different sizes at the bottom and right.

    Returns:
        image: (B, 3, H, W) float, zero-padded; mask: (B, H', W') int64, padded with `ignore_index`;
        image_size and mask_size: (B, 2) int64, the unpadded (h, w) of each.
    """
    samples = [s[0] if isinstance(s[1], int) else s for s in batch]
    images, masks = [s[0] for s in samples], [s[1] for s in samples]

    def pad(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
        h = max(t.shape[-2] for t in tensors)
        w = max(t.shape[-1] for t in tensors)
        padded = [
            F.pad(t.as_subclass(torch.Tensor), (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value) for t in tensors
        ]
        return torch.stack(padded)

    return {
        "image": pad(images, 0.0),
        "mask": pad(masks, ignore_index).long(),
        "image_size": torch.tensor([t.shape[-2:] for t in images], dtype=torch.long),
        "mask_size": torch.tensor([t.shape[-2:] for t in masks], dtype=torch.long),
    }


class SegmentationData(SeededDataModule):
    """Train and val loaders for semantic segmentation.

    Training crops are `image_size` squares of images rescaled by a random factor in `scale` (short side
    relative to `image_size`), padded with `ignore_index` where the image is smaller, flipped with `hflip`.
    Validation resizes each image's short side to `image_size` (long side at most 4x that) and scores the
    prediction, resized back, against the annotation at its own resolution, as mmseg's whole-image test does.

    Args:
        root: `root/{images,annotations}/{train,val}/` tree; None for `DigitsSegmentation`.
        num_classes: classes of the annotations (after `reduce_zero_label`); required with `root`.
        classes: class names, stored with the exported weights; defaults to "0".."N-1".
        ignore_index: annotation value of unlabelled pixels; the loss and mIoU skip them.
        reduce_zero_label: treat 0 as unlabelled and shift 1..N to 0..N-1 (ADE20K's 150 classes).
        image_size: side of the training crops and short side of the val images.
        batch_size: crops per process and step.
        val_batch_size: images per val step; defaults to `batch_size`.
        num_workers: loader processes per training process.
        scale: range of the random rescale factor of training images.
        hflip: horizontal flip probability.
        color_jitter: jitter of training images: one strength for brightness, contrast and saturation, or
            (brightness, contrast, saturation, hue) as torchvision's ColorJitter takes them; None or 0 for none.
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        train_size: digits only: training canvases.
        val_size: digits only: val canvases.
        digit_scale: digits only: pixels per digit cell (see `DigitsSegmentation`).
        max_digits: digits only: most digits per canvas.
        ink_threshold: digits only: ink share from which a cell is labelled as its digit.
        val_fraction: digits only: share of the digits held out for the val canvases.
        split_seed: digits only: seed of the split and the canvases.
        pin_memory: pin host memory for faster copies to the GPU.
        persistent_workers: keep loader processes between epochs.
    """

    def __init__(
        self,
        root: str | None = None,
        num_classes: int | None = None,
        classes: list[str] | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        image_size: int = 512,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float | tuple[float, float, float, float] | None = None,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        train_size: int = 2000,
        val_size: int = 500,
        digit_scale: int = 4,
        max_digits: int = 4,
        ink_threshold: float = 0.25,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ):
        super().__init__(batch_size)
        if image_size < 32:
            raise ValueError(f"data.image_size must be >= 32 (the smallest input of the backbones), got {image_size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"data.scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
        # num_classes is left out: None for the digits, it would clash with the task's linked count.
        self.save_hyperparameters(ignore=["num_classes"])
        self.ignore_index = ignore_index
        # Checked now, before any model is built, so a wrong path or count stops the run at once.
        if root is None:
            if num_classes not in (None, len(DigitsSegmentation.classes)):
                raise ValueError(f"data.num_classes: the digits canvases have 11 classes, got {num_classes}")
            self.pairs = None
            self.classes = list(DigitsSegmentation.classes)
        else:
            if num_classes is None or num_classes < 1:
                raise ValueError(
                    f"data.num_classes: give the annotations' class count with data.root, got {num_classes}"
                )
            if 0 <= ignore_index < num_classes:
                raise ValueError(f"data.ignore_index ({ignore_index}) must not be a class index (< {num_classes})")
            self.pairs = check_segmentation_folder(root)
            self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
            if len(self.classes) != num_classes:
                raise ValueError(f"data.classes names {len(self.classes)} classes, data.num_classes is {num_classes}")
        self.num_classes = len(self.classes)

    def transform(self, training: bool) -> Callable[[Sample], Sample]:
        """The (image, mask) transform of the train or val split."""
        h = self.hparams
        to_float = [
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(mean=list(h.mean), std=list(h.std)),
        ]
        if not training:
            # Only the image: val scores against the annotation at its own resolution.
            resize = v2.Resize(h.image_size, max_size=4 * h.image_size, antialias=True)
            return _ImageOnly(v2.Compose([resize, *to_float]))
        low, high = (round(h.image_size * s) for s in h.scale)
        steps: list[Callable] = []
        if (low, high) != (h.image_size, h.image_size) or h.root is not None:
            steps.append(v2.RandomResize(low, high + 1, antialias=True))
        steps.append(
            v2.RandomCrop(h.image_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: h.ignore_index})
        )
        if h.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(h.hflip))
        if h.color_jitter:
            jitter = h.color_jitter if isinstance(h.color_jitter, Sequence) else (h.color_jitter,) * 3 + (0.0,)
            steps.append(v2.ColorJitter(*jitter))
        return v2.Compose([*steps, *to_float])

    def _dataset(self, split: str, transform: Callable | None) -> Dataset:
        h = self.hparams
        if self.pairs is None:
            return DigitsSegmentation(
                split,
                h.train_size if split == "train" else h.val_size,
                image_size=h.image_size,
                digit_scale=h.digit_scale,
                max_digits=h.max_digits,
                ink_threshold=h.ink_threshold,
                val_fraction=h.val_fraction,
                split_seed=h.split_seed,
                transform=transform,
            )
        return SegmentationFolder(self.pairs[split], self.num_classes, h.ignore_index, h.reduce_zero_label, transform)

    def train_set(self) -> Dataset:
        return SeededAugmentation(_WithDummyTarget(self._dataset("train", None)), self.transform(True), self.seed)

    def val_set(self) -> Dataset:
        return self._dataset("val", self.transform(False))

    def collate(self) -> Callable:
        return _Collate(self.hparams.ignore_index)

    def val_dataloader(self) -> DataLoader:
        return self.val_loader()


class _ImageOnly:
    """Applies a transform to the image of an (image, mask) pair; a class so loader workers can pickle it."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, sample: Sample) -> Sample:
        return self.transform(sample[0]), sample[1]


class _Collate:
    """`collate_segmentation` with a fixed `ignore_index`; a class so loader workers can pickle it."""

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index

    def __call__(self, batch: Sequence) -> dict[str, torch.Tensor]:
        return collate_segmentation(batch, self.ignore_index)
