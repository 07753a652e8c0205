"""Video diffusion: the zoo's VideoDiT and its diffusers pipeline, and PSA for diffusers' own video transformers.

from zoo.video import VideoDiT, VideoDiTPipeline, enable_psa, disable_psa
"""

from .dit import VIDEO_DIT_SIZES, VideoDiT, VideoDiTAttention, VideoDiTAttnProcessor
from .pipeline import ManifestError, VideoDiTPipeline, VideoPipelineOutput, verify_manifest, write_manifest
from .psa import PSAAttnProcessor, PSAState, disable_psa, enable_psa, psa_state, supported_transformers

__all__ = [
    "VIDEO_DIT_SIZES",
    "ManifestError",
    "PSAAttnProcessor",
    "PSAState",
    "VideoDiT",
    "VideoDiTAttention",
    "VideoDiTAttnProcessor",
    "VideoDiTPipeline",
    "VideoPipelineOutput",
    "disable_psa",
    "enable_psa",
    "psa_state",
    "supported_transformers",
    "verify_manifest",
    "write_manifest",
]
