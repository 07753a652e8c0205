"""The zoo's video diffusion transformer: a class-conditional DiT on (B, C, T, H, W) video.

A diffusers model (`ModelMixin` + `ConfigMixin`, so `save_pretrained` / `from_pretrained` and
`torch_dtype` work as for diffusers' own): 3-D patch embedding (a strided Conv3d, as Wan), timestep +
class-label conditioning (diffusers' `CombinedTimestepLabelEmbeddings`; its extra "null" label is the
unconditional input of classifier-free guidance), DiT blocks with adaLN-zero modulation
(Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023), 3-D rotary positions split
over (t, h, w) as Wan splits them, or learned positions. Self-attention follows diffusers' attention-processor
convention (`VideoDiTAttention` is an `AttentionModuleMixin`, the model an `AttentionMixin`): the default
processor runs dense attention through diffusers' `dispatch_attention_fn` (so `set_attention_backend` works),
and `zoo.video.enable_psa` / `disable_psa` swap in Pyramid Sparse Attention exactly as for diffusers' own video
transformers; `attention="psa"` in the config is that same switch applied at construction, and
`enable_psa`/`disable_psa` record it in the config so `save_pretrained` keeps it. It predicts the
flow-matching velocity (noise - data) that `FlowMatchEulerDiscreteScheduler` integrates.

`sample_size` and `sample_frames` record the clip the model was trained on (pixels and frames); the
pipeline's defaults come from them, as diffusers' pipelines take theirs from `sample_size`.

Sizes (`VideoDiT.from_size`): "xs" and "s" train on a CPU (0.18 M and 5.5 M parameters), "b" is
DiT-B-like (130 M), "wan-1.3b" has Wan2.1-1.3B's width, depth, heads and FFN on 16 latent channels
(1.54 B: per-block adaLN projections and no text cross-attention, where Wan shares one and has one).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, get_1d_rotary_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Mlp, trunc_normal_

from zoo.blocks.pyramid_sparse import PSAConfig, apply_rotary_interleaved
from zoo.blocks.video_order import video_token_order

__all__ = ["VIDEO_DIT_SIZES", "VideoDiT", "VideoDiTAttnProcessor", "VideoDiTAttention", "VideoDiTBlock"]

VIDEO_DIT_SIZES: dict[str, dict] = {
    "xs": dict(hidden_size=64, num_layers=2, num_heads=4),
    "s": dict(hidden_size=192, num_layers=8, num_heads=4),
    "b": dict(hidden_size=768, num_layers=12, num_heads=12),
    "wan-1.3b": dict(in_channels=16, hidden_size=1536, num_layers=30, num_heads=12, mlp_dim=8960),
}


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, W, C); shift/scale: (B, C) broadcast over the token grid
    return x * (1 + scale[:, None, None, None]) + shift[:, None, None, None]


class VideoDiTAttnProcessor:
    """Dense self-attention of a `VideoDiTAttention` through diffusers' `dispatch_attention_fn`."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: VideoDiTAttention,
        hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        denoising_step: int | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B, T, H, W, C) -> (B, T, H, W, C); `denoising_step` is for processors that use it."""
        q, k, v = attn.heads_qkv(hidden_states, rotary_emb)
        out = dispatch_attention_fn(
            *(x.transpose(1, 2) for x in (q, k, v)),
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )  # (B, L, heads, head_dim)
        return attn.output(out.transpose(1, 2), hidden_states.shape)


class VideoDiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention on channels-last video: q/k/v projection, per-head RMSNorm on queries and keys,
    rotary positions, the processor's attention, output projection.

    Args:
        dim: channels C.
        num_heads: heads; `dim` must be divisible by it.
        qk_norm: RMSNorm on each head's queries and keys.
        processor: the attention processor (`VideoDiTAttnProcessor` when None).
    """

    _default_processor_cls = VideoDiTAttnProcessor
    _available_processors = [VideoDiTAttnProcessor]
    _supports_qkv_fusion = False  # q, k and v already come from one projection

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, processor=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.heads, self.head_dim = num_heads, dim // num_heads
        # Parameter names as in the checkpoints saved before the processor convention (qkv, q_norm, k_norm, proj).
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def heads_qkv(
        self, x: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, H, W, C) -> q, k, v (B, heads, T*H*W, head_dim), queries and keys normed and rotated."""
        b, t, h, w, c = x.shape
        q, k, v = self.qkv(x.reshape(b, t * h * w, c)).view(b, -1, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if rotary_emb is not None:
            q, k = apply_rotary_interleaved(q, *rotary_emb), apply_rotary_interleaved(k, *rotary_emb)
        return q, k, v

    def output(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """out: (B, heads, L, head_dim) -> the output projection, (B, T, H, W, C) as `shape`."""
        return self.proj(out.transpose(1, 2).reshape(shape))

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        denoising_step: int | None = None,
        presorted: bool = False,
    ) -> torch.Tensor:
        """Args:
            hidden_states: (B, T, H, W, C).
            rotary_emb: (cos, sin), each (T*H*W, head_dim), rotary angles of the tokens (in their order).
            denoising_step: the sampling step, for PSA's dense warm-up.
            presorted: the tokens are laid out in PSA's block order (`VideoDiT` reorders them once per forward when
                PSA is enabled), not row-major; only PSA's processor is told.

        Returns:
            (B, T, H, W, C).
        """
        if hidden_states.dim() != 5 or hidden_states.shape[-1] != self.qkv.in_features:
            raise ValueError(
                f"VideoDiTAttention expects (B, T, H, W, {self.qkv.in_features}), got {tuple(hidden_states.shape)}"
            )
        extra = {"presorted": True} if presorted else {}
        return self.processor(self, hidden_states, rotary_emb=rotary_emb, denoising_step=denoising_step, **extra)


class VideoDiTBlock(nn.Module):
    """DiT block with adaLN-zero on channels-last video (B, T, H, W, C): the gates start at zero."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, qk_norm: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = VideoDiTAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_dim, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        step: int | None,
        presorted: bool = False,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None, None, None] * self.attn(
            _modulate(self.norm1(x), shift1, scale1), rotary_emb=rope, denoising_step=step, presorted=presorted
        )
        return x + gate2[:, None, None, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class VideoDiT(ModelMixin, ConfigMixin, AttentionMixin):
    """Class-conditional video diffusion transformer.

    Args:
        in_channels: channels of the input video / latents.
        out_channels: channels predicted (defaults to `in_channels`).
        patch_size: (t, h, w) patch extent of the 3-D patch embedding.
        hidden_size: token width.
        num_layers: DiT blocks.
        num_heads: attention heads.
        mlp_dim: MLP hidden width (defaults to 4 * hidden_size).
        num_classes: class labels; with `class_dropout_prob > 0` the label `num_classes` is the
            unconditional ("null") label used by classifier-free guidance.
        class_dropout_prob: probability a label is replaced by the null label in training.
        pos_embed: "rope" (3-D rotary, split over t/h/w as in Wan) or "learned" (one table per axis, summed).
        max_grid: (T, H, W) token grid bound of the learned positions.
        rope_theta: rotary base.
        qk_norm: per-head RMSNorm on queries and keys.
        attention: "dense" (SDPA), "psa" (pyramid sparse attention) or a video sparse-attention pattern
            ("sta", "neighborhood", "radial", "vmoba"; `zoo.video.patterns`).
        pattern_config: fields of `zoo.video.patterns.PatternConfig` for a pattern attention; None for defaults.
        psa_config: fields of `zoo.blocks.pyramid_sparse.PSAConfig` (a dict, so the config stays JSON); None
            for the official defaults.
    """

    _supports_gradient_checkpointing = True
    # With PSA enabled, put the tokens in PSA's block order once per forward rather than in every layer (same result).
    presort_tokens = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 256,
        num_layers: int = 8,
        num_heads: int = 4,
        mlp_dim: int | None = None,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
        pos_embed: str = "rope",
        max_grid: tuple[int, int, int] = (32, 64, 64),
        rope_theta: float = 10000.0,
        qk_norm: bool = True,
        attention: str = "dense",
        psa_config: dict | None = None,
        pattern_config: dict | None = None,
        sample_size: int | tuple[int, int] = 32,
        sample_frames: int = 8,
    ):
        super().__init__()
        from .patterns import PATTERN_ATTENTIONS, PatternConfig, enable_pattern

        if attention not in ("dense", "psa", *PATTERN_ATTENTIONS):
            raise ValueError(f"attention must be one of {('dense', 'psa', *PATTERN_ATTENTIONS)}, got {attention!r}")
        pattern = PatternConfig(**pattern_config) if pattern_config is not None else None
        if pos_embed not in ("rope", "learned"):
            raise ValueError(f"pos_embed must be 'rope' or 'learned', got {pos_embed!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if len(patch_size) != 3 or len(max_grid) != 3:
            raise ValueError(f"patch_size and max_grid must be (t, h, w), got {patch_size} and {max_grid}")
        out_channels = out_channels or in_channels
        self.out_channels = out_channels
        self.patch = tuple(int(p) for p in patch_size)
        head_dim = hidden_size // num_heads
        # Wan's split of the rotary channels: equal even shares for h and w, the rest for t.
        self.rope_dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
        psa = PSAConfig(**psa_config) if psa_config is not None else None
        sizes = (sample_size,) * 2 if isinstance(sample_size, int) else tuple(sample_size)
        if len(sizes) != 2 or not all(isinstance(s, int) and s > 0 for s in (*sizes, sample_frames)):
            raise ValueError(
                f"sample_size must be a positive int or (height, width) and sample_frames a positive int, got "
                f"{sample_size!r} and {sample_frames!r}"
            )

        self.patch_embed = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch, stride=self.patch)
        self.condition = CombinedTimestepLabelEmbeddings(num_classes, hidden_size, class_dropout_prob)
        # Learned positions are factorised, one table per axis (summed), so they stay small at video sizes.
        self.pos_t = self.pos_h = self.pos_w = None
        if pos_embed == "learned":
            self.pos_t, self.pos_h, self.pos_w = (nn.Parameter(torch.zeros(n, hidden_size)) for n in max_grid)
        self.blocks = nn.ModuleList(
            [VideoDiTBlock(hidden_size, num_heads, mlp_dim or 4 * hidden_size, qk_norm) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.proj_out = nn.Linear(hidden_size, math.prod(self.patch) * out_channels)
        self.gradient_checkpointing = False
        self._init_weights()
        if attention in PATTERN_ATTENTIONS:
            enable_pattern(self, attention, pattern)
        if attention == "psa":
            from .psa import enable_psa  # psa.py knows this class; importing it at the top would be circular

            enable_psa(self, psa)

    @classmethod
    def from_size(cls, size: str, **overrides) -> VideoDiT:
        """A model of a named size ("xs", "s", "b", "wan-1.3b"), random weights; `overrides` change any config."""
        if size not in VIDEO_DIT_SIZES:
            raise ValueError(f"size must be one of {sorted(VIDEO_DIT_SIZES)}, got {size!r}")
        return cls(**{**VIDEO_DIT_SIZES[size], **overrides})

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.condition.class_embedder.embedding_table.weight, std=0.02)
        for layer in (self.condition.timestep_embedder.linear_1, self.condition.timestep_embedder.linear_2):
            nn.init.normal_(layer.weight, std=0.02)
        if self.pos_t is not None:
            for table in (self.pos_t, self.pos_h, self.pos_w):
                trunc_normal_(table, std=0.02)
        # adaLN-zero: every residual branch and the output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.modulation_out[-1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = [], []
        for dim, n, axis in zip(self.rope_dims, grid, range(3), strict=True):
            c, s = get_1d_rotary_pos_embed(
                dim, n, self.config.rope_theta, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
            )
            shape = [1, 1, 1, dim]
            shape[axis] = n
            cos.append(c.view(shape).expand(*grid, dim))
            sin.append(s.view(shape).expand(*grid, dim))
        to = {"device": device, "dtype": torch.float32}
        return torch.cat(cos, -1).reshape(-1, sum(self.rope_dims)).to(**to), torch.cat(sin, -1).reshape(
            -1, sum(self.rope_dims)
        ).to(**to)

    def _psa_token_order(
        self, grid: tuple[int, int, int], device: torch.device, step: int | None
    ) -> torch.Tensor | None:
        """PSA's token order for this grid when PSA with a reorder is enabled on every block and `step` is past the
        dense warm-up (which runs the original processors on the tokens as they are); else None.

        PSA would put the tokens in block order and back in every layer; the blocks are per-token except for
        attention (rotary angles travel with the tokens), so the model does it once per forward instead (measured
        on the digits recipe's model: 6 of every 50 ms of a layer's PSA forward+backward were the reorder).
        `presort_tokens = False` keeps the per-layer reorder (the same result).
        """
        from .psa import PSAAttnProcessor, psa_state  # psa.py imports this module

        state = psa_state(self) if self.presort_tokens else None
        if state is None or state.config.reorder == "none" or state.dense_at(step):
            return None
        if not all(isinstance(block.attn.processor, PSAAttnProcessor) for block in self.blocks):
            return None
        return video_token_order(grid, state.config.reorder, state.config.tile_size).to(device)

    def _check(self, hidden_states: torch.Tensor, class_labels: torch.Tensor) -> tuple[int, int, int]:
        cfg = self.config
        if hidden_states.dim() != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"VideoDiT expects hidden_states (B, {cfg.in_channels}, T, H, W), got {tuple(hidden_states.shape)}"
            )
        t, h, w = hidden_states.shape[2:]
        if t % self.patch[0] or h % self.patch[1] or w % self.patch[2]:
            raise ValueError(f"frames, height, width {(t, h, w)} must be multiples of the patch size {self.patch}")
        grid = (t // self.patch[0], h // self.patch[1], w // self.patch[2])
        if self.pos_t is not None and any(g > m for g, m in zip(grid, cfg.max_grid, strict=True)):
            raise ValueError(f"token grid {grid} exceeds max_grid {tuple(cfg.max_grid)} of the learned positions")
        if class_labels.shape != (hidden_states.shape[0],) or class_labels.dtype.is_floating_point:
            raise ValueError(
                f"class_labels must be {hidden_states.shape[0]} integers, got {tuple(class_labels.shape)} "
                f"{class_labels.dtype}"
            )
        top = cfg.num_classes + (cfg.class_dropout_prob > 0)
        if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= top):
            raise ValueError(f"class_labels must lie in [0, {top}), got {class_labels.tolist()}")
        return grid

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor,
        denoising_step: int | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow-matching velocity.

        Args:
            hidden_states: (B, C, T, H, W) noisy video or latents; T, H, W multiples of `patch_size`.
            timestep: (B,) or a scalar, in the scheduler's [0, 1000] range.
            class_labels: (B,) int64 in [0, num_classes], num_classes being the null label.
            denoising_step: index of the sampling step, for PSA's dense warm-up (`PSAConfig.warmup_steps`).
            return_dict: return a `Transformer2DModelOutput` rather than a tuple.

        Returns:
            `sample`: (B, out_channels, T, H, W).
        """
        grid = self._check(hidden_states, class_labels)
        b = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(b)
        c = self.condition(timestep, class_labels, hidden_dtype=hidden_states.dtype)
        x = self.patch_embed(hidden_states).permute(0, 2, 3, 4, 1)  # (B, T, H, W, C)
        rope = None
        if self.pos_t is not None:
            t, h, w = grid
            x = x + self.pos_t[:t, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]
        else:
            rope = self._rope(grid, x.device)
        order = self._psa_token_order(grid, x.device, denoising_step)
        if order is not None:  # everything but attention is per token: reorder once here, not in every layer
            x = x.reshape(b, -1, x.shape[-1]).index_select(1, order).view(x.shape)
            rope = None if rope is None else tuple(r.index_select(0, order) for r in rope)
        presorted = order is not None
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, rope, denoising_step, presorted)
            else:
                x = block(x, c, rope, denoising_step, presorted)
        if order is not None:
            x = x.reshape(b, -1, x.shape[-1]).index_select(1, torch.argsort(order)).view(x.shape)
        shift, scale = self.modulation_out(c).chunk(2, dim=-1)
        x = self.proj_out(_modulate(self.norm_out(x), shift, scale))  # (B, T', H', W', pt*ph*pw*C)
        pt, ph, pw = self.patch
        x = x.view(b, *grid, pt, ph, pw, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.reshape(b, self.out_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
