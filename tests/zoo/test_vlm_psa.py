"""Causal PSA in transformers' Qwen2.5-VL (zoo.vlm): a tiny random model built in code, a synthetic video prompt.

Full density equals dense; the default "qwen2.5-vl" preset stays within a stated error of dense; enable/disable
switch the language model's attention implementation and back; generation runs PSA on the prefill only; what PSA
cannot take (decode steps, padded batches) runs transformers' SDPA; the transformers API it relies on exists.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, PreTrainedModel  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: E402
from zoo.blocks.pyramid_sparse import PSAConfig  # noqa: E402

import zoo  # noqa: E402
from zoo.vlm import ATTN_IMPLEMENTATION, CausalPSAState, disable_psa, enable_psa, psa_state  # noqa: E402

from ._vlm_models import tiny_qwen2_5_vl, video_prompt  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl(layers=LAYERS)


@pytest.fixture(scope="module")
def prompt():
    return video_prompt(frames=8, height=64, width=64)  # 256 video tokens, 290 in all


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_transformers_still_has_what_zoo_vlm_relies_on(model):
    # The documented extension points...
    assert callable(AttentionInterface.register) and callable(AttentionMaskInterface.register)
    assert "sdpa" in ALL_ATTENTION_FUNCTIONS and "sdpa" in ALL_MASK_ATTENTION_FUNCTIONS
    assert "attn_implementation" in inspect.signature(PreTrainedModel.set_attn_implementation).parameters
    # ... and what is private: the text attention picks its function by `config._attn_implementation`, and the
    # module attributes and layer path zoo.vlm reads.
    source = inspect.getsource(modeling_qwen2_5_vl.Qwen2_5_VLAttention.forward)
    assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in source and "self.config._attn_implementation" in source
    assert model.config.text_config._attn_implementation == "sdpa"
    attention = model.model.language_model.layers[0].self_attn
    assert isinstance(attention, modeling_qwen2_5_vl.Qwen2_5_VLAttention)
    assert attention.is_causal and attention.sliding_window is None and attention.layer_idx == 0
    assert attention.num_key_value_groups == 2


def test_full_density_equals_dense(model, prompt):
    dense = _logits(model, prompt)
    state = enable_psa(model, PSAConfig.full_density(block_q=32, block_k=32, reorder="none"), dense_tail=0)
    try:
        psa = _logits(model, prompt)
    finally:
        disable_psa(model)
    assert state.prefills == LAYERS  # every decoder layer ran PSA
    assert all(float(d) == 1.0 for d in state.densities.values())
    torch.testing.assert_close(psa, dense, atol=1e-5, rtol=1e-5)


def test_default_preset_error_is_bounded():
    # The default config (PSAConfig.preset("qwen2.5-vl"), the official dense tail of 512 tokens) on 2082 tokens:
    # it skips or pools part of the attention (measured density 0.952) and moves the logits by a relative 3.5e-3
    # (bound 2e-2); the next-token choice agrees almost everywhere (measured 1.0, bound 0.99).
    model = tiny_qwen2_5_vl(layers=LAYERS)
    inputs = video_prompt(frames=16, height=128, width=128)
    assert inputs["input_ids"].shape[1] == 2082
    dense = _logits(model, inputs)
    state = enable_psa(model)
    psa = _logits(model, inputs)
    density = sum(float(d) for d in state.densities.values()) / LAYERS
    assert 0.5 < density < 0.99
    shares = torch.stack(list(state.level_shares.values())).mean(0)  # full, 2x, 4x, 8x, skipped
    torch.testing.assert_close(shares.sum(), torch.tensor(1.0))
    assert shares[1:4].sum() > 0  # the smooth clip's keys are alike enough to pool some blocks
    assert float((psa - dense).norm() / dense.norm()) < 2e-2
    assert float((psa.argmax(-1) == dense.argmax(-1)).float().mean()) >= 0.99


def test_enable_and_disable_switch_the_text_attention_only(model, prompt):
    before = _logits(model, prompt)
    state = enable_psa(model, PSAConfig.preset("qwen2.5-vl", block_q=32, block_k=32))
    assert isinstance(state, CausalPSAState) and psa_state(model) is state
    assert model.config.text_config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"  # the vision encoder stays dense
    enable_psa(model, PSAConfig.full_density(block_q=32, block_k=32, reorder="none"))  # again: replaces the config
    assert psa_state(model).previous == "sdpa"
    disable_psa(model)
    assert model.config.text_config._attn_implementation == "sdpa" and psa_state(model) is None
    assert not any(hasattr(layer.self_attn, "_zoo_psa_state") for layer in model.model.language_model.layers)
    assert torch.equal(_logits(model, prompt), before)
    disable_psa(model)  # a no-op when off

    model.set_attn_implementation({"text_config": "eager"})
    try:
        enable_psa(model)
        disable_psa(model)
        assert model.config.text_config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def test_zoo_enable_psa_takes_a_transformers_model(model, prompt):
    state = zoo.enable_psa(model)
    assert isinstance(state, CausalPSAState) and zoo.video.psa_state(model) is state
    zoo.disable_psa(model)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_generate_runs_psa_on_the_prefill_and_decodes_densely(model, prompt):
    dense = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    state = enable_psa(model, PSAConfig.full_density(block_q=32, block_k=32, reorder="none"), dense_tail=0)
    try:
        same = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        assert state.prefills == LAYERS  # one prefill; the decode steps (one query each) ran dense
        assert torch.equal(same, dense)
        assert sorted(state.densities) == list(range(LAYERS))  # the prefill's, kept through the decode steps
        sparse = PSAConfig(
            block_q=32, block_k=32, assignment="quota", level_bounds=(0.2, 0.4, 0.6, 0.8), reorder="none",
            warmup_steps=0,
        )  # fmt: skip
        state = enable_psa(model, sparse, dense_tail=0)
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        assert out.shape == dense.shape and state.prefills == LAYERS
        assert all(float(d) < 1 for d in state.densities.values())  # the sparse prefill's, not the decode steps
    finally:
        disable_psa(model)


def test_padded_batches_run_dense(model, prompt):
    # An explicit padding mask is left to SDPA (PSA plans whole sequences).
    ids = prompt["input_ids"]
    batch = {**prompt, "input_ids": torch.cat([ids, ids]), "attention_mask": torch.ones(2, ids.shape[1], dtype=int)}
    batch["pixel_values_videos"] = torch.cat([prompt["pixel_values_videos"]] * 2)
    batch["video_grid_thw"] = torch.cat([prompt["video_grid_thw"]] * 2)
    batch["attention_mask"][1, :3] = 0
    dense = _logits(model, batch)
    state = enable_psa(model, PSAConfig.preset("qwen2.5-vl", block_q=32, block_k=32), dense_tail=0)
    try:
        psa = _logits(model, batch)
    finally:
        disable_psa(model)
    assert state.prefills == 0
    torch.testing.assert_close(psa, dense)


def test_gradients_flow_through_psa(model, prompt):
    sparse = PSAConfig(
        block_q=32, block_k=32, assignment="quota", level_bounds=(0.2, 0.4, 0.6, 0.8), reorder="none", warmup_steps=0
    )
    state = enable_psa(model, sparse, dense_tail=0)
    try:
        model(**prompt).logits[:, -1].logsumexp(-1).sum().backward()
        grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        disable_psa(model)
        model.zero_grad(set_to_none=True)
    assert state.prefills == LAYERS


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="reorder must be 'none'"):
        enable_psa(model, PSAConfig.preset("wan2.1-1.3b", warmup_steps=0))
    with pytest.raises(ValueError, match="warmup_steps counts denoising steps"):
        enable_psa(model, PSAConfig(reorder="none"))
    with pytest.raises(ValueError, match="dense_tail must be a non-negative int"):
        enable_psa(model, dense_tail=-1)
    with pytest.raises(ValueError, match="config must be a PSAConfig"):
        enable_psa(model, {"block_q": 64})
    with pytest.raises(ValueError, match="expects one of Qwen2_5_VLForConditionalGeneration"):
        zoo.vlm.enable_psa(torch.nn.Linear(2, 2))
    assert psa_state(model) is None  # nothing half-enabled
    assert model.config.text_config._attn_implementation == "sdpa"
