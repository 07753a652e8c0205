"""Fused pointwise ops: the oneDNN path against the reference (fp32, bf16), the autograd path, and the conditions
under which the reference runs instead (grad, hooks, wrapped or subclassed modules, switches, autocast, FLOP counters).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zoo.kernels.fused_pointwise as fp
from zoo.kernels.fused_pointwise import reference

pytestmark = pytest.mark.skipif(not fp.onednn_impl.available(), reason="this PyTorch build has no oneDNN")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@contextmanager
def _paths(caplog):
    """Collects the paths the ops log at debug level into the yielded list."""
    caplog.clear()
    paths: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="zoo.kernels"):
        yield paths
    paths += [
        r.getMessage().rsplit(": ", 1)[1].removesuffix(" path")
        for r in caplog.records
        if r.name == "zoo.kernels.fused_pointwise"
    ]


def _randomize_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1, 0.2)
        bn.bias.normal_(0, 0.2)
    return bn.eval()


class _SameConv(nn.Conv2d):
    """Pads one row and column at the bottom/right, then convolves: a forward declared by `conv_geometry`."""

    def conv_geometry(self, x, weight):
        return F.pad(x, (0, 1, 0, 1)), weight, [0, 0]

    def forward(self, x):
        x, weight, padding = self.conv_geometry(x, self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def _nhwc(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _nchw(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


# name -> (op name, builder of the positional arguments); ragged sizes throughout.
CASES = {
    "linear": ("linear", lambda: (_nhwc(2, 5, 7, 24), nn.Linear(24, 40))),
    "linear_no_bias": ("linear", lambda: (_nhwc(3, 11, 24), nn.Linear(24, 40, bias=False))),
    "linear_gelu": ("linear_gelu", lambda: (_nhwc(2, 5, 7, 24), nn.Linear(24, 40))),
    "linear_gelu_tanh": ("linear_gelu", lambda: (_nhwc(2, 5, 7, 24), nn.Linear(24, 40), "tanh")),
    "linear_add": ("linear_add", lambda: (_nhwc(2, 5, 7, 24), nn.Linear(24, 40), _nhwc(2, 5, 7, 40))),
    "linear_mul": ("linear_mul", lambda: (_nhwc(2, 5, 7, 24), nn.Linear(24, 40), _nhwc(2, 5, 7, 40))),
    "linear_split": ("linear_split", lambda: (_nhwc(2, 5, 7, 24), nn.Linear(24, 40), (16, 16, 8))),
    "conv_gelu": ("conv_gelu", lambda: (_nchw(2, 12, 9, 11), nn.Conv2d(12, 12, 3, padding=1, groups=12))),
    "conv_gelu_tanh_strided": (
        "conv_gelu",
        lambda: (_nchw(2, 12, 9, 11), nn.Conv2d(12, 8, 3, stride=2, padding=1, bias=False), "tanh"),
    ),
    "conv_add": (
        "conv_add",
        lambda: (x := _nchw(2, 12, 9, 11), nn.Conv2d(12, 12, 3, padding=1, groups=12), x),
    ),
    "conv_bn_gelu": (
        "conv_bn_gelu",
        lambda: (
            _nchw(2, 12, 9, 11),
            nn.Conv2d(12, 12, 3, 2, 1, groups=12, bias=False),
            _randomize_bn(nn.BatchNorm2d(12)),
        ),
    ),
    "conv_bn_gelu_declared_geometry": (
        "conv_bn_gelu",
        lambda: (_nchw(2, 12, 9, 11), _SameConv(12, 12, 3, 2, groups=12), _randomize_bn(nn.BatchNorm2d(12)), "tanh"),
    ),
    "pointwise_conv": ("pointwise_conv", lambda: (_nhwc(2, 5, 7, 24), nn.Conv2d(24, 40, 1))),
    "pointwise_conv_add": (
        "pointwise_conv_add",
        lambda: (_nhwc(2, 5, 7, 24), nn.Conv2d(24, 40, 1), _nhwc(2, 5, 7, 40)),
    ),
    "bn_pointwise_conv_bn_gelu": (
        "bn_pointwise_conv_bn_gelu",
        lambda: (
            _nhwc(2, 5, 7, 24),
            _randomize_bn(nn.BatchNorm2d(24, eps=1e-3)),
            nn.Conv2d(24, 40, 1, bias=False),
            _randomize_bn(nn.BatchNorm2d(40, eps=1e-3)),
            "tanh",
        ),
    ),
    "bn_pointwise_conv_bias_bn_gelu": (
        "bn_pointwise_conv_bn_gelu",
        lambda: (
            _nhwc(2, 5, 7, 24),
            _randomize_bn(nn.BatchNorm2d(24)),
            nn.Conv2d(24, 40, 1),
            _randomize_bn(nn.BatchNorm2d(40)),
        ),
    ),
}


def _build(case: str, dtype: torch.dtype = torch.float32) -> tuple[str, tuple]:
    op, make = CASES[case]
    args = tuple(a.to(dtype) if isinstance(a, (torch.Tensor, nn.Module)) else a for a in make())
    return op, args


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_path_matches_reference(case, dtype, caplog):
    op, args = _build(case, dtype)
    with torch.no_grad():
        with _paths(caplog) as paths:
            fused = _as_tuple(getattr(fp, op)(*args))
        ref = _as_tuple(getattr(reference, op)(*args))
    assert paths == ["onednn"]
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding fused, several in the reference
    for a, b in zip(fused, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel_err(a, b) <= bound


@pytest.mark.parametrize("case", list(CASES))
def test_grad_mode_takes_an_autograd_path_equal_to_the_reference(case, caplog):
    op, args = _build(case)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    with _paths(caplog) as paths:
        out = _as_tuple(getattr(fp, op)(*args))
    ref = _as_tuple(getattr(reference, op)(*args))
    assert paths[0] in ("torch", "reference")
    for a, b in zip(out, ref, strict=True):
        assert _rel_err(a.detach(), b.detach()) <= 1e-5
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    inputs += [p for m in args if isinstance(m, nn.Module) for p in m.parameters()]
    grads = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(out, inputs, grads, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, grads, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert _rel_err(a, b) <= 1e-5


def test_a_forward_hook_runs_and_its_result_is_used(caplog):
    x, fc = _nhwc(2, 5, 24), nn.Linear(24, 40)
    calls = []

    def hook(module, inputs, output):
        calls.append(module)
        return output * 2

    handle = fc.register_forward_hook(hook)
    with torch.no_grad(), _paths(caplog) as paths:
        out = fp.linear_gelu(x, fc)
    handle.remove()
    assert calls == [fc] and paths == ["reference"]
    torch.testing.assert_close(out, F.gelu(2 * F.linear(x, fc.weight, fc.bias)))


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_global_module_hooks_keep_every_module_called(kind, caplog):
    x, conv, bn = _nchw(2, 12, 9, 11), nn.Conv2d(12, 12, 3, padding=1), _randomize_bn(nn.BatchNorm2d(12))
    seen = []
    register = getattr(torch.nn.modules.module, f"register_module_{kind}_hook")
    handle = register(lambda module, *_: seen.append(module))
    try:
        with torch.no_grad(), _paths(caplog) as paths:
            fp.conv_bn_gelu(x, conv, bn)
    finally:
        handle.remove()
    assert seen == [conv, bn] and paths == ["reference"]


class _LoRA(nn.Module):
    """A wrapper substituted for a Linear: base(x) plus a low-rank term."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.up = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.down), self.up)


