"""Functional ops: a PyTorch reference and a Triton implementation per op, behind one switch.

Imports torch and triton only; nothing here knows about blocks or models.
"""

from ._backend import kernel_backend, select_backend
from .block_sparse_attention import block_sparse_attention, block_sparse_attention_reference
from .routed_attention import routed_attention, routed_attention_gather, routed_attention_reference

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "kernel_backend",
    "select_backend",
    "routed_attention",
    "routed_attention_gather",
    "routed_attention_reference",
]
