"""PSA's attention as a translation to block-sparse attention: full density is dense attention, a pooled level
is attention to group means, mixed levels equal PSA's definition written out (a masked dense form), on every
backend; it is differentiable, and its inputs are checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.blocks.pyramid_sparse import POOL_FACTORS, pyramid_sparse_attention

BQ, BK = 8, 16
LEVELS = (0, *POOL_FACTORS)


def _psa_by_definition(q, k, v, levels, block_q, block_k, scale):
    """PSA from the paper's definition, block pair by block pair: the keys and values of a key block at
    factor f replaced by their means over groups of f tokens (real tokens only), each logit raised by
    log(tokens in its group), one softmax per query over everything its block keeps."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    out = q.new_zeros(b, h, lq, v.shape[-1])
    for i in range(levels.shape[2]):
        rows = slice(i * block_q, min(lq, (i + 1) * block_q))
        for bi in range(b):
            for hi in range(h):
                keys, values, logbias = [], [], []
                for j in range(levels.shape[3]):
                    f = int(levels[bi, hi, i, j])
                    if f == 0:
                        continue
                    for g in range(j * block_k, min(lk, (j + 1) * block_k), f):
                        end = min(g + f, lk, (j + 1) * block_k)
                        keys.append(k[bi, hi, g:end].mean(0))
                        values.append(v[bi, hi, g:end].mean(0))
                        logbias.append(torch.tensor(float(end - g), dtype=q.dtype).log())
                if not keys:
                    continue
                logits = scale * q[bi, hi, rows] @ torch.stack(keys).T + torch.stack(logbias)
                out[bi, hi, rows] = logits.softmax(-1) @ torch.stack(values)
    return out


def _qkv(b=2, h=2, lq=37, lk=45, d=8, dv=6, dtype=torch.float64, grad=False):
    q = torch.randn(b, h, lq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, h, lk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, h, lk, dv, dtype=dtype, requires_grad=grad)
    return q, k, v


def _levels(q, k, fill=None, bq=BQ, bk=BK):
    shape = (q.shape[0], q.shape[1], -(-q.shape[2] // bq), -(-k.shape[2] // bk))
    if fill is not None:
        return torch.full(shape, fill, dtype=torch.int64)
    return torch.tensor(LEVELS)[torch.randint(0, len(LEVELS), shape)]


@pytest.mark.parametrize("lq, lk", [(37, 45), (32, 64), (5, 9)])
def test_full_level_is_dense_attention(lq, lk):
    q, k, v = _qkv(lq=lq, lk=lk)
    out = pyramid_sparse_attention(q, k, v, _levels(q, k, fill=1), BQ, BK, scale=0.4)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.4))


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("lk", [48, 45])
def test_pooled_level_is_attention_to_group_means(factor, lk):
    # log(f) on a pooled logit makes a group weigh as its f tokens would if each equalled the group mean;
    # a ragged last group averages (and counts) only its real tokens.
    q, k, v = _qkv(lk=lk)
    group = torch.arange(lk) // factor
    count = torch.bincount(group).to(k.dtype)
    k_mean = torch.zeros(2, 2, int(group.max()) + 1, 8, dtype=k.dtype).index_add_(2, group, k) / count[:, None]
    v_mean = torch.zeros(2, 2, int(group.max()) + 1, 6, dtype=v.dtype).index_add_(2, group, v) / count[:, None]
    expected = F.scaled_dot_product_attention(q, k_mean[:, :, group], v_mean[:, :, group])
    out = pyramid_sparse_attention(q, k, v, _levels(q, k, fill=factor), BQ, BK)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["reference", "gather", "masked", "flex", "triton"])
