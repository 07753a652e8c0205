"""The data module: the embedded digits split, ImageFolder checks, and reproducible training draws."""

from __future__ import annotations

import collections

import pytest
import torch
from PIL import Image

from zoo.training.data import (
    DigitsDataset,
    EpochSampler,
    ImageClassificationData,
    SeededAugmentation,
    check_image_folder,
)


def test_digits_split_is_fixed_stratified_and_upscaled():
    train, val = DigitsDataset("train", image_size=32), DigitsDataset("val", image_size=32)
    assert (len(train), len(val)) == (1437, 360)
    assert DigitsDataset("val", image_size=32).targets == val.targets
    assert min(collections.Counter(val.targets).values()) >= 35  # every digit held out, ~36 each
    image, target = val[0]
    assert image.size == (32, 32) and image.mode == "RGB" and 0 <= target <= 9


def test_train_draws_depend_on_seed_epoch_and_position_only():
    data = ImageClassificationData(image_size=32, scale=(0.5, 1.0), hflip=0.5)
    data.setup("fit")
    train = data.train_dataset
    a = train[(3, 17, 5)][0]
    torch.rand(7)  # the global random state moving on changes nothing
    assert torch.equal(train[(3, 17, 5)][0], a)
    assert not torch.equal(train[(3, 18, 5)][0], a)  # a repeat of the image at another position differs
    state = torch.get_rng_state()
    train[(0, 0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # loading leaves the training step's draws alone
    assert isinstance(train, SeededAugmentation)


def test_epoch_sampler_order_is_a_function_of_epoch_and_shards_disjointly():
    dataset = list(range(10))

    def order(epoch, rank):
        inner = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler = EpochSampler(inner, num_replicas=2, rank=rank)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0) and order(1, 0) != order(2, 0)
    keys = order(1, 0) + order(1, 1)
    assert sorted(k[2] for k in keys) == dataset and len({k[1] for k in keys}) == 10
    assert {k[0] for k in keys} == {1}


def _tree(root, layout):
    for rel in layout:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".txt":
            path.write_text("not an image")
        elif path.suffix:
            Image.new("RGB", (8, 8)).save(path, format=Image.registered_extensions()[path.suffix.lower()])


def test_image_folder_checks_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        check_image_folder(str(tmp_path / "nowhere"))
    _tree(tmp_path / "a", ["train/cat/0.png", "train/dog/0.gif"])
    with pytest.raises(FileNotFoundError, match="val"):
        check_image_folder(str(tmp_path / "a"))
    _tree(tmp_path / "b", ["train/cat/0.png", "train/dog/notes.txt", "val/cat/0.png", "val/dog/0.png"])
    with pytest.raises(ValueError, match="dog"):
        check_image_folder(str(tmp_path / "b"))
    _tree(tmp_path / "c", ["train/cat/0.png", "train/dog/0.png", "val/cat/0.png", "val/fox/0.png"])
    with pytest.raises(ValueError, match=r"only in train \['dog'\], only in val \['fox'\]"):
        check_image_folder(str(tmp_path / "c"))
    _tree(tmp_path / "d", ["train/cat/x/0.tiff", "train/dog/0.WEBP", "val/cat/0.bmp", "val/dog/0.jpeg"])
    assert check_image_folder(str(tmp_path / "d")) == ["cat", "dog"]
    assert ImageClassificationData(root=str(tmp_path / "d")).num_classes == 2
