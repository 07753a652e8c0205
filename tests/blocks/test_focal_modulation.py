"""Focal modulation against timm's port of the official FocalNet block (NCHW, 1x1 convs where we use linears)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from timm.layers import LayerNorm2d
from timm.models import focalnet as timm_focalnet
from zoo.blocks.focal_modulation import FocalModulation

from zoo.models.focalnet import FocalNetBlock


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # timm keeps 1x1 convs (out, in, 1, 1) where we use linears (out, in).
    return {k: v.flatten(1) if v.dim() == 4 and v.shape[2:] == (1, 1) else v for k, v in state.items()}


OPTIONS = {
    "lrf": dict(focal_level=3, layerscale_value=None),
    "srf": dict(focal_level=2, layerscale_value=None),
    "post_norm_layerscale": dict(focal_level=3, focal_window=5, use_post_norm=True, layerscale_value=0.5),
    "norm_in_modulation": dict(
        focal_level=4, use_post_norm=True, use_post_norm_in_modulation=True, normalize_modulator=True,
        layerscale_value=0.5,
    ),
}  # fmt: skip


@pytest.mark.parametrize("option", list(OPTIONS))
def test_block_matches_timm_forward_and_backward(option):
    kwargs = OPTIONS[option]
    dim = 24
    # The official norms are nn.LayerNorm (eps 1e-5); timm's block defaults to 1e-6, its model passes 1e-5.
    ref = timm_focalnet.FocalNetBlock(dim, norm_layer=partial(LayerNorm2d, eps=1e-5), **kwargs)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if name.endswith("bias") or "norm" in name else 0.05))
    ref.eval()
    ours = FocalNetBlock(dim, **kwargs).eval()
    ours.load_state_dict(_to_ours(ref.state_dict()), strict=True)

    x = torch.randn(2, dim, 11, 9)
    with torch.no_grad():  # the fused inference path
        expected = ref(x)
        got = ours(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert _rel_err(expected, got) < 1e-5

    x_ref, x_ours = x.clone().requires_grad_(), x.permute(0, 2, 3, 1).clone().requires_grad_()
    grad = torch.randn_like(x)
    ref(x_ref).backward(grad)
    out = ours(x_ours)
    out.backward(grad.permute(0, 2, 3, 1))
    assert _rel_err(expected, out.detach().permute(0, 3, 1, 2)) < 1e-5
    assert _rel_err(x_ref.grad, x_ours.grad.permute(0, 3, 1, 2)) < 1e-5
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        assert _rel_err(ref_grads[name], p.grad.view_as(ref_grads[name])) < 1e-4, name


def test_kernel_sizes_grow_by_focal_factor():
    mod = FocalModulation(8, focal_level=3, focal_window=3, focal_factor=2)
    assert mod.kernel_sizes == [3, 5, 7]
    assert [layer[0].kernel_size for layer in mod.focal_layers] == [(3, 3), (5, 5), (7, 7)]
    # q, context and one gate per level plus the global level.
    assert mod.f.out_features == 2 * 8 + 3 + 1


def test_gates_weight_the_levels():
    # With the local levels' gates at 0 and the global gate at 1, the context reaches the output only
    # through its global mean: the modulator is the same at every position.
    mod = FocalModulation(8, focal_level=2).eval()
    with torch.no_grad():
        mod.f.weight[16:19] = 0
        mod.f.bias[16:18] = 0
        mod.f.bias[18] = 1
        mod.proj.weight.copy_(torch.eye(8))
        mod.proj.bias.zero_()
        x = torch.randn(1, 6, 6, 8)
        q = torch.nn.functional.linear(x, mod.f.weight[:8], mod.f.bias[:8])
        modulator = mod(x) / q
    torch.testing.assert_close(modulator, modulator[:, :1, :1].expand_as(modulator), rtol=1e-4, atol=1e-4)


def test_focal_level_must_be_positive():
    with pytest.raises(ValueError, match=r"focal_level"):
        FocalModulation(8, focal_level=0)
