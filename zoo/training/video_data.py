"""Moving digits: class-conditional video clips made from scikit-learn's digits (no download).

Each clip shows one handwritten digit (8x8 in scikit-learn, upscaled to a `digit_size` sprite) moving in
a straight line across a `size` x `size` black canvas and bouncing off the edges, one channel, values in
[-1, 1]. Clip `i` of a dataset is a pure function of (seed, i): which digit, where it starts and how fast
it moves, so a run reads the same clips whatever the loader workers or where it was resumed.

The digits come from the classification recipe's stratified split (`DigitsDataset`: `val_fraction`,
`split_seed`): training clips use the train digits only; the held-back digits are for an evaluator that
must not have seen the digits the generator learned from (`benchmarks/video_dit_digits.py`).

    data = MovingDigitsData(num_frames=16, frame_size=32, batch_size=16)
    data.setup("fit")
    clips, labels = next(iter(data.train_dataloader()))  # (16, 1, 16, 32, 32) in [-1, 1], (16,)
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .data import SeededDataModule

__all__ = ["MovingDigits", "MovingDigitsData", "digit_sprites", "render_clip"]


def digit_sprites(split: str, digit_size: int = 16, val_fraction: float = 0.2, split_seed: int = 0):
    """The digits of one split of the classification recipe, as float sprites in [0, 1].

    Args:
        split: "train" (the digits the generator learns from) or "held_back" (the classification recipe's
            val digits, for an independent evaluator).
        digit_size: side of the square sprite the 8x8 digit is upscaled to (bilinear, as `DigitsDataset`).
        val_fraction, split_seed: the stratified split, as `DigitsDataset`.

    Returns:
        (sprites (N, digit_size, digit_size) float32 in [0, 1], labels (N,) int64).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "held_back"):
        raise ValueError(f"split must be 'train' or 'held_back', got {split!r}")
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, val_idx = train_test_split(
        np.arange(len(pixels)), test_size=val_fraction, random_state=split_seed, stratify=digits.target
    )
    keep = np.sort(train_idx if split == "train" else val_idx)
    sprites = np.stack(
        [
            np.asarray(Image.fromarray(pixels[i], mode="L").resize((digit_size, digit_size), Image.BILINEAR))
            for i in keep
        ]
    )
    return sprites.astype(np.float32) / 255.0, digits.target[keep].astype(np.int64)


def _bounce(start: float, velocity: float, steps: np.ndarray, span: int) -> np.ndarray:
    """Positions of a point moving at `velocity` from `start`, reflected at 0 and `span` (a triangle wave)."""
    if span == 0:
        return np.zeros_like(steps, dtype=np.float64)
    p = np.mod(start + velocity * steps, 2 * span)
    return np.where(p > span, 2 * span - p, p)


def render_clip(
    sprite: np.ndarray, start: tuple[float, float], velocity: tuple[float, float], num_frames: int, size: int
) -> np.ndarray:
    """Draw a sprite moving and bouncing inside a black canvas.

    Args:
        sprite: (S, S) float in [0, 1].
        start: (y, x) top-left corner at frame 0, in [0, size - S].
        velocity: (vy, vx) pixels per frame.
        num_frames: frames T.
        size: canvas side.

    Returns:
        (T, size, size) float32 in [-1, 1]; positions are rounded to whole pixels.
    """
    s = sprite.shape[0]
    if s > size:
        raise ValueError(f"digit_size {s} must not exceed the canvas size {size}")
    steps = np.arange(num_frames, dtype=np.float64)
    ys = np.rint(_bounce(start[0], velocity[0], steps, size - s)).astype(int)
    xs = np.rint(_bounce(start[1], velocity[1], steps, size - s)).astype(int)
    clip = np.zeros((num_frames, size, size), dtype=np.float32)
    for f, (y, x) in enumerate(zip(ys, xs, strict=True)):
        clip[f, y : y + s, x : x + s] = sprite
    return clip * 2.0 - 1.0