class _ScaledLinear(nn.Linear):
    """A subclass with its own forward: reading its weights would drop the scale."""

    def forward(self, x):
        return 3 * super().forward(x)


@pytest.mark.parametrize("wrap", ["lora", "subclass", "parametrized"])
def test_wrapped_or_subclassed_linears_are_called(wrap, caplog):
    x, residual = _nhwc(2, 5, 24), _nhwc(2, 5, 40)
    fc = nn.Linear(24, 40)
    if wrap == "lora":
        module = _LoRA(fc)
        expected = F.linear(x, fc.weight + module.up @ module.down, fc.bias)
    elif wrap == "subclass":
        module = _ScaledLinear(24, 40)
        module.load_state_dict(fc.state_dict())
        expected = 3 * F.linear(x, fc.weight, fc.bias)
    else:
        module = nn.Linear(24, 40)
        module.load_state_dict(fc.state_dict())

        class Double(nn.Module):
            def forward(self, w):
                return 2 * w

        torch.nn.utils.parametrize.register_parametrization(module, "weight", Double())
        expected = F.linear(x, 2 * fc.weight, fc.bias)
    with torch.no_grad(), _paths(caplog) as paths:
        out = fp.linear_add(x, module, residual)
    assert paths == ["reference"]
    torch.testing.assert_close(out, residual + expected)


