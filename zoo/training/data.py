"""Data for image classification: scikit-learn's digits (ships with the package) or an ImageFolder tree.

`ImageClassificationData()` with no `root` trains on the 1797 8x8 digits of `sklearn.datasets.load_digits`,
split into train and val by a fixed stratified split and upscaled to `image_size`, so a recipe runs offline
in minutes. With `root=DIR` it reads `DIR/train/<class>/*` and `DIR/val/<class>/*` (torchvision's
ImageFolder layout, any image format PIL opens). Transforms are timm's `create_transform`.

Training draws are reproducible by construction: the sampler's order is a function of (seed, epoch) and
each image's augmentation a function of (seed, epoch, position in the epoch), whatever the number of
loader workers and wherever a run was resumed.

Bad data stops a run before training with a `DataError` (a `ValueError`) naming it: every image of an
ImageFolder tree is opened and checked when the data module is made (`verify_images`), an image that cannot be
decoded later names its file, and a training split with fewer images per process than one batch is refused
(only full batches are trained, so such a run would train nothing).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder

__all__ = [
    "DataError",
    "DigitsDataset",
    "EpochSampler",
    "ImageClassificationData",
    "SeededAugmentation",
    "SeededDataModule",
    "check_full_batches",
    "check_image_folder",
    "check_images",
    "image_extensions",
    "load_rgb_image",
]


class DataError(ValueError):
    """Data that cannot train: an unreadable image, a split smaller than one batch. The message names it."""


# What PIL raises for a file it cannot identify or decode (truncated, not an image, a decompression bomb).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb_image(path: str) -> Image.Image:
    """The image at path as RGB, decoded now; a file PIL cannot read raises a `DataError` naming it."""
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except _IMAGE_ERRORS as e:
        raise DataError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from None


def _image_problem(path: str) -> str | None:
    try:
        with Image.open(path) as f:
            f.verify()  # the header and, for formats that have them (PNG), the checksums; no decoding
    except _IMAGE_ERRORS as e:
        return f"{path!r} ({type(e).__name__}: {e})"
    return None


def check_images(paths: Sequence[str], workers: int = 8) -> None:
    """Open every image (header and checksums, not the pixels) and raise a `DataError` naming the unreadable ones."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = [p for p in pool.map(_image_problem, paths, chunksize=256) if p is not None]
    if problems:
        raise DataError(
            f"data.root: {len(problems)} of {len(paths)} image files cannot be read, e.g. {'; '.join(problems[:3])} "
            "(remove or replace them; data.verify_images=false skips this check)"
        )


def check_full_batches(
    per_process: int, batch_size: int, total: int, world_size: int = 1, what: str = "training split"
) -> None:
    """Raise a `DataError` unless each process's share of the split (per_process samples) fills one batch."""
    if per_process < batch_size:
        where = f" ({per_process} per process over {world_size})" if world_size > 1 else ""
        raise DataError(
            f"the {what} holds {total} samples{where}, fewer than data.batch_size = {batch_size}: only full "
            "batches are trained, so the run would train nothing; lower data.batch_size or add data"
        )


