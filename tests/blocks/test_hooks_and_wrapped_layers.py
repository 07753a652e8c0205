"""Blocks have one forward: in eval under no_grad (the fused CPU path), hooks on their layers run and a wrapped
Linear (LoRA-style) takes effect, for the MaxViT, DaViT and FocalNet blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.models.davit import ChannelBlock, SpatialBlock
from zoo.models.focalnet import FocalNetBlock
from zoo.models.maxvit import MaxViTBlock


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _maxvit() -> nn.Module:
    block = MaxViTBlock(16, 32, stride=2, head_dim=8, window_size=3, grid_size=3)
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_(1, 0.2)
        bn.bias.data.normal_(0, 0.2)
    return block


BLOCKS = {
    "maxvit": (_maxvit, (2, 9, 13, 16)),
    "davit_spatial": (lambda: SpatialBlock(32, 4, window_size=7), (2, 9, 13, 32)),
    "davit_channel": (lambda: ChannelBlock(32, 4), (2, 9, 13, 32)),  # more positions than channels: folded proj
    "focalnet": (lambda: FocalNetBlock(24, focal_level=3), (2, 11, 9, 24)),
}

# (block, layer): the Linears and 1x1 convs a LoRA-style wrapper can replace.
WRAPPABLE = [
    ("maxvit", "conv.conv1_1x1"),
    ("maxvit", "conv.conv3_1x1"),
    ("maxvit", "conv.shortcut.expand"),
    ("maxvit", "conv.se.fc1"),
    ("maxvit", "attn_block.attn.qkv"),
    ("maxvit", "attn_block.attn.proj"),
    ("maxvit", "attn_block.mlp.fc1"),
    ("maxvit", "attn_grid.mlp.fc2"),
    ("davit_spatial", "attn.qkv"),
    ("davit_spatial", "attn.proj"),
    ("davit_spatial", "mlp.fc1"),
    ("davit_spatial", "mlp.fc2"),
    ("davit_channel", "attn.qkv"),
    ("davit_channel", "attn.proj"),
    ("davit_channel", "mlp.fc1"),
    ("davit_channel", "mlp.fc2"),
    ("focalnet", "modulation.f"),
    ("focalnet", "modulation.h"),
    ("focalnet", "modulation.proj"),
    ("focalnet", "mlp.fc1"),
    ("focalnet", "mlp.fc2"),
]
# Layers with weights that only a hook is put on.
HOOKED = WRAPPABLE + [
    ("maxvit", "conv.pre_norm"),
    ("maxvit", "conv.norm1"),
    ("maxvit", "conv.conv2_kxk"),
    ("maxvit", "conv.norm2"),
    ("davit_spatial", "cpe1.proj"),
    ("davit_channel", "cpe2.proj"),
    ("focalnet", "modulation.focal_layers.0.0"),
]


def _setup(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    build, shape = BLOCKS[name]
    return build().eval(), torch.randn(*shape)


def _replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(block.get_submodule(parent), child, module)


class _LoRA(nn.Module):
    """base(x) plus a low-rank term, for a Linear ((..., C_in) inputs) or a 1x1 conv ((B, C_in, H, W) inputs)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int = 2):
        super().__init__()
        self.base = base
        c_out, c_in = base.weight.shape[:2]
        self.down = nn.Parameter(torch.randn(rank, c_in) * 0.3)
        self.up = nn.Parameter(torch.randn(c_out, rank) * 0.3)

    def delta(self) -> torch.Tensor:
        return self.up @ self.down  # (C_out, C_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Conv2d):
            return self.base(x) + torch.einsum("oc,bchw->bohw", self.delta(), x)
        return self.base(x) + F.linear(x, self.delta())

    def merged(self) -> nn.Module:
        """The plain layer computing the same function."""
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight += self.delta().view_as(out.weight)
        return out


@pytest.mark.parametrize(("name", "path"), HOOKED)
def test_forward_hook_is_called_in_eval_under_no_grad(name, path):
    block, x = _setup(name)
    layer = block.get_submodule(path)
    with torch.no_grad():
        expected = block(x)
    calls = []
    handle = layer.register_forward_hook(lambda module, inputs, output: calls.append(module))
    with torch.no_grad():
        out = block(x)
    handle.remove()
    assert calls and all(module is layer for module in calls)
    # The hooked layer ran unfused, the rest fused: the same block output.
    assert _rel_err(out, expected) <= 1e-5

    # A hook that returns a value replaces the layer's output in the block.
    handle = layer.register_forward_hook(lambda module, inputs, output: output * 1.5)
    with torch.no_grad():
        changed = block(x)
    handle.remove()
    assert _rel_err(changed, expected) > 1e-3


@pytest.mark.parametrize(("name", "path"), WRAPPABLE)
def test_wrapped_layer_changes_the_eval_output_as_its_merged_weights_do(name, path):
    block, x = _setup(name)
    with torch.no_grad():
        base = block(x)
        lora = _LoRA(block.get_submodule(path))
        merged = copy.deepcopy(block)
        _replace(merged, path, lora.merged())
        _replace(block, path, lora)
        out, expected = block(x), merged(x)
    assert _rel_err(out, base) > 1e-3
    assert _rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("name", list(BLOCKS))
def test_global_forward_hook_sees_every_layer_with_weights(name):
    block, x = _setup(name)
    layers = {m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d))}
    seen = set()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: seen.add(module))
    try:
        with torch.no_grad():
            block(x)
    finally:
        handle.remove()
    # A global hook leaves no layer plain, so each is called, ChannelBlock's projection (folded into the attention
    # weights when plain) included.
    assert layers <= seen


@pytest.mark.parametrize("name", ["maxvit", "focalnet"])
def test_the_one_forward_compiles_to_one_graph(name):
    # Under compilation the ops take the plain path (Dynamo traces the module calls; Inductor fuses).
    block, x = _setup(name)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        assert _rel_err(compiled(x), block(x)) <= 1e-5


def test_cross_shaped_projection_hooked_or_wrapped_is_called():
    # CSWin's split projection reads the fused qkv weight directly; a hook or a wrapper must still see the call.
    from zoo.blocks.cross_shaped import CrossShapedWindowAttention

    attn = CrossShapedWindowAttention(32, num_heads=4, split_size=2).eval()
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        plain = attn(x)
        calls = []
        handle = attn.qkv.register_forward_hook(lambda *_: calls.append(1))
        torch.testing.assert_close(attn(x), plain)
        handle.remove()
        assert calls == [1]
        lora = _LoRA(attn.qkv)
        attn.qkv = lora
        wrapped = attn(x)
        attn.qkv = lora.merged()
        torch.testing.assert_close(wrapped, attn(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(wrapped, plain, atol=1e-4)
