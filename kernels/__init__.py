"""Functional ops: a plain PyTorch reference and fast backends per op, behind one switch (`ZOO_KERNELS`).

Imports torch and triton only; nothing here knows about blocks or models.
"""

from ._backend import BACKENDS, kernel_backend, select_backend
from .block_sparse_attention import block_sparse_attention, block_sparse_attention_reference, tables_from_level_map

# A misspelt ZOO_KERNELS is reported here, when the package is imported, rather than at the first forward of a
# model built minutes earlier. The variable is still read at every call, so tests can switch it.
kernel_backend()

__all__ = [
    "BACKENDS",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "kernel_backend",
    "select_backend",
    "tables_from_level_map",
]
