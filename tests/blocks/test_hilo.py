"""HiLo attention, ConvFFN and deformable token merging against straightforward references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.blocks.hilo import HiLoAttention

from zoo.models.litv2 import ConvFFN, DeformableTokenMerging


def _attend(q, k, v, heads, scale):
    """Multi-head attention with the heads laid out along the last dim: q (Lq, C), k/v (Lk, C) -> (Lq, C)."""
    d = q.shape[-1] // heads
    out = [
        torch.softmax(scale * q[:, i * d : (i + 1) * d] @ k[:, i * d : (i + 1) * d].T, -1) @ v[:, i * d : (i + 1) * d]
        for i in range(heads)
    ]
    return torch.cat(out, dim=-1)


def _reference(m: HiLoAttention, x: torch.Tensor) -> torch.Tensor:
    """The official HiLo forward of its detection backbone, image by image, window by window."""
    _, h, w, _ = x.shape
    s = m.window_size
    xp = F.pad(x, (0, 0, 0, (s - w % s) % s, 0, (s - h % s) % s))
    hp, wp = xp.shape[1:3]
    outs = []
    for img in xp:
        parts = []
        if m.hi_heads:
            q, k, v = m.hi_qkv(img).split(m.hi_dim, dim=-1)
            hi = torch.zeros(hp, wp, m.hi_dim, dtype=x.dtype)
            for i in range(0, hp, s):
                for j in range(0, wp, s):
                    win = [t[i : i + s, j : j + s].reshape(-1, m.hi_dim) for t in (q, k, v)]
                    hi[i : i + s, j : j + s] = _attend(*win, m.hi_heads, m.scale).reshape(s, s, -1)
            parts.append(m.hi_proj(hi))
        if m.lo_heads:
            pooled = F.avg_pool2d(img.permute(2, 0, 1)[None], s)[0].permute(1, 2, 0) if s > 1 else img
            k, v = m.lo_kv(pooled.reshape(-1, img.shape[-1])).split(m.lo_dim, dim=-1)
            lo = _attend(m.lo_q(img.reshape(-1, img.shape[-1])), k, v, m.lo_heads, m.scale)
            parts.append(m.lo_proj(lo.reshape(hp, wp, -1)))
        outs.append(torch.cat(parts, dim=-1)[:h, :w])
    return torch.stack(outs)


@pytest.mark.parametrize(
    "heads, window, alpha, size",
    [
        (4, 2, 0.5, (6, 8)),  # both paths
        (4, 2, 0.9, (7, 5)),  # int(4 * 0.9) = 3 Lo-Fi heads; odd sizes padded bottom/right
        (4, 1, 0.9, (5, 6)),  # s = 1: all heads Lo-Fi over unpooled keys
        (4, 3, 0.0, (7, 7)),  # Hi-Fi only
        (4, 2, 1.0, (5, 9)),  # Lo-Fi only, pooled
    ],
)
def test_matches_reference(heads, window, alpha, size):
    torch.manual_seed(0)
    m = HiLoAttention(16, heads, window_size=window, alpha=alpha).double().eval()
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "heads, window, alpha, lo, hi",
    [(12, 2, 0.9, 10, 2), (16, 2, 0.9, 14, 2), (24, 1, 0.9, 24, 0), (6, 2, 0.5, 3, 3), (8, 4, 0.0, 0, 8)],
)
def test_head_split_follows_official(heads, window, alpha, lo, hi):
    m = HiLoAttention(heads * 8, heads, window_size=window, alpha=alpha)
    assert (m.lo_heads, m.hi_heads) == (lo, hi)
    assert hasattr(m, "hi_qkv") == (hi > 0) and hasattr(m, "lo_q") == (lo > 0)


def test_hifi_is_local_to_its_window():
    """With only Hi-Fi heads a token's change stays inside its s x s window."""
    m = HiLoAttention(8, 2, window_size=2, alpha=0.0).double().eval()
    x = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    y = x.clone()
    y[0, 2, 3] += 1.0
    with torch.no_grad():
        changed = (m(x) - m(y)).abs().amax(-1)[0] > 1e-12
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[2:4, 2:4] = True
    assert torch.equal(changed, expected)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="divisible"):
        HiLoAttention(10, 4)
    with pytest.raises(ValueError, match="window_size"):
        HiLoAttention(16, 4, window_size=0)
    with pytest.raises(ValueError, match="alpha"):
        HiLoAttention(16, 4, alpha=1.5)


def test_conv_ffn_matches_formula():
    torch.manual_seed(0)
    m = ConvFFN(8, 32).double().eval()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    hidden = m.fc1(x).permute(0, 3, 1, 2)
    hidden = F.conv2d(hidden, m.dwconv.weight, m.dwconv.bias, padding=1, groups=32).permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.fc2(F.gelu(hidden)))


def _merging(dim: int = 4, out_dim: int = 6) -> DeformableTokenMerging:
    torch.manual_seed(0)
    m = DeformableTokenMerging(dim, out_dim).double().eval()
    with torch.no_grad():
        m.norm.running_mean.normal_()
        m.norm.running_var.uniform_(0.5, 2.0)
    return m


def _plain(m: DeformableTokenMerging, x_nchw: torch.Tensor) -> torch.Tensor:
    out = F.conv2d(x_nchw, m.weight, m.bias, stride=2)
    return F.gelu(m.norm(out)).permute(0, 2, 3, 1)


def test_token_merging_starts_as_strided_conv():
    m = _merging()
    x = torch.randn(2, 7, 9, 4, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        assert out.shape == (2, 3, 4, 6)  # floor(H / 2), floor(W / 2)
        torch.testing.assert_close(out, _plain(m, x.permute(0, 3, 1, 2)))


@pytest.mark.parametrize("dy, dx", [(1.0, 0.0), (0.0, -1.0), (0.5, 0.0), (0.0, 0.25)])
def test_token_merging_offsets_are_y_then_x_and_bilinear(dy, dx):
    """Constant offsets (dy, dx) on every tap sample the input shifted by (dy, dx), zero outside the map."""
    m = _merging()
    with torch.no_grad():
        m.offset.bias.copy_(torch.tensor([dy, dx], dtype=torch.float64).repeat(4))
    x = torch.randn(1, 6, 8, 4, dtype=torch.float64)
    img = F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1))  # zeros around the map
    # Bilinear shift by (dy, dx) in [-1, 1]: a blend of the map and its copy moved by one pixel.
    sy, sx = int(torch.tensor(dy).sign()), int(torch.tensor(dx).sign())
    moved = torch.roll(img, shifts=(-sy, -sx), dims=(2, 3))
    shifted = (1 - abs(dy) - abs(dx)) * img + (abs(dy) + abs(dx)) * moved
    with torch.no_grad():
        torch.testing.assert_close(m(x), _plain(m, shifted[:, :, 1:-1, 1:-1]))


def test_token_merging_rejects_tiny_maps():
    with pytest.raises(ValueError, match="at least 2 x 2"):
        _merging()(torch.randn(1, 1, 4, 4, dtype=torch.float64))
