"""PSAConfig.preset: the official repository's per-model settings by name."""

from __future__ import annotations

import pytest
from zoo.blocks.pyramid_sparse import PSA_PRESETS, PSAConfig


@pytest.mark.parametrize("name", sorted(PSA_PRESETS))
def test_every_preset_is_a_valid_config(name):
    config = PSAConfig.preset(name)
    assert config.to_dict() == PSAConfig(**PSA_PRESETS[name]).to_dict()
    assert PSAConfig.preset(name.upper()) == config


def test_presets_carry_the_official_values():
    # configs/attention_config.yaml of github.com/ziplab/Pyramid-Sparse-Attention, "psa_balanced" entries.
    wan = PSAConfig.preset("wan2.1-1.3b")
    assert (wan.block_q, wan.block_k, wan.assignment) == (128, 128, "threshold")
    assert wan.level_bounds == (0.5, 0.6, 0.7, 0.8) and wan.use_similarity and wan.warmup_steps == 15
    assert PSAConfig.preset("wan2.1-14b").level_bounds == (0.4, 0.5, 0.6, 0.8)
    a14b = PSAConfig.preset("wan2.2-a14b")
    assert (a14b.block_k, a14b.warmup_steps, a14b.level_bounds) == (32, 12, (0.5, 0.6, 0.6, 0.8))
    assert PSAConfig.preset("wan2.2-ti2v-5b").level_bounds == (0.6, 0.7, 0.7, 0.8)
    cog = PSAConfig.preset("cogvideox-5b")
    assert (cog.assignment, cog.reorder, cog.level_bounds) == ("quota", "none", (0.1, 0.15, 0.15, 0.35))
    assert PSAConfig.preset("cogvideox1.5-5b").reorder == "gilbert"
    assert PSAConfig.preset("qwen2.5-vl").level_bounds == (0.7, 0.8, 0.9, 0.9)


def test_overrides_and_unknown_names():
    assert PSAConfig.preset("wan2.1-14b", warmup_steps=0).warmup_steps == 0
    with pytest.raises(ValueError, match=r"unknown PSA preset 'wan3'; presets: cogvideox-5b, .*wan2.2-ti2v-5b"):
        PSAConfig.preset("wan3")