def test_mixed_levels_follow_the_definition_on_every_backend(backend, monkeypatch):
    monkeypatch.setenv("ZOO_KERNELS", backend)
    q, k, v = _qkv(dtype=torch.float32)
    levels = _levels(q, k)
    levels[0, 1, 2] = 0  # a query block that skips everything
    expected = _psa_by_definition(q, k, v, levels, BQ, BK, 0.3)
    with torch.no_grad():
        out = pyramid_sparse_attention(q, k, v, levels, BQ, BK, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, 1, 2 * BQ : 3 * BQ], torch.zeros(BQ, 6, dtype=out.dtype))


def test_all_skipped_gives_zeros():
    q, k, v = _qkv()
    assert torch.equal(
        pyramid_sparse_attention(q, k, v, _levels(q, k, fill=0), BQ, BK), torch.zeros(2, 2, 37, 6).double()
    )


def test_gradcheck_float64():
    # Two query blocks (one ragged) against three key blocks (the last holds one token) at every level.
    q, k, v = _qkv(b=1, h=1, lq=9, lk=17, d=2, dv=2, grad=True)
    levels = torch.tensor([[[[1, 2, 8], [4, 0, 1]]]])
    assert torch.autograd.gradcheck(lambda q, k, v: pyramid_sparse_attention(q, k, v, levels, 8, 8, 0.5), (q, k, v))


def test_float32_close_to_float64():
    q, k, v = _qkv()
    levels = _levels(q, k)
    out32 = pyramid_sparse_attention(q.float(), k.float(), v.float(), levels, BQ, BK)
    torch.testing.assert_close(out32, pyramid_sparse_attention(q, k, v, levels, BQ, BK).float(), atol=1e-5, rtol=1e-5)


def test_bfloat16_runs_its_softmax_in_float32():
    q, k, v = _qkv(dtype=torch.float32)
    levels = _levels(q, k)
    out = pyramid_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), levels, BQ, BK)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), pyramid_sparse_attention(q, k, v, levels, BQ, BK), atol=3e-2, rtol=3e-2)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(b=1, lq=17, lk=40)
    levels = _levels(q, k)
    torch.testing.assert_close(
        pyramid_sparse_attention(q, k, v, levels, BQ, BK), _psa_by_definition(q, k, v, levels, BQ, BK, 8**-0.5)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "q": a["q"][0]}, r"expects q \(B, H, Lq, D\)"),
        (lambda a: {**a, "v": a["v"][:, :, :-1]}, "incompatible shapes"),
        (lambda a: {**a, "k": a["k"].float()}, "share a floating dtype"),
        (lambda a: {**a, "levels": a["levels"][..., :-1]}, "expects levels"),
        (lambda a: {**a, "levels": a["levels"].float()}, "integer"),
        (lambda a: {**a, "levels": a["levels"] * 3}, "values in"),
        (lambda a: {**a, "block_q": 0}, "block_q"),
    ],
)
def test_bad_arguments_raise_value_error(change, message):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, levels=_levels(q, k, fill=1), block_q=BQ, block_k=BK)
    with pytest.raises(ValueError, match=message):
        pyramid_sparse_attention(**change(args))


@pytest.mark.parametrize("lq, lk", [(37, 45), (16, 64)])
def test_triton_path_equals_gather_with_gradients(monkeypatch, lq, lk):
    # The block-sparse Triton kernel (interpreted here, fp32) against the gather path: same output and
    # gradients, with ragged tails, skipped pairs and every pooling factor.
    pytest.importorskip("triton")
    torch.manual_seed(0)
    q, k, v = _qkv(lq=lq, lk=lk, dtype=torch.float32, grad=True)
    levels = _levels(q, k)
    levels[0, 0, 0] = 0  # a query block that skips everything gives zeros
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],))
    results = []
    for backend in ("gather", "triton"):
        monkeypatch.setenv("ZOO_KERNELS", backend)
        out = pyramid_sparse_attention(q, k, v, levels, BQ, BK)
        results.append((out, torch.autograd.grad(out, (q, k, v), grad_out)))
    (want, want_grads), (got, got_grads) = results
    assert set(levels.unique().tolist()) == set(LEVELS)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert not got[0, 0, :BQ].any()
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4)
