"""Causal Pyramid Sparse Attention in a vision-language model's prefill, through transformers: one switch.

    from zoo.vlm import enable_psa, disable_psa
    enable_psa(model)                  # a Qwen2.5-VL model; PSAConfig.preset("qwen2.5-vl") by default
    model.generate(**inputs)           # prefill: causal PSA in every decoder layer; decode steps: dense
    disable_psa(model)                 # the attention implementation the model had, back

Supported: transformers' `Qwen2_5_VLForConditionalGeneration`, `Qwen2_5_VLModel` and `Qwen2_5_VLTextModel`
(install the `vlm` extra: `pip install zoo[vlm]`).

What runs where, as the official Qwen2.5-VL example of github.com/ziplab/Pyramid-Sparse-Attention does it:

- every self-attention of the language model's decoder takes PSA; the vision encoder stays dense;
- a prefill (queries over the whole sequence, no cached keys before them) runs causal PSA over the whole
  sequence, text and video tokens alike and in their order (no token reordering): `plan_levels(..., causal=True)`
  plans it (importance over past keys, the blocks above the diagonal skipped, the diagonal and the first key
  block full) and `pyramid_sparse_attention(..., causal=True)` computes it;
- the last `dense_tail` tokens (the official `text_length`, 512: the question after the video) attend densely;
- decode steps (one query), calls that extend a cache and padded batches (an explicit attention mask) run
  transformers' own SDPA attention, as does the model whenever PSA is off.

How. transformers lets a model's attention be any function registered in its `AttentionInterface` and chosen by
`config._attn_implementation`; `enable_psa` registers one, "zoo_psa" (the first call registers it, with SDPA's mask
builder under the same name in `AttentionMaskInterface`, so that the masks the model builds are SDPA's), and
switches the language model's config to it with `model.set_attn_implementation`. Nothing in transformers is
patched. Relied on beyond the documented interface (tests/zoo/test_vlm_psa.py checks it holds): the private
`config._attn_implementation` (read to remember the implementation in use), the attention modules' `layer_idx`,
`is_causal`, `sliding_window` and `num_key_value_groups`, and where the decoder layers sit (`language_model.layers`,
each with a `self_attn`).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AttentionInterface, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel, Qwen2_5_VLTextModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from zoo.blocks.pyramid_sparse import (
    PSAConfig,
    attention_density,
    causal_block_masks,
    plan_levels,
    pyramid_sparse_attention,
)

__all__ = ["ATTN_IMPLEMENTATION", "CausalPSAState", "disable_psa", "enable_psa", "psa_state", "supported_models"]

ATTN_IMPLEMENTATION = "zoo_psa"
# The official causal PSA's `text_length`: its last tokens (the question after the video) attend densely.
DENSE_TAIL = 512
_STATE_ATTR = "_zoo_psa_state"
_SUPPORTED = (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel, Qwen2_5_VLTextModel)


def supported_models() -> tuple[type, ...]:
    """The transformers classes `enable_psa` takes."""
    return _SUPPORTED


@dataclasses.dataclass
class CausalPSAState:
    """What the decoder layers of one model share while PSA is on.

    Attributes:
        config: the PSA config.
        dense_tail: the last tokens of a prefill that attend densely.
        previous: the language model's attention implementation before `enable_psa` ("sdpa", "eager", ...).
        densities: per decoder layer, the fraction of dense causal attention's arithmetic its last prefill cost
            (0-dim tensors; 1.0 for a prefill that ran dense, a padded batch say). Decode steps leave it.
        level_shares: per decoder layer, (5,) shares of the (query block, key block) pairs causal attention
            computes that its last PSA prefill kept full, pooled 2x, 4x, 8x and skipped.
        prefills: decoder-layer calls that ran PSA.
    """

    config: PSAConfig
    dense_tail: int = DENSE_TAIL
    previous: str = "sdpa"
    densities: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    level_shares: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    prefills: int = 0


def _dense(module, query, key, value, attention_mask, **kwargs):
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def psa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as "zoo_psa" (transformers' `AttentionInterface` signature).

    Args:
        module: the attention module calling it (its `_zoo_psa_state` is the model's `CausalPSAState`).
        query: (B, H, Lq, D); key, value: (B, Hkv, Lk, D) after the cache update.
        attention_mask: SDPA's mask (None when plain causal attention is meant), or a 4-D one.
        dropout, scaling: as transformers passes them.

    Returns:
        (B, Lq, H, Dv) and no attention weights.
    """
    state: CausalPSAState | None = getattr(module, _STATE_ATTR, None)
    length = query.shape[2]
    prefill = (
        state is not None
        and attention_mask is None
        and length > 1
        and key.shape[2] == length
        and getattr(module, "is_causal", True)
        and getattr(module, "sliding_window", None) is None
        and not (dropout and module.training)
    )
    if not prefill:
        if state is not None and length > 1:
            state.densities[getattr(module, "layer_idx", -1)] = query.new_ones((), dtype=torch.float32)
        return _dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: every query head reads its key/value head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    config = state.config
    tail_from = length - state.dense_tail if 0 < state.dense_tail else None
    levels = plan_levels(query, key, config, scale=scaling, causal=True, full_query_from=tail_from)
    out = pyramid_sparse_attention(query, key, value, levels, config.block_q, config.block_k, scaling, causal=True)
    visible, _ = causal_block_masks(length, length, config.block_q, config.block_k, query.device)
    layer = getattr(module, "layer_idx", -1)
    state.densities[layer] = attention_density(levels, visible)
    kept = levels[..., visible]
    counts = torch.stack([(kept == level).sum() for level in (1, 2, 4, 8, 0)]).float()
    state.level_shares[layer] = counts / counts.sum()
    state.prefills += 1
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    # Registered on first use, not at import: importing zoo changes no global state.
    if ATTN_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTN_IMPLEMENTATION, psa_attention_forward)
    if ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _check_model(model) -> None:
    if not isinstance(model, _SUPPORTED):
        names = ", ".join(c.__name__ for c in _SUPPORTED)
        raise ValueError(f"zoo.vlm.enable_psa expects one of {names}; got {type(model).__name__}")


