"""PSA in diffusers' own video transformers (tiny random-weight Wan and CogVideoX built from configs, no
download): full density reproduces dense attention, the default config's error is measured and bounded,
cross-attention stays dense, the warm-up steps run dense, and disable_psa restores the originals."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from zoo.blocks.pyramid_sparse import PSAConfig

from zoo.video import disable_psa, enable_psa, psa_state

SMALL = dict(block_q=32, block_k=16, tile_size=(2, 4, 4))


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=32,
    ).eval()
    # A smooth latent video (a blurred noise field) gives queries and keys the locality of real latents.
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(1, 4, 3, 7, 7, generator=g)
    latents = torch.nn.functional.interpolate(coarse, size=(4, 24, 24), mode="trilinear", align_corners=True)
    inputs = dict(hidden_states=latents, timestep=torch.tensor([900.0]), encoder_hidden_states=torch.randn(1, 5, 16))
    with torch.no_grad():
        dense = model(**inputs).sample
    return model, inputs, dense


def _run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes}).sample


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_wan_full_density_reproduces_dense(wan):
    model, inputs, dense = wan
    try:
        state = enable_psa(model, PSAConfig.full_density(**SMALL))
        torch.testing.assert_close(_run(model, inputs), dense, atol=2e-5, rtol=1e-5)
        assert state.grid == (4, 12, 12)
        assert sorted(state.densities) == [0, 1] and all(float(d) == 1.0 for d in state.densities.values())
    finally:
        disable_psa(model)


def test_wan_default_config_error_is_measured_and_bounded(wan):
    model, inputs, dense = wan
    try:
        state = enable_psa(model, PSAConfig(warmup_steps=0, **SMALL))
        error = _rel(_run(model, inputs), dense)
        density = sum(float(d) for d in state.densities.values()) / len(state.densities)
    finally:
        disable_psa(model)
    # measured: relative output error 0.028 at 14% of dense attention's arithmetic (576 tokens, 2 layers)
    assert 0.12 < density < 0.16
    assert 1e-4 < error < 0.05


def test_wan_cross_attention_stays_dense_and_disable_restores(wan):
    model, inputs, dense = wan
    originals = [block.attn1.processor for block in model.blocks]
    enable_psa(model, PSAConfig(warmup_steps=0, **SMALL))
    assert all(isinstance(block.attn2.processor, WanAttnProcessor) for block in model.blocks)
    assert all(not isinstance(block.attn1.processor, WanAttnProcessor) for block in model.blocks)
    disable_psa(model)
    assert [block.attn1.processor for block in model.blocks] == originals
    assert psa_state(model) is None and not model._forward_pre_hooks
    assert torch.equal(_run(model, inputs), dense)
    disable_psa(model)  # a second call is a no-op


def test_wan_fused_projections(wan):
    model, inputs, dense = wan
    model.fuse_qkv_projections()
    try:
        enable_psa(model, PSAConfig.full_density(**SMALL))
        torch.testing.assert_close(_run(model, inputs), dense, atol=2e-5, rtol=1e-5)
    finally:
        disable_psa(model)
        model.unfuse_qkv_projections()


def test_wan_warmup_steps_are_dense_and_cfg_calls_share_a_step(wan):
    model, inputs, dense = wan
    try:
        state = enable_psa(model, PSAConfig(warmup_steps=2, **SMALL))
        t = inputs["timestep"]
        assert torch.equal(_run(model, inputs), dense) and state.step == 0
        _run(model, inputs)  # the unconditional call of the same step
        assert state.step == 0
        _run(model, inputs, timestep=t - 100)
        assert state.step == 1 and state.warming_up
        _run(model, inputs, timestep=t - 200)
        assert state.step == 2 and not state.warming_up
        assert all(float(d) < 0.2 for d in state.densities.values())  # sparse from step 2 on
        assert torch.equal(_run(model, inputs), dense) and state.step == 0  # a new generation restarts the count
    finally:
        disable_psa(model)


def test_cogvideox_full_density_reproduces_dense_and_default_is_bounded():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=16,
        num_layers=2,
        sample_width=16,
        sample_height=16,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    ).eval()
    x, text = torch.randn(1, 3, 4, 16, 16), torch.randn(1, 8, 16)
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), 3)
    run = lambda: model(x, text, torch.tensor([900.0]), image_rotary_emb=rope).sample  # noqa: E731
    with torch.no_grad():
        dense = run()
        try:
            state = enable_psa(model, PSAConfig.full_density(block_q=16, block_k=8))
            torch.testing.assert_close(run(), dense, atol=2e-5, rtol=1e-5)
            assert state.grid == (3, 8, 8)
            enable_psa(model, PSAConfig(block_q=16, block_k=8, warmup_steps=0))
            error = _rel(run(), dense)
        finally:
            disable_psa(model)
        assert torch.equal(run(), dense)
    assert 1e-4 < error < 0.1  # measured: 0.02


def test_bad_arguments_raise_value_error(wan):
    model, _, _ = wan
    with pytest.raises(
        ValueError, match="enable_psa expects one of WanTransformer3DModel, CogVideoXTransformer3DModel"
    ):
        enable_psa(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="PSAConfig"):
        enable_psa(model, {"block_q": 32})
    assert psa_state(model) is None
