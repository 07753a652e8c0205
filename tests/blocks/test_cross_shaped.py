"""Cross-shaped window attention: against a window-by-window reference of the official computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.blocks.cross_shaped import CrossShapedWindowAttention


def _reference_branch(q, k, v, win_h, win_w, heads, conv, scale):
    """One official `LePEAttention` branch, window by window: q, k, v (H, W, C) of one image -> (H, W, C).

    Pads q, k, v with zeros split between both sides (the extra row/column at the bottom/right) as the
    official segmentation backbone does, runs attention and LePE in each window, crops.
    """
    h, w, c = q.shape
    pad_h, pad_w = (win_h - h % win_h) % win_h, (win_w - w % win_w) % win_w
    top, left = pad_h // 2, pad_w // 2
    q, k, v = (F.pad(t, (0, 0, left, pad_w - left, top, pad_h - top)) for t in (q, k, v))
    out = torch.zeros_like(q)
    d = c // heads
    for i in range(0, h + pad_h, win_h):
        for j in range(0, w + pad_w, win_w):
            qw, kw, vw = (t[i : i + win_h, j : j + win_w].reshape(-1, c) for t in (q, k, v))
            for head in range(heads):
                sl = slice(head * d, (head + 1) * d)
                attn = torch.softmax(scale * qw[:, sl] @ kw[:, sl].T, dim=-1)
                out[i : i + win_h, j : j + win_w, sl] = (attn @ vw[:, sl]).reshape(win_h, win_w, d)
            v_img = v[i : i + win_h, j : j + win_w].permute(2, 0, 1)[None]
            out[i : i + win_h, j : j + win_w] += conv(v_img)[0].permute(1, 2, 0)
    return out[top : top + h, left : left + w]


def _reference(module: CrossShapedWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The official CSWinBlock mixer: fused qkv, first half of channels in vertical stripes, second half horizontal."""
    b, h, w, c = x.shape
    qkv = module.qkv(x)
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    outs = []
    for n in range(b):
        if module.full_attention:
            outs.append(_reference_branch(q[n], k[n], v[n], h, w, module.num_heads, module.lepe[0], module.scale))
            continue
        half, heads, sw = c // 2, module.num_heads // 2, module.split_size
        parts = [(slice(0, half), h, sw, module.lepe[0]), (slice(half, c), sw, w, module.lepe[1])]
        outs.append(
            torch.cat(
                [
                    _reference_branch(q[n][..., s], k[n][..., s], v[n][..., s], wh, ww, heads, conv, module.scale)
                    for s, wh, ww, conv in parts
                ],
                dim=-1,
            )
        )
    return module.proj(torch.stack(outs))


@pytest.mark.parametrize(
    "size, split, full",
    [
        ((8, 8), 2, False),  # stripes divide the map
        ((7, 10), 3, False),  # both directions padded (odd padding: the extra row/column goes last)
        ((5, 6), 7, False),  # stripe wider than the map
        ((6, 9), 1, False),  # single-row/column stripes (CSWin's first stage)
        ((5, 7), 7, True),  # full attention over a non-square map
    ],
)
def test_matches_windowed_reference(size, split, full):
    torch.manual_seed(0)
    module = CrossShapedWindowAttention(16, 4, split_size=split, full_attention=full).double().eval()
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _reference(module, x), rtol=1e-10, atol=1e-10)


def test_a_token_reaches_only_its_cross():
    """Changing one token changes outputs only in its column band and its row band (LePE included)."""
    torch.manual_seed(0)
    module = CrossShapedWindowAttention(8, 2, split_size=2).double().eval()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[0, 3, 5] += 1.0
    with torch.no_grad():
        changed = (module(x) - module(y)).abs().amax(-1)[0] > 1e-12
    rows = torch.arange(8)[:, None].expand(8, 8)
    cols = torch.arange(8)[None, :].expand(8, 8)
    cross = (rows // 2 == 3 // 2) | (cols // 2 == 5 // 2)
    assert changed[3, 5]
    assert not changed[~cross].any()
    assert changed[cross].float().mean() > 0.9


def test_full_attention_reaches_every_token():
    module = CrossShapedWindowAttention(8, 2, full_attention=True).double().eval()
    x = torch.randn(1, 5, 6, 8, dtype=torch.float64)
    y = x.clone()
    y[0, 0, 0] += 1.0
    with torch.no_grad():
        assert ((module(x) - module(y)).abs().amax(-1) > 1e-12).all()


def test_gradients_flow_to_every_parameter():
    module = CrossShapedWindowAttention(16, 4, split_size=3, attn_drop=0.1).train()
    x = torch.randn(2, 7, 9, 16, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dim, heads, full", [(16, 3, True), (12, 3, False), (16, 4, False)])
def test_bad_configuration_raises(dim, heads, full):
    if (dim, heads) == (16, 4):
        with pytest.raises(ValueError, match="split_size"):
            CrossShapedWindowAttention(dim, heads, split_size=0, full_attention=full)
        return
    with pytest.raises(ValueError, match="divisible"):
        CrossShapedWindowAttention(dim, heads, full_attention=full)
