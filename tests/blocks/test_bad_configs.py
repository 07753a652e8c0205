"""Bad PSA configurations (issue 20): every field is checked for type and range when the config is made, so
a NaN threshold, a float tile size or `block_q=True` is named instead of being taken as something else."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo.blocks.pyramid_sparse import PSAConfig


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(block_q=True), TypeError, r"block_q must be an int, got True"),
        (dict(block_k=64.0), TypeError, r"block_k must be an int, got 64\.0"),
        (dict(tile_size=(2, 8.5, 8)), TypeError, r"tile_size must be an int, got 8\.5"),
        (dict(tile_size=(2.0, 8, 8)), TypeError, r"tile_size must be an int, got 2\.0"),
        (dict(similarity_thresholds=(math.nan, 0.6, 0.6)), ValueError, r"similarity_thresholds must be 3 cosine"),
        (dict(similarity_thresholds=(0.7, 0.6, 1.5)), ValueError, r"similarity_thresholds must be 3 cosine"),
        (dict(level_bounds=(0.1, math.nan, 0.2, 0.3)), ValueError, r"level_bounds must be 4 non-decreasing"),
        (dict(level_bounds="0.1"), TypeError, r"level_bounds must be a sequence"),
        (dict(level_bounds=(0.1, "0.2", 0.3, 0.4)), TypeError, r"level_bounds must hold numbers"),
        (dict(min_full_fraction=math.nan), ValueError, r"min_full_fraction must lie in \[0, 1\], got nan"),
        (dict(use_similarity="yes"), TypeError, r"use_similarity must be a bool"),
        (dict(warmup_steps=2.5), TypeError, r"warmup_steps must be an int, got 2\.5"),
        (dict(sample_stride=False), TypeError, r"sample_stride must be an int, got False"),
    ],
)
def test_bad_fields_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        PSAConfig(**kwargs)


_FIELDS = [f.name for f in dataclasses.fields(PSAConfig)]
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.one_of(st.integers(-2, 20), st.floats(allow_nan=True), st.booleans()), max_size=5),
    st.sampled_from(["quota", "threshold", "gilbert", "tiles", "none"]),
)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, min_size=1, max_size=3))
def test_fuzz_psa_config(changes):
    """hypothesis sets one to three fields to drawn values: a TypeError/ValueError naming a changed field, or a
    config whose every field has its declared kind and range."""
    try:
        cfg = PSAConfig(**changes)
    except (TypeError, ValueError) as e:
        assert any(name in str(e) for name in changes), (changes, str(e))
        return
    for name in ("block_q", "block_k", "sample_stride", "warmup_steps"):
        value = getattr(cfg, name)
        assert type(value) is int and value >= (0 if name == "warmup_steps" else 1), (name, value)
    assert cfg.block_k % 8 == 0
    assert type(cfg.use_similarity) is bool
    assert len(cfg.level_bounds) == 4 and all(0 <= b <= 1 for b in cfg.level_bounds)
    assert list(cfg.level_bounds) == sorted(cfg.level_bounds)
    assert len(cfg.similarity_thresholds) == 3 and all(-1 <= t <= 1 for t in cfg.similarity_thresholds)
    assert 0 <= cfg.min_full_fraction <= 1
    assert len(cfg.tile_size) == 3 and all(type(t) is int and t >= 1 for t in cfg.tile_size)
    assert PSAConfig(**cfg.to_dict()) == cfg
