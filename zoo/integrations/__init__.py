"""Zoo backbones in other toolkits: the dense-prediction form (`DenseBackbone`), torchvision's detection
models (`zoo.integrations.torchvision`) and OpenMMLab (`zoo.integrations.mmengine`, imported on demand
because mmengine is heavy to import)."""

from .dense import DenseBackbone

__all__ = ["DenseBackbone"]
