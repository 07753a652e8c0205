"""The backend switch: `ZOO_KERNELS` names every backend, `auto` takes the measured choice per device and grad
mode (logged at debug level), and impossible requests fail with a message that names the way out."""

from __future__ import annotations

import pytest
import torch
from zoo.kernels import BACKENDS, block_sparse_attention
from zoo.kernels._backend import kernel_backend, select_backend


def _call(grad: bool, block: int, blocks: int = 2, per_row: int = 1):
    q, k, v = (torch.randn(1, 2, blocks * block, 8, requires_grad=grad) for _ in range(3))
    index = (torch.arange(blocks).view(1, 1, blocks, 1) + torch.arange(per_row)) % blocks
    return block_sparse_attention(q, k, v, index, block_q=block, block_k=block)


@pytest.mark.parametrize(
    "grad, block, blocks, per_row, expected",
    [
        (False, 64, 32, 2, "flex"),
        (False, 64, 32, 1, "gather"),
        (True, 64, 32, 1, "gather"),
        (False, 16, 64, 1, "gather"),
        (True, 16, 64, 1, "gather"),
        (False, 64, 2, 1, "masked"),
        (True, 16, 4, 1, "masked"),
    ],
    ids=[
        "inference-large-blocks",
        "inference-rows-of-one-64-token-block",
        "training",
        "inference-small-blocks",
        "training-small-blocks",
        "inference-short-sequence",
        "training-short-sequence",
    ],
)
@pytest.mark.parametrize("requested", ["auto", "torch"])
def test_cpu_choice_by_grad_mode_block_size_and_length(
    requested, grad, block, blocks, per_row, expected, monkeypatch, caplog
):
    monkeypatch.setenv("ZOO_KERNELS", requested)
    with caplog.at_level("DEBUG", logger="zoo.kernels"), torch.set_grad_enabled(grad):
        _call(grad, block, blocks, per_row)
    assert f"block_sparse_attention: {expected} path" in caplog.text or f"torch path is {expected}" in caplog.text


def test_every_backend_is_a_value_of_the_switch(monkeypatch):
    assert set(BACKENDS) == {"auto", "reference", "torch", "flex", "gather", "masked", "triton"}
    for name in BACKENDS:
        monkeypatch.setenv("ZOO_KERNELS", name.upper())
        assert kernel_backend() == name
    monkeypatch.setenv("ZOO_KERNELS", "bogus")
    with pytest.raises(ValueError, match=r"ZOO_KERNELS must be one of \('auto', 'reference', 'torch'"):
        kernel_backend()


def test_flex_training_on_the_cpu_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setenv("ZOO_KERNELS", "flex")
    with pytest.raises(RuntimeError, match="no backward on the CPU; use gather"):
        _call(True, 64)


def test_ops_without_a_flex_or_gather_form_take_their_torch_path(monkeypatch):
    x = torch.zeros(1)
    for name in ("flex", "gather", "masked", "torch"):
        monkeypatch.setenv("ZOO_KERNELS", name)
        assert select_backend("op", x) == "torch"
    monkeypatch.setenv("ZOO_KERNELS", "auto")
    assert select_backend("op", x) == "torch"  # CPU tensors
    monkeypatch.setenv("ZOO_KERNELS", "triton")
    assert select_backend("op", x) == "triton"  # allowed on CPU because tests run with TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match=r"op has no 'triton' backend .* it has \('reference', 'torch'\)"):
        select_backend("op", x, backends=("reference", "torch"))


def test_a_bias_that_requires_grad_makes_it_training(monkeypatch, caplog):
    # Only the bias records gradients: auto must not pick FlexAttention (no CPU backward), and the gradient
    # reaches the bias, also through an empty table.
    monkeypatch.setenv("ZOO_KERNELS", "auto")
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    bias = torch.randn(2, 64, 64, requires_grad=True)
    for index in (torch.tensor([[[[0], [1]]]]), torch.zeros(1, 1, 2, 0, dtype=torch.long)):
        with caplog.at_level("DEBUG", logger="zoo.kernels"):
            out = block_sparse_attention(q, k, v, index, bias=bias, block_q=64, block_k=64)
        (grad,) = torch.autograd.grad(out.sum(), bias)
        assert torch.isfinite(grad).all()
    assert "flex" not in caplog.text


def test_tables_on_another_device_are_named():
    q, k, v = (torch.randn(1, 1, 8, 4, device="meta") for _ in range(3))
    with pytest.raises(ValueError, match="kv_index is on cpu but q, k, v are on meta"):
        block_sparse_attention(q, k, v, torch.zeros(1, 1, 2, 1, dtype=torch.long), block_q=4, block_k=4)


@pytest.mark.parametrize("backend", ["auto", "gather", "masked", "flex"])
def test_meta_tensors_give_the_output_shape(backend, monkeypatch):
    # Model construction and FLOP counting run on the meta device, where no table value can be read.
    monkeypatch.setenv("ZOO_KERNELS", backend)
    q, k, v = (torch.randn(1, 2, 128, 16, device="meta") for _ in range(3))
    index = torch.zeros(1, 1, 2, 2, dtype=torch.long, device="meta")
    level = torch.zeros_like(index)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, index, level, block_q=64, block_k=64, num_levels=2)
    assert out.shape == (1, 2, 128, 16) and out.device.type == "meta"


def test_flex_that_cannot_compile_falls_back_to_gather(monkeypatch):
    # A machine without a C++ compiler for Inductor: auto warns once, computes with the gather path and stops
    # choosing FlexAttention; asked for by name, FlexAttention's failure is an error that says so.
    from zoo.kernels.block_sparse_attention import torch_impl

    def no_compiler():
        def fail(*args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")

        return fail

    monkeypatch.setattr(torch_impl, "_compiled_flex", no_compiler)
    monkeypatch.setattr(torch_impl, "_flex_failed", [])
    monkeypatch.setenv("ZOO_KERNELS", "auto")
    # Long enough that auto takes FlexAttention, not the masked dense form of short sequences, and rows of two
    # blocks (rows of one 64-token block take the gather path).
    q, k, v = (torch.randn(1, 2, 2048, 16) for _ in range(3))
    index = (torch.arange(32).view(1, 1, 32, 1) + torch.arange(2)) % 32
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="FlexAttention could not be compiled"):
        out = block_sparse_attention(q, k, v, index, block_q=64, block_k=64)
    monkeypatch.setenv("ZOO_KERNELS", "gather")
    with torch.no_grad():
        torch.testing.assert_close(out, block_sparse_attention(q, k, v, index, block_q=64, block_k=64))
    assert not torch_impl.flex_available()
    monkeypatch.setenv("ZOO_KERNELS", "flex")
    with torch.no_grad(), pytest.raises(torch_impl.FlexCompileError, match="no C.. compiler"):
        block_sparse_attention(q, k, v, index, block_q=64, block_k=64)
