"""A tiny random Qwen2.5-VL (transformers), built in code, and a video prompt for it: nothing is downloaded.

Shared by tests/zoo/test_vlm_psa.py and benchmarks/vlm_psa_quality.py. The video is a smooth synthetic clip (a
bright blob drifting over a gradient, with a little noise), cut into patches in the order Qwen2.5-VL's processor
uses, so that the vision encoder and the model's 3-D rotary positions (`get_rope_index`) run as on a real video.
"""

from __future__ import annotations

import torch

VIDEO_TOKEN, VISION_START, VISION_END = 251, 252, 253
PATCH, MERGE, TEMPORAL_PATCH = 4, 2, 2


def tiny_qwen2_5_vl(layers: int = 2, seed: int = 0):
    """Qwen2_5_VLForConditionalGeneration at random weights: hidden 64, 4 query and 2 key/value heads of 16
    channels (grouped-query attention as the real models), a 2-layer vision encoder on 4-pixel patches; eval mode."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32768, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL_PATCH, out_hidden_size=64, window_size=32, fullatt_block_indexes=[1],
        ),
        image_token_id=250, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def synthetic_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(frames, 3, height, width) in [0, 1]: a Gaussian blob drifting over a colour gradient, plus 2% noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    t = torch.linspace(0, 1, frames).view(frames, 1, 1)
    blob = torch.exp(-((x - 0.2 - 0.6 * t) ** 2 + (y - 0.5) ** 2) / 0.02)
    background = torch.stack([x.expand(1, height, width), y.expand(1, height, width), (x + y).expand(1, height, width)])
    clip = 0.4 * background.expand(3, frames, height, width).transpose(0, 1) + 0.6 * blob.unsqueeze(1)
    return (clip + 0.02 * torch.randn(clip.shape, generator=gen)).clamp(0, 1)


def video_prompt(
    frames: int = 8, height: int = 32, width: int = 32, text_before: int = 12, text_after: int = 20, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Model inputs for "<text> <vision_start> <video> <vision_end> <text>", batch 1.

    The clip's (frames, height, width) must be multiples of (2, 8, 8); it becomes frames / 2 * (height / 8) *
    (width / 8) video tokens.

    Returns:
        input_ids (1, L), pixel_values_videos (patches, 3 * 2 * 4 * 4), video_grid_thw (1, 3).
    """
    gt, gh, gw = frames // TEMPORAL_PATCH, height // PATCH, width // PATCH
    clip = synthetic_clip(frames, height, width, seed)
    # The processor's patch order: merge windows of 2 x 2 patches, each patch (channels, time, rows, columns).
    patches = clip.reshape(gt, TEMPORAL_PATCH, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * TEMPORAL_PATCH * PATCH * PATCH)
    gen = torch.Generator().manual_seed(seed)
    video = gt * gh * gw // MERGE**2
    ids = torch.cat(
        [
            torch.randint(3, 240, (text_before,), generator=gen),
            torch.tensor([VISION_START]),
            torch.full((video,), VIDEO_TOKEN),
            torch.tensor([VISION_END]),
            torch.randint(3, 240, (text_after,), generator=gen),
        ]
    )
    return {"input_ids": ids[None], "pixel_values_videos": patches, "video_grid_thw": torch.tensor([[gt, gh, gw]])}
