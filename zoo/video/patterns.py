"""The video sparse-attention patterns of `zoo.blocks.sparse_patterns` (STA, GNA, Radial, VMoBA) as attention processors
of the zoo's `VideoDiT`, so that a model trains and samples with any of them:
`VideoDiT(..., attention="sta", pattern_config={"density": 0.3})`, or `--model.attention sta` in the recipe.

Static patterns are built once per token grid (at the density nearest `density`); VMoBA selects per call, its
1-D / 2-D / 3-D partition cycling with the block's index.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from zoo.blocks.sparse_patterns import BlockPattern, pattern_at_density, vmoba_attention

__all__ = ["PATTERN_ATTENTIONS", "PatternAttnProcessor", "PatternConfig", "enable_pattern"]

PATTERN_ATTENTIONS = ("sta", "neighborhood", "radial", "vmoba")


@dataclasses.dataclass(frozen=True)
class PatternConfig:
    """Settings of a pattern attention.

    Attributes:
        density: target fraction of dense attention's pairs (static patterns take the setting nearest it).
        tile: (t, h, w) tokens per tile of STA and GNA; its volume is Radial's block.
        chunk: (t, h, w) VMoBA chunk extents (1-D: t frames, 2-D: h x w through all frames, 3-D: the cube).
        threshold: VMoBA's share of summed chunk scores to reach (the authors' default 0.25).
    """

    density: float = 0.3
    tile: tuple[int, int, int] = (1, 2, 2)
    chunk: tuple[int, int, int] = (2, 4, 4)
    threshold: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "tile", tuple(self.tile))
        object.__setattr__(self, "chunk", tuple(self.chunk))
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise ValueError(f"pattern_config.density must lie in (0, 1], got {self.density!r}")
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"pattern_config.threshold must lie in [0, 1], got {self.threshold!r}")
        for name in ("tile", "chunk"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(x, int) and x > 0 for x in value):
                raise ValueError(f"pattern_config.{name} must be 3 positive ints (t, h, w), got {value!r}")


@lru_cache(maxsize=64)
def _static_pattern(name: str, grid: tuple[int, int, int], config: PatternConfig) -> BlockPattern:
    return pattern_at_density(name, grid, config.density, tile=config.tile)


class PatternAttnProcessor:
    """A `VideoDiTAttention` processor computing its self-attention under a sparse pattern.

    Args:
        name: one of `PATTERN_ATTENTIONS`.
        config: the pattern's settings.
        layer: the block's index (VMoBA's partition).
    """

    def __init__(self, name: str, config: PatternConfig, layer: int = 0):
        if name not in PATTERN_ATTENTIONS:
            raise ValueError(f"pattern must be one of {PATTERN_ATTENTIONS}, got {name!r}")
        self.name, self.config, self.layer = name, config, layer
        self.last_density: float | None = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        denoising_step: int | None = None,
    ) -> torch.Tensor:
        q, k, v = attn.heads_qkv(hidden_states, rotary_emb)  # (B, heads, L, head_dim)
        grid = tuple(int(n) for n in hidden_states.shape[1:4])
        if self.name == "vmoba":
            out, density = vmoba_attention(
                q, k, v, grid, layer=self.layer, chunk=self.config.chunk, threshold=self.config.threshold
            )
            self.last_density = float(density)
        else:
            pattern = _static_pattern(self.name, grid, self.config)
            out = pattern.attend(q, k, v)
            self.last_density = pattern.density()
        return attn.output(out, hidden_states.shape)


def enable_pattern(model, name: str, config: PatternConfig | dict | None = None) -> None:
    """Set every self-attention of a `VideoDiT` to pattern `name` (weights untouched).

    Args:
        model: a `zoo.video.VideoDiT`.
        name: one of `PATTERN_ATTENTIONS`.
        config: a `PatternConfig`, its fields as a dict, or None for the defaults.
    """
    if name not in PATTERN_ATTENTIONS:
        raise ValueError(f"pattern must be one of {PATTERN_ATTENTIONS}, got {name!r}")
    config = PatternConfig(**config) if isinstance(config, dict) else config or PatternConfig()
    for index, block in enumerate(model.blocks):
        block.attn.set_processor(PatternAttnProcessor(name, config, index))
