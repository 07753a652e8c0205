"""The zoo: backbones registered with timm (`timm.create_model("zoo_biformer_t")`) and what users load.

Importing `zoo` registers every `zoo_*` model with timm.
"""

from . import models
from .checkpoint import load_checkpoint_file, load_state_dict_file
from .video import VideoDiT, VideoDiTPipeline, disable_psa, enable_psa

__version__ = "0.1.0"
__all__ = [
    "models",
    "load_checkpoint_file",
    "load_state_dict_file",
    "VideoDiT",
    "VideoDiTPipeline",
    "enable_psa",
    "disable_psa",
]
