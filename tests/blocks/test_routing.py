"""Bi-Level Routing Attention as a block: routing, attention, LCE and padding."""

import pytest
import torch
from zoo.blocks.routing import BiLevelRoutingAttention, GlobalAttentionLePE, route_regions

from tests.anchors.biformer_official import official_bra


def _official_weights(block: BiLevelRoutingAttention) -> dict[str, torch.Tensor]:
    return {
        "qkv.qkv.weight": block.qkv.weight,
        "qkv.qkv.bias": block.qkv.bias,
        "wo.weight": block.proj.weight,
        "wo.bias": block.proj.bias,
        "lepe.weight": block.lepe.weight,
        "lepe.bias": block.lepe.bias,
    }


@pytest.mark.parametrize("size", [(14, 21), (10, 17)])
def test_bra_matches_official_computation(size):
    block = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4).eval()
    x = torch.randn(2, *size, 64)
    with torch.no_grad():
        out = block(x)
        expected = official_bra(x, _official_weights(block), "", num_heads=2, topk=4)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_routing_picks_most_similar_regions():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    k = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]])
    assert route_regions(q, k, topk=2, scale=1.0).tolist() == [[[1, 2], [0, 2]]]


def test_routing_is_not_differentiated():
    block = BiLevelRoutingAttention(32, num_heads=1, n_win=2, topk=2)
    x = torch.randn(1, 4, 4, 32, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match=r"topk must lie in \[1, n_win \*\* 2 = 4\]"):
        BiLevelRoutingAttention(32, num_heads=1, n_win=2, topk=5)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BiLevelRoutingAttention(30, num_heads=4)


def test_global_attention_lepe_uses_input_for_lepe():
    block = GlobalAttentionLePE(16, num_heads=8).eval()
    torch.nn.init.zeros_(block.qkv.weight)  # uniform attention over zero values -> output is proj(lepe(x))
    x = torch.randn(1, 5, 6, 16)
    with torch.no_grad():
        lepe = block.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(block(x), block.proj(lepe))


def test_projection_hooks_are_called_in_inference():
    # The projections run through the fused pointwise ops (oneDNN in CPU inference); a hooked Linear is
    # called as it is, and what the hook returns is what the mixer uses.
    from zoo.blocks.routing import BiLevelRoutingAttention

    attn = BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=2).eval()
    x = torch.randn(1, 8, 8, 32)
    calls = []
    with torch.no_grad():
        plain = attn(x)
        attn.qkv.register_forward_hook(lambda *_: calls.append("qkv"))
        attn.proj.register_forward_hook(lambda mod, inp, out: out * 0)
        out = attn(x)
    assert calls == ["qkv"] and plain.abs().max() > 0 and not out.any()
