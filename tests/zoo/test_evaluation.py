"""zoo.evaluation: the moving-digits reader's figures and its errors on bad input (its accuracy on the shipped
checkpoint is tests/train/test_video_dit.py's)."""

from __future__ import annotations

import pytest
import torch

from zoo.evaluation import DigitFrameClassifier, clip_metrics, generate_clips, train_frame_classifier
from zoo.training.video_data import MovingDigits


class _Constant(torch.nn.Module):
    """A frame reader that answers `label` for every frame."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.label), 10).float()


def _real_clips(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    data = MovingDigits("train", n, 8, 16, 8, 1.0, seed=3)
    return torch.stack([data[i][0][0] for i in range(n)]), torch.tensor([data[i][1] for i in range(n)])


def test_figures_of_real_clips_and_of_a_constant_reader():
    clips, labels = _real_clips()
    assert clips.shape == (6, 8, 16, 16) and clips.min() >= -1 and clips.max() <= 1
    metrics = clip_metrics(_Constant(int(labels[0])), clips, labels)
    share = float((labels == labels[0]).float().mean())
    assert metrics["frame_accuracy"] == pytest.approx(share) and metrics["clip_accuracy"] == pytest.approx(share)
    assert metrics["label_consistency"] == 1.0
    # A real clip is one rigid digit moving by at most a pixel a frame: consecutive frames match under a shift.
    assert metrics["shape_consistency"] > 0.99
    noise = torch.rand(6, 8, 16, 16) * 2 - 1
    assert clip_metrics(_Constant(0), noise, labels)["shape_consistency"] < 0.5


def test_the_reader_is_trained_on_held_back_digits_and_reports_accuracy_on_the_others():
    classifier, accuracy = train_frame_classifier(size=16, digit_size=8, steps=3)
    assert isinstance(classifier, DigitFrameClassifier) and not classifier.training
    assert 0.0 <= accuracy <= 1.0
    assert classifier(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize(
    "clips, labels, message",
    [
        (torch.zeros(2, 4, 16), torch.zeros(2, dtype=torch.long), r"clips must be \(B, T, S, S\)"),
        (torch.zeros(2, 4, 16, 8), torch.zeros(2, dtype=torch.long), r"clips must be \(B, T, S, S\)"),
        (torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), "at least 2 frames"),
        (torch.zeros(2, 4, 16, 16), torch.zeros(3, dtype=torch.long), r"labels must be \(2,\)"),
    ],
)
def test_clip_metrics_names_bad_input(clips, labels, message):
    with pytest.raises(ValueError, match=message):
        clip_metrics(_Constant(0), clips, labels)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="digit_size must be in"):
        train_frame_classifier(size=16, digit_size=32)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        train_frame_classifier(steps=0)
    with pytest.raises(ValueError, match="per_class must be at least 1"):
        generate_clips("checkpoints/zoo-video-dit-digits", per_class=0)
