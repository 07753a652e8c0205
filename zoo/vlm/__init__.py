"""Vision-language models: causal Pyramid Sparse Attention in transformers' Qwen2.5-VL (the `vlm` extra).

from zoo.vlm import enable_psa, disable_psa
"""

from .psa import ATTN_IMPLEMENTATION, CausalPSAState, disable_psa, enable_psa, psa_state, supported_models

__all__ = ["ATTN_IMPLEMENTATION", "CausalPSAState", "disable_psa", "enable_psa", "psa_state", "supported_models"]
