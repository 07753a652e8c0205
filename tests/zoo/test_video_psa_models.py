"""PSA on every diffusers video transformer the zoo supports, from tiny random configs (tests/zoo/_video_models.py,
no download): Wan 2.1, Wan 2.2 TI2V-5B and the two experts of Wan 2.2 A14B, CogVideoX 1.0 and 1.5, HunyuanVideo
1.0 and 1.5, LTX-Video, Mochi. Per model: full density equals dense attention to 1e-5, the default quotas' error
stays within a stated bound, cross-attention and text refiners keep their processors, disable_psa restores every
processor and hook. And the diffusers internals the integration relies on still exist."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from zoo.blocks.pyramid_sparse import PSAConfig

from zoo.video import PSAAttnProcessor, disable_psa, enable_psa, psa_state, supported_transformers

from ._video_models import GRID, MODELS, build

SMALL = dict(block_q=32, block_k=16)
# Relative output error of the default quotas (10% of key blocks full, 5% at 2x, 20% at 8x, the rest skipped;
# density 0.12 to 0.17 here) against dense attention, measured on these tiny models: 0.029 (HunyuanVideo) to
# 0.064 (Wan 2.2 TI2V-5B), Mochi 0.137. The bound is the one this integration promises for them.
DEFAULT_ERROR_BOUND = {"mochi": 0.2}
DEFAULT_ERROR_BOUND_OTHERS = 0.1


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _processors(model) -> dict[str, object]:
    return {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    model, inputs = build(request.param)
    return request.param, model, inputs, _run(model, inputs)


def test_full_density_equals_dense(case):
    name, model, inputs, dense = case
    try:
        state = enable_psa(model, PSAConfig.full_density(**SMALL))
        out = _run(model, inputs)
        assert state.grid == GRID and state.densities and all(float(d) == 1.0 for d in state.densities.values())
    finally:
        disable_psa(model)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_default_config_error_is_bounded(case):
    name, model, inputs, dense = case
    try:
        state = enable_psa(model, PSAConfig(warmup_steps=0, **SMALL))
        out = _run(model, inputs)
        density = sum(float(d) for d in state.densities.values()) / len(state.densities)
    finally:
        disable_psa(model)
    error = float((out - dense).norm() / dense.norm())
    assert 0.1 < density < 0.2, density
    assert 1e-3 < error < DEFAULT_ERROR_BOUND.get(name, DEFAULT_ERROR_BOUND_OTHERS), error


def test_only_video_self_attention_changes_and_disable_restores_everything(case):
    name, model, inputs, dense = case
    before = _processors(model)
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    enable_psa(model, PSAConfig(warmup_steps=0, **SMALL))
    during = _processors(model)
    changed = {k for k in before if during[k] is not before[k]}
    assert changed and all(isinstance(during[k], PSAAttnProcessor) for k in changed)
    assert all(during[k].original is before[k] for k in changed)
    # Cross-attention (attn2), text refiners and the text-only paths keep their processors.
    assert not any("attn2" in k or "refiner" in k or "context_embedder" in k for k in changed)
    assert len(model._forward_pre_hooks) == len(hooks[0]) + 1
    enable_psa(model, PSAConfig.full_density(**SMALL))  # again: replaces, does not stack
    assert all(_processors(model)[k].original is before[k] for k in changed)
    disable_psa(model)
    assert _processors(model) == before and psa_state(model) is None
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert torch.equal(_run(model, inputs), dense)


class _TwoExperts(DiffusionPipeline):
    """Stands in for Wan 2.2 A14B's pipeline: a high-noise and a low-noise expert (transformer, transformer_2)."""

    def __init__(self, transformer, transformer_2):
        super().__init__()
        self.register_modules(transformer=transformer, transformer_2=transformer_2)


def test_wan22_experts_share_one_state_and_step_count():
    high, inputs = build("wan2.1", seed=0)
    low, _ = build("wan2.1", seed=1)
    pipe = _TwoExperts(high, low)
    before = (_processors(high), _processors(low))
    state = enable_psa(pipe, PSAConfig(warmup_steps=2, **SMALL))
    assert psa_state(high) is psa_state(low) is state is psa_state(pipe)
    _run(high, {**inputs, "timestep": torch.tensor([900.0])})
    _run(high, {**inputs, "timestep": torch.tensor([800.0])})
    assert state.step == 1 and state.warming_up
    _run(low, {**inputs, "timestep": torch.tensor([700.0])})  # the second expert continues the count
    assert state.step == 2 and not state.warming_up and len(state.densities) == 2
    disable_psa(pipe)
    assert (_processors(high), _processors(low)) == before and psa_state(high) is None and psa_state(low) is None


def test_the_diffusers_internals_psa_relies_on_still_exist():
    # 1. The attention modules sit where zoo.video.psa looks for them, with a processor each.
    for name in MODELS:
        model, _ = build(name)
        assert type(model) in supported_transformers()
        assert sum(isinstance(p, PSAAttnProcessor) for p in _processors(model).values()) == 0
        enable_psa(model)
        assert sum(isinstance(p, PSAAttnProcessor) for p in _processors(model).values()) == 2, name
        disable_psa(model)
    # 2. diffusers' native attention backend computes with torch's scaled_dot_product_attention (what PSA replaces),
    #    and processors carry the private `_attention_backend` attribute set_attention_backend writes.
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += func is F.scaled_dot_product_attention
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 8, 2, 4)
    with Count():
        dispatch_attention_fn(q, q, q, backend=None)
    assert Count.calls == 1
    assert hasattr(WanAttnProcessor(), "_attention_backend")


def test_a_backend_that_bypasses_sdpa_is_refused():
    model, inputs = build("wan2.1")
    enable_psa(model, PSAConfig(warmup_steps=0, **SMALL))
    try:
        model.blocks[0].attn1.processor._attention_backend = "flash"
        with pytest.raises(RuntimeError, match="attention backend 'flash'"):
            _run(model, inputs)
    finally:
        model.blocks[0].attn1.processor._attention_backend = None
        disable_psa(model)
