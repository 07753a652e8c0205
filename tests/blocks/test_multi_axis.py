"""Multi-axis attention (MaxViT): relative bias, block/grid attention with padding, TF 'same' convs and pools,
and the fused CPU inference path against the plain one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from zoo.blocks.multi_axis import PartitionAttention, RelativePositionBias2d

from zoo.models.maxvit import MaxViTBlock, TfSameConv2d


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _official_reindexed_bias(table: torch.Tensor) -> torch.Tensor:
    """The official `reindex_2d_einsum_lookup`: one-hot lookups L[i, x, v] = 1{v = x - i + n - 1}, two einsums."""
    heads, vh, vw = table.shape
    h, w = (vh + 1) // 2, (vw + 1) // 2

    def lookup(n: int) -> torch.Tensor:
        out = torch.zeros(n, n, 2 * n - 1, dtype=table.dtype)
        for i in range(n):
            for x in range(n):
                out[i, x, x - i + n - 1] = 1
        return out

    out = torch.einsum("nhw,ixh->nixw", table, lookup(h))
    out = torch.einsum("nixw,jyw->nijxy", out, lookup(w))
    return out.reshape(heads, h * w, h * w)


def test_relative_position_bias_matches_official_lookup():
    rel = RelativePositionBias2d(num_heads=3, size=(3, 5))
    with torch.no_grad():
        rel.relative_position_bias_table.normal_()
    torch.testing.assert_close(rel(), _official_reindexed_bias(rel.relative_position_bias_table.detach()))


def _naive_partition_attention(attn: PartitionAttention, x: torch.Tensor) -> torch.Tensor:
    """Every real token attends to the real tokens of its window / grid cell: full (HW x HW) attention with the
    relative bias inside a group and -inf across groups. x: (B, H, W, C)."""
    b, h, w, c = x.shape
    ph, pw = attn.size
    hp, wp = math.ceil(h / ph) * ph, math.ceil(w / pw) * pw
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    if attn.partition == "block":  # windows of P x P neighbours
        group = (rows // ph) * wp + cols // pw
        pos_r, pos_c = rows % ph, cols % pw
    else:  # G x G tokens spaced Hp / G, Wp / G apart
        sh, sw = hp // ph, wp // pw
        group = (rows % sh) * sw + cols % sw
        pos_r, pos_c = rows // sh, cols // sw
    table = attn.rel_pos.relative_position_bias_table
    bias = table[:, pos_r[None, :] - pos_r[:, None] + ph - 1, pos_c[None, :] - pos_c[:, None] + pw - 1]
    bias = bias.masked_fill(group[None, :] != group[:, None], float("-inf"))
    heads, d = attn.num_heads, attn.head_dim
    q, k, v = F.linear(x.reshape(b, h * w, c), attn.qkv.weight, attn.qkv.bias).view(b, h * w, 3, heads, d).unbind(2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5 + bias
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(b, h, w, c)
    return attn.proj(out)


@pytest.mark.parametrize("partition", ["block", "grid"])
@pytest.mark.parametrize("size", [(6, 9), (7, 10), (2, 5)])
@pytest.mark.parametrize("grad", [False, True])
def test_partition_attention_matches_naive_masked_attention(partition, size, grad):
    torch.manual_seed(0)
    attn = PartitionAttention(16, partition, size=3, head_dim=8).eval()
    with torch.no_grad():
        attn.rel_pos.relative_position_bias_table.normal_()
    x = torch.randn(2, *size, 16, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out, ref = attn(x), _naive_partition_attention(attn, x)
    assert _rel_err(out, ref) <= 1e-5
    if grad:  # the fused kernel's backward, bias table included
        g = torch.randn_like(out)
        params = [x, attn.qkv.weight, attn.rel_pos.relative_position_bias_table]
        for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True):
            assert _rel_err(a, b) <= 1e-5


def _tf_same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (9, 5)])
def test_tf_same_conv_equals_tensorflow_padding(depthwise, stride, size):
    conv = TfSameConv2d(6, 6, 3, stride=stride, groups=6 if depthwise else 1)
    x = torch.randn(2, 6, *size)
    (top, bottom), (left, right) = (_tf_same_pads(n, 3, stride) for n in size)
    ref = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride, groups=conv.groups)
    torch.testing.assert_close(conv(x), ref)
    assert conv(x).shape[-2:] == tuple(math.ceil(n / stride) for n in size)


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_strided_shortcut_pools_like_tensorflow_same(size):
    block = MaxViTBlock(8, 16, stride=2, head_dim=8, window_size=2, grid_size=2)
    x = torch.randn(1, *size, 8)
    pooled = block.conv.shortcut.pool(x.permute(0, 3, 1, 2))
    # TF's 'same' average pooling averages the in-bounds pixels of each 2 x 2 window.
    pad = (0, size[1] % 2, 0, size[0] % 2)
    total = F.avg_pool2d(F.pad(x.permute(0, 3, 1, 2), pad), 2, divisor_override=1)
    count = F.avg_pool2d(F.pad(torch.ones(1, 1, *size), pad), 2, divisor_override=1)
    torch.testing.assert_close(pooled, total / count)


@pytest.mark.parametrize("size", [(14, 14), (9, 13)])
def test_fused_cpu_inference_equals_plain_ops(monkeypatch, size):
    """The oneDNN path (BN folded into convs, GELU and residual adds as post-ops) against the plain modules."""
    torch.manual_seed(0)
    block = MaxViTBlock(16, 32, stride=2, head_dim=8, window_size=3, grid_size=3)
    for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_(1, 0.2)
        bn.bias.data.normal_(0, 0.2)
    block.eval()
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        fused = block(x)
        monkeypatch.setenv("ZOO_CPU_FUSION", "0")
        plain = block(x)
    assert fused.shape == (2, math.ceil(size[0] / 2), math.ceil(size[1] / 2), 32)
    assert _rel_err(fused, plain) <= 1e-5


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="partition must be 'block' or 'grid'"):
        PartitionAttention(16, "swin")
    with pytest.raises(ValueError, match=r"dim \(20\) must be divisible by head_dim \(8\)"):
        PartitionAttention(20, head_dim=8)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        MaxViTBlock(8, 8, stride=3, head_dim=8)