def test_conv_subclass_overriding_a_declared_forward_is_not_fused(caplog):
    class Shifted(_SameConv):
        def forward(self, x):
            return super().forward(x) + 1

    x, bn = _nchw(1, 4, 6, 6), _randomize_bn(nn.BatchNorm2d(4))
    for cls, path in ((_SameConv, "onednn"), (Shifted, "reference")):
        conv = cls(4, 4, 3, groups=4)
        with torch.no_grad(), _paths(caplog) as paths:
            out = fp.conv_bn_gelu(x, conv, bn)
        assert paths == [path]
        assert _rel_err(out, F.gelu(bn(conv(x)))) <= 1e-5


def test_weights_of_another_dtype_take_the_reference(caplog):
    x = _nhwc(2, 5, 24)
    fc = nn.Linear(24, 40).to(torch.bfloat16)  # weights of another dtype than x: the module's own error or result
    with torch.no_grad(), _paths(caplog) as paths, pytest.raises(RuntimeError):
        fp.linear(x, fc)
    assert paths == ["reference"]


def test_broadcast_operands_take_the_reference(caplog):
    x, fc = _nhwc(2, 5, 24), nn.Linear(24, 40)
    gate = torch.randn(40)
    with torch.no_grad(), _paths(caplog) as paths:
        out = fp.linear_mul(x, fc, gate)
    assert paths == ["reference"]
    torch.testing.assert_close(out, gate * fc(x))


def test_batch_norm_in_training_mode_updates_its_statistics(caplog):
    x, conv, bn = _nchw(2, 12, 9, 11), nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
    with torch.no_grad(), _paths(caplog) as paths:
        fp.conv_bn_gelu(x, conv, bn.train())
    assert paths == ["reference"] and bn.num_batches_tracked.item() == 1


def test_cpu_fusion_switch_turns_the_onednn_path_off(monkeypatch, caplog):
    x, conv = _nhwc(2, 5, 7, 24), nn.Conv2d(24, 40, 1)
    monkeypatch.setenv("ZOO_CPU_FUSION", "0")
    with torch.no_grad(), _paths(caplog) as paths:
        fp.pointwise_conv(x, conv)
        fp.linear(x, nn.Linear(24, 8))
    assert paths == ["torch", "reference"]


def test_reference_backend_forces_the_plain_path(monkeypatch, caplog):
    monkeypatch.setattr(fp, "select_backend", lambda op, *tensors: "reference")
    x, conv = _nhwc(2, 5, 7, 24), nn.Conv2d(24, 40, 1)
    with torch.no_grad(), _paths(caplog) as paths:
        out = fp.pointwise_conv(x, conv)
    assert paths == ["reference"]
    assert _rel_err(out, F.linear(x, conv.weight.flatten(1), conv.bias)) <= 1e-5


def test_zoo_kernels_reference_forces_the_plain_path(monkeypatch, caplog):
    monkeypatch.setenv("ZOO_KERNELS", "reference")
    with torch.no_grad(), _paths(caplog) as paths:
        fp.linear_gelu(_nhwc(2, 5, 24), nn.Linear(24, 40))
    assert paths == ["reference"]


def test_autocast_and_dispatch_modes_see_the_plain_ops(caplog):
    from torch.utils.flop_counter import FlopCounterMode

    x, fc = _nhwc(2, 5, 24), nn.Linear(24, 40)
    with torch.no_grad(), _paths(caplog) as paths:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fp.linear_gelu(x, fc)
        with FlopCounterMode(display=False) as counter:
            fp.linear_gelu(x, fc)
    assert paths == ["reference", "reference"]
    assert out.dtype == torch.bfloat16
    assert counter.get_total_flops() == 2 * 2 * 5 * 24 * 40


def test_bad_arguments_raise():
    x, fc = _nhwc(2, 5, 24), nn.Linear(24, 40)
    with pytest.raises(ValueError, match="approximate"):
        fp.linear_gelu(x, fc, approximate="erf")
    with pytest.raises(ValueError, match="do not sum to out_features 40"):
        fp.linear_split(x, fc, (16, 16))


@pytest.mark.parametrize("module", [fp, fp.reference, fp.onednn_impl], ids=["dispatch", "reference", "onednn"])
def test_every_path_defines_every_op(module):
    # The op set is named once (_ops.OPS); a path that lost or misspelt one would otherwise fail only at the call.
    assert set(fp._ops.OPS) <= set(module.__all__)
    missing = [name for name in module.__all__ if not callable(getattr(module, name, None))]
    assert not missing, f"{module.__name__} exports names it does not define: {missing}"
