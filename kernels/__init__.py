"""Functional ops: a PyTorch reference and a Triton implementation per op, behind one switch.

Imports torch and triton only; nothing here knows about blocks or models.
"""

from ._backend import kernel_backend, select_backend
from .routed_attention import routed_attention, routed_attention_gather, routed_attention_reference

__all__ = [
    "kernel_backend",
    "select_backend",
    "routed_attention",
    "routed_attention_gather",
    "routed_attention_reference",
]