class MovingDigits(Dataset):
    """`length` seeded clips of digits from one split moving and bouncing.

    Args:
        split: "train" or "held_back" (see `digit_sprites`).
        length: clips in the dataset (clip i is drawn from (seed, i)).
        num_frames: frames per clip.
        size: canvas side in pixels.
        digit_size: sprite side in pixels.
        max_speed: largest speed along each axis, pixels per frame; each axis draws a speed in
            [0.5, max_speed] and a direction.
        seed: seed of the draws.
        val_fraction, split_seed: the digit split, as the classification recipe's.

    Items are `(clip (1, T, size, size) float32 in [-1, 1], label int)`.
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 10000,
        num_frames: int = 16,
        size: int = 32,
        digit_size: int = 16,
        max_speed: float = 2.0,
        seed: int = 0,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ):
        if length < 1 or num_frames < 1:
            raise ValueError(f"length and num_frames must be >= 1, got {length} and {num_frames}")
        if not 0 < digit_size <= size:
            raise ValueError(f"digit_size must lie in (0, size={size}], got {digit_size}")
        if max_speed < 0.5:
            raise ValueError(f"max_speed must be >= 0.5 pixels per frame, got {max_speed}")
        self.sprites, self.labels = digit_sprites(split, digit_size, val_fraction, split_seed)
        self.length, self.num_frames, self.size, self.max_speed, self.seed = length, num_frames, size, max_speed, seed

    def __len__(self) -> int:
        return self.length

    def draw(self, i: int) -> tuple[int, tuple[float, float], tuple[float, float]]:
        """(sprite index, start (y, x), velocity (vy, vx)) of clip i."""
        rng = np.random.default_rng([self.seed, i])
        k = int(rng.integers(len(self.sprites)))
        span = self.size - self.sprites.shape[1]
        start = tuple(float(v) for v in rng.uniform(0, span, size=2))
        speed = rng.uniform(0.5, self.max_speed, size=2) * rng.choice([-1.0, 1.0], size=2)
        return k, start, (float(speed[0]), float(speed[1]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(f"clip {i} out of range [0, {self.length})")
        k, start, velocity = self.draw(i)
        clip = render_clip(self.sprites[k], start, velocity, self.num_frames, self.size)
        return torch.from_numpy(clip).unsqueeze(0), int(self.labels[k])


class MovingDigitsData(SeededDataModule):
    """Train loader of moving-digit clips (train digits only) for the video DiT.

    There is no validation loader: a generator is judged by sampling (the sample-GIF callback, the
    benchmark's classifier), not by a held-out loss.

    Args:
        num_frames: frames per clip.
        frame_size: canvas side in pixels.
        digit_size: digit sprite side in pixels.
        max_speed: largest speed per axis in pixels per frame.
        clips_per_epoch: clips in an epoch (each one a distinct seeded draw).
        batch_size: clips per process and step.
        num_workers: loader processes.
        val_fraction, split_seed: the digit split, as the classification recipe's.
    """

    num_classes = 10
    train_split_name = "epoch of clips"

    def __init__(
        self,
        num_frames: int = 16,
        frame_size: int = 32,
        digit_size: int = 16,
        max_speed: float = 2.0,
        clips_per_epoch: int = 10000,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ):
        super().__init__(batch_size)
        if not 0 < digit_size <= frame_size:
            raise ValueError(f"data.digit_size must lie in (0, data.frame_size={frame_size}], got {digit_size}")
        self.save_hyperparameters()

    def train_set(self) -> MovingDigits:
        h = self.hparams
        return MovingDigits(
            "train",
            h.clips_per_epoch,
            h.num_frames,
            h.frame_size,
            h.digit_size,
            h.max_speed,
            self.seed,
            h.val_fraction,
            h.split_seed,
        )

    def loader_generator(self) -> None:
        # The shipped checkpoint's run drew the loader's base seed from the global generator, as torch does
        # without one; kept so that the recipe repeats that run's draws.
        return None