def _language_model(model) -> Qwen2_5_VLTextModel:
    if isinstance(model, Qwen2_5_VLTextModel):
        return model
    inner = model.model if isinstance(model, Qwen2_5_VLForConditionalGeneration) else model
    return inner.language_model


def _set_text_attention(model, implementation: str) -> None:
    if isinstance(model, Qwen2_5_VLTextModel):
        model.set_attn_implementation(implementation)
    else:  # only the language model's: the vision encoder keeps its own
        model.set_attn_implementation({"text_config": implementation})


def enable_psa(model, config: PSAConfig | None = None, dense_tail: int = DENSE_TAIL) -> CausalPSAState:
    """Causal PSA in the prefill of every decoder layer of a Qwen2.5-VL model (see the module docstring).

    Args:
        model: a Qwen2.5-VL model (`supported_models()`).
        config: the PSA config; `PSAConfig.preset("qwen2.5-vl")` when None. Tokens keep their order
            (`reorder="none"`) and there is no denoising step to warm up on (`warmup_steps=0`). Calling again
            replaces the previous config.
        dense_tail: the last tokens of every prefill that attend densely (official: 512); 0 for none.

    Returns:
        The `CausalPSAState` the layers share (per-layer densities of the last prefill).
    """
    _check_model(model)
    config = PSAConfig.preset("qwen2.5-vl") if config is None else config
    if not isinstance(config, PSAConfig):
        raise ValueError(f"config must be a PSAConfig, got {type(config).__name__}")
    if config.reorder != "none":
        raise ValueError(
            f"causal PSA keeps the tokens in their order: reorder must be 'none', got {config.reorder!r} "
            "(PSAConfig.preset('qwen2.5-vl') has it)"
        )
    if config.warmup_steps:
        raise ValueError(
            f"warmup_steps counts denoising steps, which a language model's prefill does not have; got "
            f"{config.warmup_steps} (pass warmup_steps=0, as PSAConfig.preset('qwen2.5-vl') does)"
        )
    if isinstance(dense_tail, bool) or not isinstance(dense_tail, int) or dense_tail < 0:
        raise ValueError(f"dense_tail must be a non-negative int, got {dense_tail!r}")
    previous = getattr(model, _STATE_ATTR, None)
    language_model = _language_model(model)
    state = CausalPSAState(
        config=config,
        dense_tail=dense_tail,
        previous=previous.previous if previous is not None else language_model.config._attn_implementation,
    )
    _register()
    _set_text_attention(model, ATTN_IMPLEMENTATION)
    for layer in language_model.layers:
        setattr(layer.self_attn, _STATE_ATTR, state)
    setattr(model, _STATE_ATTR, state)
    return state


def disable_psa(model) -> None:
    """Give the language model back the attention implementation it had before `enable_psa` (no-op when off)."""
    _check_model(model)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return
    _set_text_attention(model, state.previous)
    for layer in _language_model(model).layers:
        if hasattr(layer.self_attn, _STATE_ATTR):
            delattr(layer.self_attn, _STATE_ATTR)
    delattr(model, _STATE_ATTR)


def psa_state(model) -> CausalPSAState | None:
    """The `CausalPSAState` of a model PSA is enabled on, else None."""
    return getattr(model, _STATE_ATTR, None)
