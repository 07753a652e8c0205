"""Video diffusion: the zoo's VideoDiT and its diffusers pipeline, and PSA for diffusers' own video transformers.

from zoo.video import VideoDiT, VideoDiTPipeline, enable_psa, disable_psa
"""

from .dit import VIDEO_DIT_SIZES, VideoDiT
from .pipeline import VideoDiTPipeline, VideoPipelineOutput
from .psa import PSAState, disable_psa, enable_psa, psa_state

__all__ = [
    "VIDEO_DIT_SIZES",
    "PSAState",
    "VideoDiT",
    "VideoDiTPipeline",
    "VideoPipelineOutput",
    "disable_psa",
    "enable_psa",
    "psa_state",
]
