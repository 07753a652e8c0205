"""Bad inputs into the block-sparse attention op and the backend switch (issue 20): each fails with one
ValueError naming the argument, or succeeds with the oracle's result."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo.kernels import block_sparse_attention
from zoo.kernels.block_sparse_attention.reference import block_sparse_attention_reference

from tests._subprocess import describe, run_python


def _qkv(b=1, h=2, lq=16, lk=16, d=8):
    return torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)


def test_a_misspelt_backend_is_reported_at_import():
    proc = run_python("import zoo.kernels", env={"ZOO_KERNELS": "bogus"}, timeout=120)
    assert proc.returncode == 1, describe(proc)
    assert "ZOO_KERNELS must be one of ('auto', 'reference'" in proc.stderr and "got 'bogus'" in proc.stderr
    proc = run_python("import zoo.kernels", env={"ZOO_KERNELS": " Gather "}, timeout=120)
    assert proc.returncode == 0, describe(proc)


def test_a_negative_level_is_named_as_such():
    q, k, v = _qkv()
    index = torch.zeros(1, 1, 2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"kv_level values must lie in \[0, num_levels = 1\) .* got range \[-1, -1\]"):
        block_sparse_attention(q, k, v, index, torch.full_like(index, -1), block_q=8, block_k=8)


@pytest.mark.parametrize("level", [4, 40, 2**40])
def test_levels_past_a_whole_block_are_that_level(level):
    # At block_k = 8 a group of 2**3 tokens is the whole block: level 40 is level 3 (it used to ask for 70 TB).
    q, k, v = _qkv(lk=20)
    index = torch.tensor([[[[0, 2, 1], [1, -1, 2]]]])
    levels = torch.tensor([[[[level, 0, 1], [2, 0, level]]]])
    bias = torch.randn(2, 8, 8)
    got = block_sparse_attention(q, k, v, index, levels, bias, block_q=8, block_k=8)
    want = block_sparse_attention_reference(q, k, v, index, levels.clamp(max=3), bias, 8, 8, 8**-0.5, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


_GOOD = dict(b=1, h=2, lq=20, lk=24, d=8, block_q=8, block_k=8)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    field=st.sampled_from(["block_q", "block_k", "num_levels", "index", "level", "dtype", "shape", "bias", "none"]),
    value=st.one_of(
        st.integers(-3, 2**41),
        st.sampled_from([0, -1, True, 2.5, float("nan"), "8", None]),
    ),
    data=st.data(),
)
def test_fuzz_block_sparse_attention_arguments(field, value, data):
    """One argument at a time gets a drawn value: the op raises a ValueError naming that argument, or (a value it
    can take) returns the oracle's result."""
    g = _GOOD
    q, k, v = _qkv(g["b"], g["h"], g["lq"], g["lk"], g["d"])
    mq, mk = 3, 3
    index = torch.randint(-1, mk, (1, g["h"], mq, 2))
    level = torch.randint(0, 3, index.shape)
    kwargs = dict(block_q=g["block_q"], block_k=g["block_k"])
    bias = None
    named = field
    if field in ("block_q", "block_k", "num_levels"):
        kwargs[field] = value
    elif field == "index" and isinstance(value, int) and not isinstance(value, bool):
        index[0, 0, data.draw(st.integers(0, mq - 1)), 0] = min(value, 2**62)
        named = "kv_index"
    elif field == "level" and isinstance(value, int) and not isinstance(value, bool):
        level[0, 1, data.draw(st.integers(0, mq - 1)), 1] = min(value, 2**62)
        named = "kv_level"
    elif field == "dtype":
        dtype = data.draw(st.sampled_from([torch.int64, torch.float64, torch.bool, torch.bfloat16]))
        target = data.draw(st.sampled_from(["q", "k", "v", "kv_index", "kv_level"]))
        q, k, v, index, level = (
            t.to(dtype) if name == target else t
            for name, t in zip(("q", "k", "v", "kv_index", "kv_level"), (q, k, v, index, level), strict=True)
        )
        named = target if target.startswith("kv") else "q, k, v"
    elif field == "shape":
        index = index[..., : data.draw(st.integers(0, 2))].repeat(1, 1, data.draw(st.integers(1, 2)), 1)
        named = "kv_index"
    elif field == "bias":
        bias = torch.randn(data.draw(st.integers(1, 3)), data.draw(st.integers(7, 8)), 8)
        named = "bias"
    try:
        out = block_sparse_attention(q, k, v, index, level, bias, **kwargs)
    except (ValueError, TypeError) as e:
        # A block size that changes the block count is reported through the table it no longer fits.
        names = {"block_q": ("block_q",), "block_k": ("block_k", "kv_index")}.get(named, (named,))
        assert any(n in str(e) for n in names), (field, value, str(e))
        return
    assert out.shape == (g["b"], g["h"], g["lq"], g["d"]) and torch.isfinite(out).all()
    block_q, block_k = kwargs["block_q"], kwargs["block_k"]
    top = (block_k - 1).bit_length()
    levels = level.long().clamp(max=top)
    want = block_sparse_attention_reference(
        q.float(), k.float(), v.float(), index, levels, bias, block_q, block_k, g["d"] ** -0.5, top + 1
    )
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
