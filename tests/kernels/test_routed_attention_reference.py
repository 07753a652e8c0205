"""The routed-attention reference: exact against the straightforward gather, differentiable, checked inputs."""

from __future__ import annotations

import pytest
import torch

from kernels import routed_attention
from kernels._backend import kernel_backend, select_backend
from kernels.routed_attention import routed_attention_gather, routed_attention_reference


def _inputs(b=2, h=2, r=6, rk=5, lq=3, lk=4, d=8, dv=6, topk=3, dtype=torch.float64, grad=False):
    q = torch.randn(b, h, r, lq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, h, rk, lk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, h, rk, lk, dv, dtype=dtype, requires_grad=grad)
    index = torch.randint(0, rk, (b, r, topk))
    return q, k, v, index


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_slabbed_reference_equals_gather(chunk):
    q, k, v, index = _inputs(topk=5)
    index[0, 0] = torch.tensor([1, 1, 1, 0, 4])  # repeated regions count every time they appear
    expected = routed_attention_gather(q, k, v, index, 0.4)
    torch.testing.assert_close(routed_attention_reference(q, k, v, index, 0.4, region_chunk=chunk), expected)


def test_gradcheck_float64():
    q, k, v, index = _inputs(b=1, r=3, rk=4, lq=2, lk=3, d=4, dv=3, topk=3, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: routed_attention_reference(q, k, v, index, 0.5, region_chunk=2), (q, k, v)
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: routed_attention_reference(q, k, v, index, 0.5, region_chunk=3), (q, k, v)
    )


def test_full_routing_is_dense_attention():
    q, k, v, _ = _inputs(rk=5, topk=5)
    index = torch.arange(5).expand(2, 6, 5)
    out = routed_attention(q, k, v, index, scale=0.3)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), scale=0.3
    ).unflatten(2, (6, 3))
    torch.testing.assert_close(out, dense)


def test_empty_routing_gives_zeros():
    q, k, v, index = _inputs(topk=0)
    assert torch.equal(routed_attention(q, k, v, index), torch.zeros(2, 2, 6, 3, 6, dtype=q.dtype))


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, index = _inputs()
    torch.testing.assert_close(routed_attention(q, k, v, index), routed_attention_gather(q, k, v, index, 8**-0.5))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, i: (q[0], k, v, i), r"expects q \(B, H, R, Lq, D\)"),
        (lambda q, k, v, i: (q, k[..., :4], v, i), "incompatible shapes"),
        (lambda q, k, v, i: (q, k, v, i[:, :2]), r"region_index \(B, R, topk\) with \(B, R\) = \(2, 6\)"),
        (lambda q, k, v, i: (q, k, v, i.float()), "int32 or int64"),
        (lambda q, k, v, i: (q, k, v, i + 5), r"values must lie in \[0, 5\)"),
        (lambda q, k, v, i: (q.float(), k, v, i), "share a dtype"),
    ],
)
def test_bad_inputs_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        routed_attention(*change(*_inputs()))


def test_backend_switch(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("ZOO_KERNELS", "auto")
    assert select_backend("op", x) == "torch"  # CPU tensors take the reference under auto
    monkeypatch.setenv("ZOO_KERNELS", "triton")
    assert select_backend("op", x) == "triton"  # allowed on CPU because tests run with TRITON_INTERPRET=1
    monkeypatch.setenv("ZOO_KERNELS", "cuda")
    with pytest.raises(ValueError, match="ZOO_KERNELS must be one of"):
        kernel_backend()
