"""Pyramid Sparse Attention for diffusers' own video transformers, through their attention processors.

`enable_psa(transformer, config)` gives every self-attention of a `WanTransformer3DModel` or a
`CogVideoXTransformer3DModel` (the two families the PSA paper evaluates) a processor that computes the
same projections, norms and rotary embeddings as diffusers' own and replaces only the attention op with
`blocks.pyramid_sparse.PyramidSparseAttention`. Wan's cross-attention to the text keeps diffusers'
processor; CogVideoX's joint text+video attention goes sparse with the text key blocks kept full, as in
the official code. `disable_psa` puts the original processors back.

A forward pre-hook on the transformer tells the processors the latent token grid (T, H, W) and the
denoising step: the step advances whenever the timestep decreases and restarts when it rises (a new
generation), so the two calls a classifier-free-guidance step makes with one timestep count once. The
first `config.warmup_steps` steps run dense attention, as the paper does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from blocks.pyramid_sparse import PSAConfig, PyramidSparseAttention, apply_rotary_interleaved

__all__ = ["PSAState", "PSACogVideoXAttnProcessor", "PSAWanAttnProcessor", "disable_psa", "enable_psa", "psa_state"]

_STATE_ATTR = "_zoo_psa_state"


@dataclasses.dataclass
class PSAState:
    """What the processors of one transformer share: the attention, the grid and step of the current call.

    Attributes:
        psa: the pyramid sparse attention all layers call.
        grid: (T, H, W) latent token grid of the current forward.
        step: denoising step of the current forward (0-based; -1 before the first call).
        timestep: the timestep of the last forward.
        densities: per layer, the fraction of dense attention arithmetic of its last call (0-dim tensors).
    """

    psa: PyramidSparseAttention
    grid: tuple[int, int, int] | None = None
    step: int = -1
    timestep: float | None = None
    densities: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    _originals: dict[int, object] = dataclasses.field(default_factory=dict)
    _hook: object = None

    def reset(self) -> None:
        """Forget the step count: the next forward is step 0."""
        self.step, self.timestep = -1, None

    def observe(self, timestep: torch.Tensor) -> None:
        t = float(timestep.detach().float().max())
        if self.timestep is None or t > self.timestep:
            self.step = 0
        elif t < self.timestep:
            self.step += 1
        self.timestep = t

    @property
    def warming_up(self) -> bool:
        return 0 <= self.step < self.psa.config.warmup_steps

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int = 0) -> torch.Tensor:
        out = self.psa(q, k, v, grid=self.grid, num_text_tokens=text)
        self.densities[layer] = self.psa.last_density
        return out


class PSAWanAttnProcessor:
    """Self-attention of a `WanAttention` with pyramid sparse attention (diffusers' `WanAttnProcessor` otherwise).

    Args:
        state: the shared `PSAState`.
        layer: index of the block, for the density record.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: PSAState, layer: int):
        self.state, self.layer = state, layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.is_cross_attention:
            raise ValueError("PSAWanAttnProcessor serves self-attention only (attn1 of a Wan block)")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        # (B, L, heads, head_dim), diffusers' dispatch layout
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_rotary_interleaved(query, *rotary_emb), apply_rotary_interleaved(key, *rotary_emb)
        if attention_mask is not None or self.state.warming_up:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend,
            )  # fmt: skip
        else:
            out = self.state.attend(self.layer, *(x.transpose(1, 2) for x in (query, key, value))).transpose(1, 2)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class PSACogVideoXAttnProcessor:
    """Joint text+video self-attention of a CogVideoX block with pyramid sparse attention.

    Computes what diffusers' `CogVideoXAttnProcessor2_0` (or its fused variant) computes, with the attention
    op replaced; the text tokens' key blocks stay at full resolution.

    Args:
        state: the shared `PSAState`.
        layer: index of the block, for the density record.
    """

    def __init__(self, state: PSAState, layer: int):
        self.state, self.layer = state, layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b = x.shape[0]
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        query, key, value = (
            t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        if attention_mask is not None or self.state.warming_up:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, x.shape[1], b)
                attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            out = self.state.attend(self.layer, query, key, value, text=text_len)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text_len, out.size(1) - text_len], dim=1)
        return video_out, encoder_out


def _self_attentions(transformer) -> list:
    if isinstance(transformer, WanTransformer3DModel):
        return [block.attn1 for block in transformer.blocks]
    if isinstance(transformer, CogVideoXTransformer3DModel):
        return [block.attn1 for block in transformer.transformer_blocks]
    raise ValueError(
        "enable_psa expects a diffusers WanTransformer3DModel or CogVideoXTransformer3DModel, "
        f"got {type(transformer).__name__}"
    )


def _grid_hook(state: PSAState):
    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        cfg = module.config
        if isinstance(module, WanTransformer3DModel):
            _, _, f, h, w = hidden.shape
            pt, ph, pw = cfg.patch_size
            state.grid = (f // pt, h // ph, w // pw)
        else:
            _, f, _, h, w = hidden.shape
            p, pt = cfg.patch_size, cfg.patch_size_t
            state.grid = (f if pt is None else f // pt, h // p, w // p)
        if timestep is not None:
            state.observe(torch.as_tensor(timestep))

    return hook


def enable_psa(transformer, config: PSAConfig | None = None) -> PSAState:
    """Swap the self-attention of a diffusers video transformer for pyramid sparse attention.

    Args:
        transformer: a `WanTransformer3DModel` or `CogVideoXTransformer3DModel`.
        config: the PSA config (official defaults, 15 dense warm-up steps, when None). Calling again
            replaces the previous config.

    Returns:
        The `PSAState` the processors share (step, grid, per-layer densities; `reset()` for a new run).
    """
    if config is not None and not isinstance(config, PSAConfig):
        raise ValueError(f"config must be a PSAConfig, got {type(config).__name__}")
    attentions = _self_attentions(transformer)
    disable_psa(transformer)
    state = PSAState(psa=PyramidSparseAttention(config))
    processor_cls = PSAWanAttnProcessor if isinstance(transformer, WanTransformer3DModel) else PSACogVideoXAttnProcessor
    for layer, attn in enumerate(attentions):
        state._originals[layer] = attn.get_processor()
        attn.set_processor(processor_cls(state, layer))
    state._hook = transformer.register_forward_pre_hook(_grid_hook(state), with_kwargs=True)
    setattr(transformer, _STATE_ATTR, state)
    return state


def disable_psa(transformer) -> None:
    """Put back the processors `enable_psa` replaced (no-op when PSA is not enabled)."""
    attentions = _self_attentions(transformer)
    state = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return
    for layer, attn in enumerate(attentions):
        attn.set_processor(state._originals[layer])
    state._hook.remove()
    delattr(transformer, _STATE_ATTR)


def psa_state(transformer) -> PSAState | None:
    """The `PSAState` of a transformer PSA is enabled on, else None."""
    return getattr(transformer, _STATE_ATTR, None)
