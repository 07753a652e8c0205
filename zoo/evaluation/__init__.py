"""Judges of what the zoo's models generate, for users of the shipped checkpoints and for the project's tests.

`moving_digits`: the digit reader that judges clips of the moving-digits video DiT
(`checkpoints/zoo-video-dit-digits`): `train_frame_classifier` trains it on digits the video model never saw,
`generate_clips` samples every digit from a pipeline, `clip_metrics` gives the figures its card reports.

An evaluator lives here, in the package, because shipped artefacts and tests rely on it; `benchmarks/` holds
scripts that use it and nothing that anything else imports.
"""

from .moving_digits import DigitFrameClassifier, clip_metrics, generate_clips, train_frame_classifier

__all__ = ["DigitFrameClassifier", "clip_metrics", "generate_clips", "train_frame_classifier"]
