"""DaViT's dual attention blocks against timm's port of the official ones (NCHW, same parameter names)."""

from __future__ import annotations

import pytest
import torch
from timm.models import davit as timm_davit
from zoo.blocks.dual import ChannelAttention, WindowAttention

from zoo.models.davit import ChannelBlock, SpatialBlock


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    # Non-trivial norms and biases, so that a swapped or ignored parameter shows.
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if name.endswith("bias") or "norm" in name else 0.02))
    return module


def _pair(kind: str, dim: int, heads: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    if kind == "spatial":
        ref = timm_davit.SpatialBlock(dim, heads, window_size=7)
        ours = SpatialBlock(dim, heads, window_size=7)
    else:
        ref = timm_davit.ChannelBlock(dim, heads, qkv_bias=True)
        ours = ChannelBlock(dim, heads, qkv_bias=True)
    _randomize(ref).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


# (kind, C, heads, H, W): sizes that are not multiples of the window pad; for the channel block, both
# the folded (more positions than channels) and the plain form of the attention.
CASES = [
    ("spatial", 32, 4, 14, 21),
    ("spatial", 32, 4, 9, 13),
    ("channel", 32, 4, 9, 13),
    ("channel", 64, 2, 5, 6),
]


@pytest.mark.parametrize(("kind", "dim", "heads", "h", "w"), CASES)
def test_block_matches_timm_forward_and_backward(kind, dim, heads, h, w):
    ref, ours = _pair(kind, dim, heads)
    x = torch.randn(2, dim, h, w)
    with torch.no_grad():  # the fused inference path
        expected = ref(x)
        got = ours(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert _rel_err(expected, got) < 1e-5

    # The autograd path: outputs, input gradients and parameter gradients.
    x_ref, x_ours = x.clone().requires_grad_(), x.permute(0, 2, 3, 1).clone().requires_grad_()
    grad = torch.randn_like(x)
    ref(x_ref).backward(grad)
    out = ours(x_ours)
    out.backward(grad.permute(0, 2, 3, 1))
    assert _rel_err(expected, out.detach().permute(0, 3, 1, 2)) < 1e-5
    assert _rel_err(x_ref.grad, x_ours.grad.permute(0, 3, 1, 2)) < 1e-5
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert _rel_err(ref_grads[name].grad, p.grad) < 1e-4, name


def test_training_mode_with_drop_path_is_stochastic_and_eval_is_not():
    block = SpatialBlock(16, 2, drop_path=0.5)
    x = torch.randn(8, 7, 7, 16)
    block.train()
    torch.manual_seed(1)
    a = block(x)
    torch.manual_seed(2)
    b = block(x)
    assert not torch.allclose(a, b)
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), block(x))


def test_window_attention_pads_and_crops():
    attn = WindowAttention(16, 2, window_size=(4, 6)).eval()
    x = torch.randn(1, 5, 7, 16)
    with torch.no_grad():
        out = attn(x)
    assert out.shape == x.shape
    # Padding is bottom/right with zeros and the crop keeps the top-left: the same map padded by hand
    # gives the same values at the real positions.
    with torch.no_grad():
        tiled = attn(torch.nn.functional.pad(x, (0, 0, 0, 5, 0, 3)))
    torch.testing.assert_close(out, tiled[:, :5, :7])


@pytest.mark.parametrize("cls", [WindowAttention, ChannelAttention])
def test_heads_must_divide_channels(cls):
    with pytest.raises(ValueError, match=r"divisible by num_heads"):
        cls(30, 4)


def test_fused_inference_path_steps_aside_for_flop_counters_and_autocast():
    from torch.utils.flop_counter import FlopCounterMode

    block = SpatialBlock(16, 2).eval()
    x = torch.randn(1, 14, 14, 16)
    counts = []
    for grad in (True, False):  # plain ops / the fused inference path
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            block(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0  # the counter sees the plain ops either way
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the plain ops, with or without grad
        with torch.no_grad():
            inference = block(x)
        torch.testing.assert_close(inference, block(x).detach(), rtol=0, atol=0)
