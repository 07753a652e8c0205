"""Pyramid Sparse Attention for video transformers, through diffusers' attention processors: one switch.

    enable_psa(transformer, PSAConfig.preset("wan2.1-1.3b"))   # a diffusers video transformer or the zoo's VideoDiT
    enable_psa(pipe)                                           # every video transformer of a pipeline (Wan 2.2's two)
    disable_psa(transformer)                                   # every processor and hook back as it was

Supported: diffusers' `WanTransformer3DModel` (Wan 2.1, both experts of Wan 2.2 A14B, Wan 2.2 TI2V-5B),
`CogVideoXTransformer3DModel` (1.0 and 1.5), `HunyuanVideoTransformer3DModel`, `HunyuanVideo15Transformer3DModel`,
`LTXVideoTransformer3DModel`, `MochiTransformer3DModel`, and the zoo's `VideoDiT`. A transformers vision-language
model (Qwen2.5-VL) is handed to `zoo.vlm` (causal PSA in its prefill; the `vlm` extra).

How it works. Each video self-attention module keeps diffusers' own processor, wrapped by a
`PSAAttnProcessor`: the wrapper runs the original processor (so projections, norms, rotary embeddings, the text
stream and output projections are exactly diffusers') under a `torch.overrides.TorchFunctionMode` that takes
the processor's one call of `torch.nn.functional.scaled_dot_product_attention` and computes it with
`zoo.blocks.pyramid_sparse.PyramidSparseAttention` instead. Text tokens that a joint attention appends (HunyuanVideo,
Mochi) or prepends (CogVideoX) keep full-resolution key blocks, as the official code keeps them; text padding
masks (HunyuanVideo) are honoured by attending over each sample's valid tokens; cross-attention modules are not
wrapped and stay dense. diffusers' attention-backend registry cannot take a new backend without patching it (its
names are a closed `Enum`), hence the function mode rather than a registered backend.

What this relies on in diffusers beyond its public classes (tests/zoo/test_video_psa_models.py checks it holds):
the attention modules' attribute names per model (listed in `_SELF_ATTENTION`; `MochiAttention` has a
`processor` attribute but no `get_processor`/`set_processor`), the processors' private `_attention_backend`
attribute (None or "native" means torch SDPA), and that diffusers' "native" backend and the CogVideoX/Mochi
processors compute attention with `torch.nn.functional.scaled_dot_product_attention`. A processor
whose attention never reaches SDPA (another backend) raises an error rather than running dense unnoticed.

The dense warm-up is decided in one place, `PSAState.dense_at(step)`: the first `config.warmup_steps` denoising
steps run the original processors untouched. The step comes from the `denoising_step` argument of `VideoDiT`
(the zoo's pipeline passes it) and, for diffusers' models, from a forward pre-hook that watches the timestep: the
step advances whenever the timestep decreases and restarts when it rises (a new generation), so the two calls of
a classifier-free-guidance step count once. A pipeline's transformers share one state, so Wan 2.2's second
expert continues the first one's count.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import torch
import torch.nn.functional as F
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    WanTransformer3DModel,
)
from torch.overrides import TorchFunctionMode

from zoo.blocks.pyramid_sparse import PSAConfig, PyramidSparseAttention

from .dit import VideoDiT

try:  # diffusers >= 0.36
    from diffusers import HunyuanVideo15Transformer3DModel
except ImportError:  # pragma: no cover - older diffusers
    HunyuanVideo15Transformer3DModel = None

__all__ = ["PSAAttnProcessor", "PSAState", "disable_psa", "enable_psa", "psa_state", "supported_transformers"]

_STATE_ATTR = "_zoo_psa_state"
_HOOK_ATTR = "_zoo_psa_hook"


def _wan(m):
    return [b.attn1 for b in m.blocks]


def _transformer_blocks(name):
    return lambda m: [getattr(b, name) for b in m.transformer_blocks]


def _hunyuan(m):
    return [b.attn for b in m.transformer_blocks] + [b.attn for b in m.single_transformer_blocks]


# class -> (its video self-attention modules, where a joint attention puts the text: None, "first" or "last")
_SELF_ATTENTION: dict[type, tuple] = {
    WanTransformer3DModel: (_wan, None),
    CogVideoXTransformer3DModel: (_transformer_blocks("attn1"), "first"),
    HunyuanVideoTransformer3DModel: (_hunyuan, "last"),
    LTXVideoTransformer3DModel: (_transformer_blocks("attn1"), None),
    MochiTransformer3DModel: (_transformer_blocks("attn1"), "last"),
    VideoDiT: (lambda m: [b.attn for b in m.blocks], None),
}
if HunyuanVideo15Transformer3DModel is not None:
    _SELF_ATTENTION[HunyuanVideo15Transformer3DModel] = (_transformer_blocks("attn"), "last")


def supported_transformers() -> tuple[type, ...]:
    """The transformer classes `enable_psa` takes."""
    return tuple(_SELF_ATTENTION)


def _latent_grid(model, bound: inspect.BoundArguments) -> tuple[int, int, int]:
    """(T, H, W) token grid of a forward call of a supported diffusers transformer."""
    cfg, args = model.config, bound.arguments
    if isinstance(model, LTXVideoTransformer3DModel):  # packed tokens; the latent size comes as arguments
        f, h, w = (args.get(n) for n in ("num_frames", "height", "width"))
        if None in (f, h, w):
            raise ValueError("PSA on LTX-Video needs num_frames, height and width passed to the transformer")
        return f // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size
    hidden = args["hidden_states"]
    if isinstance(model, CogVideoXTransformer3DModel):  # (B, F, C, H, W)
        _, f, _, h, w = hidden.shape
        pt = cfg.patch_size_t or 1
        return f // pt, h // cfg.patch_size, w // cfg.patch_size
    _, _, f, h, w = hidden.shape  # (B, C, F, H, W)
    if isinstance(model, WanTransformer3DModel):
        pt, ph, pw = cfg.patch_size
    elif isinstance(model, MochiTransformer3DModel):
        pt, ph, pw = 1, cfg.patch_size, cfg.patch_size
    else:  # HunyuanVideo 1.0 / 1.5
        pt, ph, pw = cfg.patch_size_t, cfg.patch_size, cfg.patch_size
    return f // pt, h // ph, w // pw


@dataclasses.dataclass
class PSAState:
    """What the processors of one transformer (or one pipeline's transformers) share.

    Attributes:
        psa: the pyramid sparse attention all layers call.
        grid: (T, H, W) latent token grid of the current forward (diffusers' models).
        step: denoising step of the current forward (0-based; -1 when unknown, e.g. in training).
        timestep: the timestep of the last forward.
        densities: per layer, the fraction of dense attention arithmetic of its last call (0-dim tensors).
    """

    psa: PyramidSparseAttention
    grid: tuple[int, int, int] | None = None
    step: int = -1
    timestep: float | None = None
    densities: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def config(self) -> PSAConfig:
        return self.psa.config

    def reset(self) -> None:
        """Forget the step count: the next forward is step 0."""
        self.step, self.timestep = -1, None

    def observe(self, timestep: torch.Tensor) -> None:
        """Advance the step count from a forward's timestep (see the module docstring)."""
        t = float(torch.as_tensor(timestep).detach().float().max())
        if self.timestep is None or t > self.timestep:
            self.step = 0
        elif t < self.timestep:
            self.step += 1
        self.timestep = t

    def dense_at(self, step: int | None) -> bool:
        """Whether denoising step `step` runs dense attention (the warm-up); unknown steps (None, -1) do not."""
        return step is not None and 0 <= step < self.config.warmup_steps

    @property
    def warming_up(self) -> bool:
        return self.dense_at(self.step)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _AttentionToPSA(TorchFunctionMode):
    """Computes the `scaled_dot_product_attention` calls of one processor call with PSA (see the module docstring)."""

    def __init__(
        self, state: PSAState, layer: int, grid: tuple[int, int, int], text: str | None, presorted: bool = False
    ):
        super().__init__()
        self.state, self.layer, self.grid, self.text = state, layer, grid, text
        self.presorted = presorted  # the tokens come in PSA's block order already: no reorder
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        a = {**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        video = math.prod(self.grid)
        plain = (
            q.dim() == 4
            and q.shape[1:3] == k.shape[1:3] == v.shape[1:3]
            and q.shape[2] >= video
            and not a.get("is_causal")
            and not a.get("dropout_p")
            and (self.text is not None or q.shape[2] == video)
        )
        if not plain or (mask is not None and mask.dtype != torch.bool):
            return func(*args, **kwargs)  # not a video self-attention PSA can compute: leave it dense
        if mask is None:
            return self._psa(q, k, v, a.get("scale"))
        return self._psa_padded(q, k, v, mask, a.get("scale"))

    def _psa(self, q, k, v, scale):
        video, length = math.prod(self.grid), q.shape[2]
        text = length - video
        if self.text == "last" and text:  # PSA takes the text first
            q, k, v = (torch.cat([x[:, :, video:], x[:, :, :video]], dim=2) for x in (q, k, v))
        grid = None if self.presorted else self.grid
        out = self.state.psa(q, k, v, grid=grid, num_text_tokens=text, scale=scale)
        self.state.densities[self.layer] = self.state.psa.last_density
        if self.text == "last" and text:
            out = torch.cat([out[:, :, text:], out[:, :, :text]], dim=2)
        return out

    def _psa_padded(self, q, k, v, mask, scale):
        # A padding mask (HunyuanVideo's text): each sample attends over its valid tokens; the rows of padding
        # queries, which no valid token reads, are computed densely as the original would.
        b, _, length, _ = q.shape
        m = mask.expand(b, -1, length, length) if mask.dim() == 4 else None
        if m is None or m.shape[1] != 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        m = m[:, 0]
        keys = m.any(dim=1)  # (B, L) keys some query may read
        out = torch.empty_like(q[..., :1].expand(*q.shape[:3], v.shape[-1]))
        video = math.prod(self.grid)
        for i in range(b):
            valid = keys[i]
            rows = m[i].any(dim=1)
            if not valid[:video].all() or not (m[i][rows] == valid).all():
                out[i : i + 1] = F.scaled_dot_product_attention(
                    q[i : i + 1], k[i : i + 1], v[i : i + 1], attn_mask=mask[i : i + 1], scale=scale
                )
                continue
            keep = valid.nonzero().squeeze(1)
            out[i : i + 1, :, keep] = self._psa(*(x[i : i + 1].index_select(2, keep) for x in (q, k, v)), scale)
            rest = (~valid).nonzero().squeeze(1)
            if rest.numel():
                out[i : i + 1, :, rest] = F.scaled_dot_product_attention(
                    q[i : i + 1].index_select(2, rest),
                    k[i : i + 1],
                    v[i : i + 1],
                    attn_mask=mask[i : i + 1].expand(1, 1, length, length)[:, :, rest],
                    scale=scale,
                )
        return out


class PSAAttnProcessor:
    """A video self-attention's own processor with its attention op computed by pyramid sparse attention.

    Args:
        original: the processor it wraps (diffusers', or `VideoDiTAttnProcessor`); `disable_psa` puts it back.
        state: the shared `PSAState`.
        layer: index of the attention among the model's video self-attentions (the density record).
        text: where a joint attention puts its text tokens: None, "first" or "last".
    """

    def __init__(self, original, state: PSAState, layer: int, text: str | None = None):
        self.original, self.state, self.layer, self.text = original, state, layer, text

    # diffusers' `set_attention_backend` writes these on a module's processor; they belong to the wrapped one.
    @property
    def _attention_backend(self):
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self.original._attention_backend = backend

    @property
    def _parallel_config(self):
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self.original._parallel_config = config

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs):
        # The zoo's VideoDiT puts its tokens in PSA's block order once per forward and says so (`presorted`); the
        # wrapped processor does not take that argument.
        presorted = kwargs.pop("presorted", False)
        if "denoising_step" in kwargs:  # the zoo's VideoDiT: (B, T, H, W, C) and the step as an argument
            grid, step = tuple(hidden_states.shape[1:4]), kwargs["denoising_step"]
        else:
            grid, step = self.state.grid, self.state.step
        if self.state.dense_at(step):
            return self.original(attn, hidden_states, *args, **kwargs)
        if grid is None:
            raise RuntimeError("PSA does not know the token grid: call the transformer, not its attention alone")
        backend = self._attention_backend
        if backend is not None and str(getattr(backend, "value", backend)) != "native":
            raise RuntimeError(
                f"PSA replaces torch's scaled_dot_product_attention, which the attention backend {backend!r} does not "
                "call; use the default backend (model.reset_attention_backend()) with PSA"
            )
        mode = _AttentionToPSA(self.state, self.layer, grid, self.text, presorted)
        with mode:
            out = self.original(attn, hidden_states, *args, **kwargs)
        if not mode.calls:
            raise RuntimeError(
                f"{type(self.original).__name__} computed its attention without torch's scaled_dot_product_attention, "
                "so PSA could not replace it"
            )
        return out


@functools.cache
def _processor_class(original: type) -> type:
    """A `PSAAttnProcessor` subclass whose `__call__` shows the signature of `original.__call__`: diffusers' legacy
    `Attention` passes a processor only the keyword arguments its signature names (`image_rotary_emb`, ...)."""

    def __call__(self, *args, **kwargs):
        return PSAAttnProcessor.__call__(self, *args, **kwargs)

    __call__.__signature__ = inspect.signature(original.__call__)
    return type(f"PSA{original.__name__}", (PSAAttnProcessor,), {"__call__": __call__, "__module__": __name__})


class _StepHook:
    """Forward pre-hook of a diffusers transformer: the token grid and the denoising step of the call."""

    def __init__(self, state: PSAState, signature: inspect.Signature):
        self.state, self.signature = state, signature

    def __call__(self, module, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs)
        self.state.grid = _latent_grid(module, bound)
        timestep = bound.arguments.get("timestep")
        if timestep is not None:
            self.state.observe(timestep)


def _get_processor(attn):
    # diffusers' MochiAttention holds a `processor` without the get/set methods of the other attention classes.
    return attn.get_processor() if hasattr(attn, "get_processor") else attn.processor


def _set_processor(attn, processor) -> None:
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:
        attn.processor = processor


def _spec(model) -> tuple | None:
    for cls, spec in _SELF_ATTENTION.items():
        if isinstance(model, cls):
            return spec
    return None


def _transformers(target) -> list:
    if _spec(target) is not None:
        return [target]
    components = getattr(target, "components", None)
    found = [c for c in components.values() if _spec(c) is not None] if isinstance(components, dict) else []
    if not found:
        names = ", ".join(c.__name__ for c in _SELF_ATTENTION)
        raise ValueError(f"enable_psa expects one of {names}, or a pipeline holding one; got {type(target).__name__}")
    return found


def _vlm(target):
    """zoo.vlm's PSA module for a transformers model (imported only then: transformers is an optional extra)."""
    if not type(target).__module__.startswith("transformers."):
        return None
    from ..vlm import psa

    return psa


def enable_psa(target, config: PSAConfig | None = None) -> PSAState:
    """Swap the video self-attention of a transformer (or of every video transformer of a pipeline) for PSA.

    Args:
        target: a supported transformer (`supported_transformers()`), or a diffusers pipeline holding some;
            a transformers Qwen2.5-VL model goes to `zoo.vlm.enable_psa` (returning its `CausalPSAState`).
        config: the PSA config (official defaults, 15 dense warm-up steps, when None); e.g.
            `PSAConfig.preset("wan2.1-1.3b")`. Calling again replaces the previous config.

    Returns:
        The `PSAState` the processors share (step, grid, per-layer densities; `reset()` for a new run).
    """
    if (vlm := _vlm(target)) is not None:
        return vlm.enable_psa(target, config)
    if config is not None and not isinstance(config, PSAConfig):
        raise ValueError(f"config must be a PSAConfig, got {type(config).__name__}")
    models = _transformers(target)
    for model in models:
        disable_psa(model)
    state = PSAState(psa=PyramidSparseAttention(config))
    for model in models:
        modules, text = _spec(model)
        for layer, attn in enumerate(modules(model)):
            original = _get_processor(attn)
            _set_processor(attn, _processor_class(type(original))(original, state, layer, text))
        if isinstance(model, VideoDiT):
            model.register_to_config(attention="psa", psa_config=state.config.to_dict())
        else:
            hook = _StepHook(state, inspect.signature(model.forward))
            setattr(model, _HOOK_ATTR, model.register_forward_pre_hook(hook, with_kwargs=True))
        setattr(model, _STATE_ATTR, state)
    return state


def disable_psa(target) -> None:
    """Put back every processor and remove every hook `enable_psa` added (no-op when PSA is not enabled)."""
    if (vlm := _vlm(target)) is not None:
        return vlm.disable_psa(target)
    for model in _transformers(target):
        modules, _ = _spec(model)
        for attn in modules(model):
            processor = _get_processor(attn)
            while isinstance(processor, PSAAttnProcessor):
                processor = processor.original
            _set_processor(attn, processor)
        hook = getattr(model, _HOOK_ATTR, None)
        if hook is not None:
            hook.remove()
            delattr(model, _HOOK_ATTR)
        if getattr(model, _STATE_ATTR, None) is not None:
            delattr(model, _STATE_ATTR)
        if isinstance(model, VideoDiT) and model.config.attention != "dense":
            model.register_to_config(attention="dense", psa_config=None)


def psa_state(target) -> PSAState | None:
    """The `PSAState` of a transformer (or a pipeline's first video transformer) PSA is enabled on, else None."""
    if (vlm := _vlm(target)) is not None:
        return vlm.psa_state(target)
    return getattr(_transformers(target)[0], _STATE_ATTR, None)
