"""Test-wide setup.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, so it is set here,
before any test module imports `zoo.kernels`: the Triton paths then run on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: the workers already fill the cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
