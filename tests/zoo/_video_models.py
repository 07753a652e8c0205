"""Tiny random-weight diffusers video transformers (no download) and one forward's inputs each, for the PSA tests
and benchmarks/video_psa_quality.py: Wan 2.1, Wan 2.2 TI2V-5B (per-token timesteps), CogVideoX 1.0 and 1.5,
HunyuanVideo, HunyuanVideo 1.5, LTX-Video, Mochi. Latents are smooth (blurred noise), as real latents are, so that
attention has the locality PSA relies on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed

# Every model below has a (4, 8, 8) latent token grid: 256 video tokens.
GRID = (4, 8, 8)


def _smooth(*shape: int, seed: int = 1) -> torch.Tensor:
    """(B, C, F, H, W) noise blurred to a smooth field."""
    g = torch.Generator().manual_seed(seed)
    b, c, f, h, w = shape
    coarse = torch.randn(b, c, max(2, f // 2), max(2, h // 4), max(2, w // 4), generator=g)
    return F.interpolate(coarse, size=(f, h, w), mode="trilinear", align_corners=True)


def _text(n: int, dim: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed))


def wan21():
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    inputs = dict(
        hidden_states=_smooth(1, 4, 4, 16, 16), timestep=torch.tensor([900.0]), encoder_hidden_states=_text(5, 16)
    )
    return model, inputs


def wan22_ti2v():
    # Wan 2.2 TI2V-5B's transformer: the same class, 48 latent channels and one timestep per token
    # (the pipeline's expand_timesteps); Wan 2.2 A14B's two experts are two Wan 2.1-style transformers.
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=48, out_channels=48,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    timestep = torch.full((1, 256), 900.0)
    timestep[:, :64] = 0.0  # the first latent frame is the conditioning image, already clean
    inputs = dict(hidden_states=_smooth(1, 48, 4, 16, 16), timestep=timestep, encoder_hidden_states=_text(5, 16))
    return model, inputs


def _cogvideox(patch_size_t, frames):
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, patch_bias=patch_size_t is None, max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    )  # fmt: skip
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), GRID[0])
    hidden = _smooth(1, 4, frames, 16, 16).transpose(1, 2)  # (B, F, C, H, W)
    inputs = dict(
        hidden_states=hidden, encoder_hidden_states=_text(8, 16), timestep=torch.tensor([900.0]), image_rotary_emb=rope
    )
    return model, inputs


def cogvideox():
    return _cogvideox(None, 4)


def cogvideox15():
    return _cogvideox(2, 8)  # CogVideoX 1.5: patches of 2 frames, no patch bias


def hunyuan_video():
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 4, 4),
    )  # fmt: skip
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])  # two padding text tokens
    inputs = dict(
        hidden_states=_smooth(1, 4, 4, 16, 16), timestep=torch.tensor([900.0]), encoder_hidden_states=_text(8, 16),
        encoder_attention_mask=mask, pooled_projections=_text(1, 8)[0], guidance=torch.tensor([6000.0]),
    )  # fmt: skip
    return model, inputs


def hunyuan_video15():
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 4, 4), task_type="t2v",
    )  # fmt: skip
    inputs = dict(
        hidden_states=_smooth(1, 4, 4, 16, 16), timestep=torch.tensor([900.0]), encoder_hidden_states=_text(6, 16),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]), encoder_hidden_states_2=_text(3, 8),
        encoder_attention_mask_2=torch.tensor([[1, 1, 0]]), image_embeds=torch.zeros(1, 2, 8),
    )  # fmt: skip
    return model, inputs


def ltx_video():
    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=16,
    )  # fmt: skip
    latents = _smooth(1, 4, *GRID).flatten(2).transpose(1, 2)  # the pipeline's packed (B, F*H*W, C) tokens
    inputs = dict(
        hidden_states=latents, encoder_hidden_states=_text(5, 16), timestep=torch.tensor([900.0]),
        encoder_attention_mask=torch.ones(1, 5), num_frames=GRID[0], height=GRID[1], width=GRID[2],
    )  # fmt: skip
    return model, inputs


def mochi():
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=8, max_sequence_length=8,
    )  # fmt: skip
    inputs = dict(
        hidden_states=_smooth(1, 4, 4, 16, 16), encoder_hidden_states=_text(8, 16), timestep=torch.tensor([900.0]),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]]),
    )  # fmt: skip
    return model, inputs


MODELS = {
    "wan2.1": wan21,
    "wan2.2-ti2v-5b": wan22_ti2v,
    "cogvideox": cogvideox,
    "cogvideox1.5": cogvideox15,
    "hunyuanvideo": hunyuan_video,
    "hunyuanvideo1.5": hunyuan_video15,
    "ltx-video": ltx_video,
    "mochi": mochi,
}


def build(name: str, seed: int = 0):
    """(model in eval mode, forward kwargs) of a tiny random model."""
    torch.manual_seed(seed)
    model, inputs = MODELS[name]()
    return model.eval(), inputs