def image_extensions() -> tuple[str, ...]:
    """Lower-case file extensions of every format PIL can open here (`.jpg`, `.png`, `.webp`, ...)."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def _first_image(folder: str, extensions: tuple[str, ...]) -> str | None:
    for dirpath, _, files in os.walk(folder, followlinks=True):
        for name in files:
            if name.lower().endswith(extensions):
                return os.path.join(dirpath, name)
    return None


def check_image_folder(root: str) -> list[str]:
    """Check an ImageFolder tree `root/{train,val}/<class>/<images>` and return its sorted class names.

    Raises:
        FileNotFoundError: naming the missing directory.
        ValueError: naming an empty class folder, or the classes that train and val do not share.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: directory {root!r} does not exist")
    extensions = image_extensions()
    classes = {}
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(
                f"data.root: {split_dir!r} does not exist (expected {root}/train/<class>/* and {root}/val/<class>/*)"
            )
        names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
        if not names:
            raise ValueError(f"data.root: {split_dir!r} has no class folders")
        for name in names:
            if _first_image(os.path.join(split_dir, name), extensions) is None:
                raise ValueError(f"data.root: class folder {os.path.join(split_dir, name)!r} holds no image files")
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ValueError(
            f"data.root: train and val classes differ: only in train {only_train[:5]}, only in val {only_val[:5]}"
        )
    return classes["train"]


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as RGB PIL images of `image_size`, labels 0-9.

    Args:
        split: 'train' or 'val'; a stratified split fixed by `split_seed`.
        image_size: side of the square images the 8x8 digits are upscaled to (bilinear).
        val_fraction: share of the 1797 images held out for val.
        split_seed: seed of the split (not of training).
        transform: applied to each PIL image.
    """

    classes = [str(i) for i in range(10)]

    def __init__(
        self,
        split: str,
        image_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        transform: Callable | None = None,
    ):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), ink 0..16
        index = np.arange(len(pixels))
        train_idx, val_idx = train_test_split(
            index, test_size=val_fraction, random_state=split_seed, stratify=digits.target
        )
        keep = np.sort(train_idx if split == "train" else val_idx)
        # Upscaled once here: transforms then crop and resize images of the trained size.
        self.images = [
            Image.fromarray(pixels[i], mode="L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")
            for i in keep
        ]
        self.targets = [int(t) for t in digits.target[keep]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.targets[i]


class EpochSampler(DistributedSampler):
    """A process's share of an epoch, yielded as `(epoch, position, index)` keys for `SeededAugmentation`.

    Wraps a sampler with `set_epoch` (torch's `DistributedSampler`, timm's `RepeatAugSampler`) whose order
    depends on (seed, epoch) only. It is a `DistributedSampler` so that Lightning, which calls `set_epoch`
    before each epoch's first draw, leaves the sharding as it is.

    Args:
        inner: the sampler that picks and shards the indices.
        num_replicas: processes sharing the epoch.
        rank: this process.
    """

    def __init__(self, inner: Sampler, num_replicas: int, rank: int):
        # Not DistributedSampler.__init__: the inner sampler does the picking and sharding.
        self.inner, self.num_replicas, self.rank, self.epoch = inner, num_replicas, rank, 0
        self.dataset, self.shuffle = getattr(inner, "dataset", None), True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        # Positions are unique across processes, so repeated copies of an image are augmented differently.
        for k, index in enumerate(self.inner):
            yield self.epoch, self.rank + k * self.num_replicas, int(index)


class SeededAugmentation(Dataset):
    """Applies a random `transform` to `dataset[index]` under a random state fixed by (seed, epoch, position).

    Indexed by `EpochSampler` keys. The global `random`, NumPy and torch states are restored afterwards,
    so loading in the main process leaves the training step's random draws (mixup, drop path) alone.
    """

    def __init__(self, dataset: Dataset, transform: Callable, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        epoch, position, index = key
        image, target = self.dataset[index]
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        seeds = np.random.SeedSequence([self.seed, epoch, position]).generate_state(3)
        random.seed(int(seeds[0]))
        np.random.seed(int(seeds[1]))
        torch.manual_seed(int(seeds[2]))
        try:
            return self.transform(image), target
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class SeededDataModule(LightningDataModule):
    """The loaders every recipe's data module shares, seeded by the run's seed.

    The train loader shards `train_dataset` over the processes with `train_sampler` (torch's
    `DistributedSampler` by default, shuffled by (seed, epoch)) and keeps full batches only, refusing a split
    smaller than one batch per process. A `SeededAugmentation` training set is read through an `EpochSampler`,
    so that each sample's augmentation is a function of (seed, epoch, position). Its hyperparameters
    (`save_hyperparameters`) hold `batch_size` and, where the subclass has them, `val_batch_size`,
    `num_workers`, `pin_memory`, `persistent_workers`.

    A subclass passes its `batch_size` to this constructor (which checks it), builds its datasets in `train_set`
    (and `val_set`, for a validation loader it defines with `val_loader`); `collate` names a batch collation
    other than torch's default.
    """

    # What the error for a split smaller than one batch calls the training samples.
    train_split_name: ClassVar[str] = "training split"

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    @property
    def seed(self) -> int:
        """The run's seed (`seed_everything`, as the CLI sets it), else 0."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_set(self) -> Dataset:
        """The training dataset; every data module defines it (the base has no data of its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define train_set()")

    def val_set(self) -> Dataset | None:
        """The validation dataset; None for none."""
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = self.train_set()
        if self.val_dataset is None and stage in (None, "fit", "validate"):
            self.val_dataset = self.val_set()

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _lightning_shards(self) -> bool:
        connector = getattr(self.trainer, "_accelerator_connector", None)
        return bool(getattr(connector, "use_distributed_sampler", True))

    def train_sampler(self, world: int, rank: int) -> Sampler:
        """This process's share of the training set, in an order fixed by (seed, epoch)."""
        return DistributedSampler(self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)

    def loader_generator(self) -> torch.Generator | None:
        """The train loader's generator: it takes the worker base-seed draw off the global random state, which the
        training step's draws use, so when in the epoch the loader is started no longer matters."""
        return torch.Generator().manual_seed(self.seed)

    def collate(self) -> Callable | None:
        """The loaders' `collate_fn`; None for torch's default."""
        return None

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None, drop_last: bool = False, generator=None):
        h = self.hparams
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=h.get("num_workers", 0),
            pin_memory=h.get("pin_memory", False),
            persistent_workers=h.get("persistent_workers", False) and h.get("num_workers", 0) > 0,
            drop_last=drop_last,
            generator=generator,
            collate_fn=self.collate(),
        )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        world, rank = self._world()
        sampler = self.train_sampler(world, rank)
        # Full batches only: timm's batch-mode mixup needs an even batch, and BatchNorm a batch of more than one.
        check_full_batches(len(sampler), h.batch_size, len(self.train_dataset), world, what=self.train_split_name)
        if isinstance(self.train_dataset, SeededAugmentation):
            sampler = EpochSampler(sampler, world, rank)
        generator = self.loader_generator()
        return self._loader(self.train_dataset, h.batch_size, sampler, drop_last=True, generator=generator)

    def val_loader(self) -> DataLoader:
        """The validation loader, for a subclass's `val_dataloader`: `val_dataset` in order, sharded over the
        processes when Lightning does not shard it (it shards val only when it shards train)."""
        h = self.hparams
        sampler = None
        world, rank = self._world()
        if world > 1 and not self._lightning_shards():
            sampler = DistributedSampler(self.val_dataset, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(self.val_dataset, h.get("val_batch_size") or h.batch_size, sampler=sampler)


class ImageClassificationData(SeededDataModule):
    """Train and val loaders for single-label classification, with timm's transforms.

    Args:
        root: ImageFolder tree `root/train/<class>/*`, `root/val/<class>/*`; None for scikit-learn's digits.
        image_size: side of the square crops the model sees.
        batch_size: images per process and step (the global batch is this x devices x nodes).
        val_batch_size: images per val step; defaults to `batch_size`.
        num_workers: loader processes per training process.
        val_fraction: digits only: share held out for val.
        split_seed: digits only: seed of the train/val split.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: horizontal flip probability.
        color_jitter: brightness/contrast/saturation jitter; None or 0 for none (RandAugment replaces it).
        auto_augment: timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'.
        re_prob: random erasing probability.
        re_mode: random erasing fill ('pixel', 'rand', 'const').
        re_count: random erasing regions per image.
        interpolation: resize interpolation ('bicubic', 'bilinear', 'random').
        crop_pct: val center crop fraction (resize to image_size / crop_pct, then crop).
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        repeated_aug: repeats of each image per epoch across processes (timm's RepeatAugSampler, as DeiT);
            0 or 1 for none. It shards the data itself, so set `trainer.use_distributed_sampler: false` with it.
        pin_memory: pin host memory for faster copies to the GPU.
        persistent_workers: keep loader processes between epochs. Faster on large data sets, but the workers'
            random state then runs on from one epoch to the next, so a resumed run no longer repeats an
            uninterrupted one exactly.
        verify_images: ImageFolder only: open every image file when the data module is made (header and, for
            PNG, checksums; threads), so that a corrupt file stops the run at once, named, rather than when it is
            drawn. One header read per file (PNG files are read whole); false skips it.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: float = 0.5,
        color_jitter: float | None = 0.4,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        repeated_aug: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        verify_images: bool = True,
    ):
        super().__init__(batch_size)
        if image_size < 1:
            raise ValueError(f"data.image_size must be >= 1, got {image_size}")
        self.save_hyperparameters()
        # Checked now, before any model is built, so a wrong path stops the run at once.
        self.classes = DigitsDataset.classes if root is None else check_image_folder(root)
        if root is not None and verify_images:
            check_images([path for split in ("train", "val") for path, _ in self._dataset(split, None).samples])
        self.num_classes = len(self.classes)

    def transform(self, training: bool) -> Callable:
        """timm's train or eval transform for these settings."""
        h = self.hparams
        if training:
            jitter = h.color_jitter if h.color_jitter else None
            return create_transform(
                h.image_size,
                is_training=True,
                scale=tuple(h.scale),
                ratio=tuple(h.ratio),
                hflip=h.hflip,
                color_jitter=jitter,
                auto_augment=h.auto_augment,
                interpolation=h.interpolation,
                mean=tuple(h.mean),
                std=tuple(h.std),
                re_prob=h.re_prob,
                re_mode=h.re_mode,
                re_count=h.re_count,
            )
        return create_transform(
            h.image_size,
            is_training=False,
            interpolation="bicubic" if h.interpolation == "random" else h.interpolation,
            mean=tuple(h.mean),
            std=tuple(h.std),
            crop_pct=h.crop_pct,
        )

    def _dataset(self, split: str, transform: Callable | None) -> Dataset:
        h = self.hparams
        if h.root is None:
            return DigitsDataset(split, h.image_size, h.val_fraction, h.split_seed, transform=transform)
        extensions = image_extensions()
        return ImageFolder(
            os.path.join(h.root, split),
            transform=transform,
            loader=load_rgb_image,
            is_valid_file=lambda p: p.lower().endswith(extensions),
        )

    def train_set(self) -> Dataset:
        return SeededAugmentation(self._dataset("train", None), self.transform(True), self.seed)

    def val_set(self) -> Dataset:
        return self._dataset("val", self.transform(False))

    def train_sampler(self, world: int, rank: int) -> Sampler:
        if self.hparams.repeated_aug <= 1:
            return super().train_sampler(world, rank)
        if world > 1 and self._lightning_shards():
            raise ValueError("data.repeated_aug shards the data itself: set trainer.use_distributed_sampler: false")
        repeats = self.hparams.repeated_aug
        return RepeatAugSampler(self.train_dataset, num_replicas=world, rank=rank, num_repeats=repeats)

    def val_dataloader(self) -> DataLoader:
        return self.val_loader()
