"""The moving-digits evaluator: a digit reader that never saw the digits the video model learned from.

A small CNN trained on frames of the *held-back* digits (the classification recipe's val split), rendered by
the data's own `render_clip` at random positions, labels every frame of generated clips; `clip_metrics` turns
its labels into the figures the shipped checkpoint's card and BENCHMARKS.md report (frame and clip accuracy,
label and shape consistency). The checkpoint's quality test, `benchmarks/video_dit_digits.py` and anyone
judging their own generations use it:

    from zoo.evaluation import clip_metrics, generate_clips, train_frame_classifier

    # The shipped checkpoint's clips: 16x16 frames, digits drawn 8x8 (its recipe's frame_size, digit_size).
    classifier, accuracy = train_frame_classifier(size=16, digit_size=8)  # ~98% on frames of unseen digits
    clips, labels, _, _ = generate_clips("checkpoints/zoo-video-dit-digits", per_class=1)
    clip_metrics(classifier, clips, labels)  # {"frame_accuracy": ..., "clip_accuracy": ..., ...}

The reader is trained from the digits that ship with scikit-learn each time it is needed (seeded, 600 steps by
default), so no evaluator weights are downloaded or shipped.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..training.video_data import digit_sprites, render_clip

__all__ = ["DigitFrameClassifier", "clip_metrics", "generate_clips", "train_frame_classifier"]


class DigitFrameClassifier(nn.Module):
    """A small CNN labelling single (1, S, S) frames in [-1, 1]; global max pooling makes it indifferent to
    where the digit sits. Written out because no library ships a digit evaluator, and the evaluator must
    share nothing with the models it judges."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def conv(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(
            conv(1, 32), conv(32, 32), nn.MaxPool2d(2), conv(32, 64), conv(64, 64), nn.MaxPool2d(2), conv(64, 128)
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, S, S) -> logits (N, num_classes)."""
        return self.head(self.features(x).amax(dim=(2, 3)))


def _frames(sprites: np.ndarray, labels: np.ndarray, n: int, size: int, rng: np.random.Generator):
    """n single frames of random sprites at random whole-pixel positions, lightly blurred or noised at random
    so that the evaluator does not hinge on perfectly crisp pixels."""
    k = rng.integers(len(sprites), size=n)
    span = size - sprites.shape[1]
    frames = np.stack([render_clip(sprites[i], tuple(rng.uniform(0, span, 2)), (0.0, 0.0), 1, size)[0] for i in k])
    x = torch.from_numpy(frames).unsqueeze(1)
    blur = torch.from_numpy(rng.random(n) < 0.3)
    if blur.any():
        smoothed = F.avg_pool2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x[blur] = 0.5 * x[blur] + 0.5 * smoothed
    x = x + 0.1 * torch.from_numpy(rng.random(n).astype(np.float32)).view(-1, 1, 1, 1) * torch.randn_like(x)
    return x.clamp(-1, 1), torch.from_numpy(labels[k])


def train_frame_classifier(
    size: int = 32, digit_size: int = 16, steps: int = 600, seed: int = 0
) -> tuple[DigitFrameClassifier, float]:
    """Train the evaluator on frames of the held-back digits only.

    Args:
        size: side of the frames to judge (the video's frame size).
        digit_size: side the digits are drawn at in those frames (the recipe's `digit_size`).
        steps: optimizer steps of 64 frames.
        seed: seed of the weights and of the frames drawn.

    Returns:
        (the classifier in eval mode, its accuracy on 2000 frames of the *train* digits: digits it never saw,
        the same ones the video model learned from).
    """
    if not 0 < digit_size <= size:
        raise ValueError(f"digit_size must be in [1, size={size}], got {digit_size}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sprites, labels = digit_sprites("held_back", digit_size)
    model = DigitFrameClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        x, y = _frames(sprites, labels, 64, size, rng)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test_sprites, test_labels = digit_sprites("train", digit_size)
    x, y = _frames(test_sprites, test_labels, 2000, size, np.random.default_rng(seed + 1))
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return model, accuracy


def _shift_correlation(a: torch.Tensor, b: torch.Tensor, max_shift: int = 3) -> torch.Tensor:
    """Best normalised correlation of frames a and b (N, S, S) over shifts of b by up to `max_shift` pixels."""
    best = torch.full((a.shape[0],), -1.0)
    a0 = a - a.mean(dim=(1, 2), keepdim=True)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            s = torch.roll(b, shifts=(dy, dx), dims=(1, 2))
            s0 = s - s.mean(dim=(1, 2), keepdim=True)
            num = (a0 * s0).sum(dim=(1, 2))
            den = (a0.square().sum(dim=(1, 2)) * s0.square().sum(dim=(1, 2))).sqrt().clamp_min(1e-8)
            best = torch.maximum(best, num / den)
    return best


@torch.no_grad()
def clip_metrics(classifier: nn.Module, clips: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Evaluator figures of clips.

    Args:
        classifier: frame classifier on (N, 1, S, S) in [-1, 1].
        clips: (B, T, S, S) in [-1, 1].
        labels: (B,) the requested digits.

    Returns:
        frame_accuracy, clip_accuracy (majority label over frames), label_consistency, shape_consistency.
    """
    if clips.dim() != 4 or clips.shape[-1] != clips.shape[-2]:
        raise ValueError(f"clips must be (B, T, S, S) frames in [-1, 1], got shape {tuple(clips.shape)}")
    if clips.shape[1] < 2:
        raise ValueError(f"clips need at least 2 frames for the consistency figures, got {clips.shape[1]}")
    if labels.shape != clips.shape[:1]:
        raise ValueError(f"labels must be ({clips.shape[0]},), one per clip, got shape {tuple(labels.shape)}")
    b, t = clips.shape[:2]
    pred = classifier(clips.reshape(b * t, 1, *clips.shape[2:])).argmax(1).view(b, t)
    majority = torch.mode(pred, dim=1).values
    corr = _shift_correlation(clips[:, :-1].reshape(-1, *clips.shape[2:]), clips[:, 1:].reshape(-1, *clips.shape[2:]))
    return {
        "frame_accuracy": float((pred == labels[:, None]).float().mean()),
        "clip_accuracy": float((majority == labels).float().mean()),
        "label_consistency": float((pred[:, 1:] == pred[:, :-1]).float().mean()),
        "shape_consistency": float(corr.mean()),
    }


def generate_clips(
    pipeline: str | os.PathLike | object,
    per_class: int,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, float, float | None]:
    """Sample `per_class` clips of each digit from a `VideoDiTPipeline` (or its saved folder), in the form
    `clip_metrics` reads, at the clip size the model was trained on (the pipeline's defaults) and the given steps
    and guidance (None: the pipeline's defaults).

    Returns:
        (clips (10 * per_class, T, S, S) in [-1, 1], labels (10 * per_class,) digit by digit, seconds per clip,
        mean PSA density of the last step, or None when the model has no PSA).
    """
    from ..video import VideoDiTPipeline, psa_state

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    pipe = pipeline if isinstance(pipeline, VideoDiTPipeline) else VideoDiTPipeline.from_pretrained(str(pipeline))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    out, start = [], time.perf_counter()
    for i in range(0, len(labels), batch):
        frames = pipe(
            labels[i : i + batch].tolist(),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
        ).frames  # (b, T, C, S, S) in [0, 1]
        out.append(frames[:, :, 0] * 2 - 1)
    seconds = (time.perf_counter() - start) / len(labels)
    state = psa_state(pipe.transformer)
    densities = [float(d) for d in state.densities.values()] if state is not None else []
    return torch.cat(out), labels, seconds, (sum(densities) / len(densities) if densities else None)
