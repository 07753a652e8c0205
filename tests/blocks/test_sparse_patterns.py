"""Video sparse-attention patterns (GNA, STA, Radial) as tables of the block-sparse op: each builder against a
direct token-level statement of its paper's definition, and attention under each pattern equal, on every
backend of the op, to dense attention under the pattern's token mask."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from zoo.blocks.sparse_patterns import (
    neighborhood_pattern,
    pattern_at_density,
    radial_pattern,
    sliding_tile_pattern,
    vmoba_attention,
    vmoba_chunk,
    vmoba_selection,
)


def _neighborhood_by_definition(grid, window, stride) -> torch.Tensor:
    """(L, L) mask from NATTEN's definition, token by token: along each axis a query's window starts at
    its stride group's centre minus half the window, shifted inward to fit the axis."""

    def start(p, n, k, s):
        centre = min(p // s * s + s // 2, n - 1)
        return min(max(centre - k // 2, 0), n - k)

    cells = list(itertools.product(*(range(n) for n in grid)))
    mask = torch.zeros(len(cells), len(cells), dtype=torch.bool)
    for i, qc in enumerate(cells):
        lo = [start(p, n, k, s) for p, n, k, s in zip(qc, grid, window, stride, strict=True)]
        for j, kc in enumerate(cells):
            mask[i, j] = all(a <= c < a + k for a, c, k in zip(lo, kc, window, strict=True))
    return mask


@pytest.mark.parametrize(
    "grid, tile, window, stride",
    [
        ((4, 6, 6), (2, 2, 2), (2, 6, 2), None),
        ((4, 6, 8), (1, 2, 2), (3, 2, 6), (1, 2, 2)),
        ((6, 6, 6), (2, 2, 2), (6, 2, 6), (2, 6, 2)),
        ((3, 9, 3), (1, 3, 1), (1, 9, 3), (3, 3, 1)),
    ],
)
def test_neighborhood_follows_the_definition(grid, tile, window, stride):
    pattern = neighborhood_pattern(grid, tile, window, stride)
    expected = _neighborhood_by_definition(grid, window, stride or tile)
    assert torch.equal(pattern.token_mask(), expected)
    assert pattern.density() == pytest.approx(expected.float().mean().item())


def test_sliding_tile_lists_the_window_of_tiles_around_each_tile():
    pattern = sliding_tile_pattern((6, 8, 8), (2, 2, 2), (3, 3, 3))
    assert pattern.block_q == pattern.block_k == 8
    assert pattern.kv_index.shape == (1, 1, 3 * 4 * 4, 27)
    # Tile (1, 1, 1) is interior: its window is the 3 x 3 x 3 tiles around it.
    row = set(pattern.kv_index[0, 0, (1 * 4 + 1) * 4 + 1].tolist())
    assert row == {(t * 4 + h) * 4 + w for t in range(3) for h in range(3) for w in range(3)}
    # A corner tile's window is shifted inward, not cut: still 27 tiles, all distinct.
    assert len(set(pattern.kv_index[0, 0, 0].tolist())) == 27


def _radial_by_definition(grid, block, decay_factor, model) -> torch.Tensor:
    """The authors' block mask, frame pair by frame pair: the token mask of the pair, then the block rule."""
    t, h, w = grid
    per_frame = h * w
    length = t * per_frame
    token = torch.zeros(length, length, dtype=torch.bool)
    for i in range(t):
        for j in range(t):
            rows = slice(i * per_frame, (i + 1) * per_frame)
            cols = slice(j * per_frame, (j + 1) * per_frame)
            if j == 0:  # the first frame is everyone's attention sink
                token[rows, cols] = True
                continue
            dist = abs(i - j)
            scale = 2 ** per_frame.bit_length()
            undecayed = scale / 2 ** dist.bit_length()
            if (model == "wan" and dist < 1) or (model == "hunyuan" and dist <= 1):
                width = per_frame
            elif model == "wan" and dist == 1:
                width = per_frame // 2
            else:
                width = max(undecayed * decay_factor, block)
            if undecayed < block and dist % int(block / undecayed):
                continue  # a frame pair dropped by the temporal split
            pos = torch.arange(per_frame)
            token[rows, cols] = (pos[:, None] - pos[None, :]).abs() <= width
    blocks = length // block
    out = torch.zeros(blocks, blocks, dtype=torch.bool)
    for a in range(blocks):
        for b in range(blocks):
            cols = token[a * block : (a + 1) * block, b * block : (b + 1) * block].float().mean(0)
            reached, high = int((cols > 0).sum()), int((cols > 1 / 3).sum())
            out[a, b] = high > 0.6 * reached
    return out


@pytest.mark.parametrize("model", ["wan", "hunyuan"])
@pytest.mark.parametrize("decay_factor", [1.0, 0.5])
def test_radial_follows_the_definition(model, decay_factor):
    # 9 frames of 8 x 8 tokens, blocks of 16: widths shrink to one block and far frames thin out.
    grid, block = (9, 8, 8), 16
    pattern = radial_pattern(grid, block, decay_factor, model)
    expected = _radial_by_definition(grid, block, decay_factor, model)
    assert torch.equal(pattern.block_mask, expected)
    assert 0.2 < pattern.density() < 0.9  # sparse, and not trivially so


def test_radial_density_falls_with_temporal_distance():
    # 16 frames of 64 tokens in blocks of 16: frame f holds blocks 4f .. 4f + 3.
    mask = radial_pattern((16, 8, 8), block=16, decay_factor=1.0).block_mask.float()
    near, far = mask[8:12, 12:16].mean(), mask[8:12, 56:60].mean()  # frame 2 to frame 3, and to frame 14
    assert near > far
    assert mask[:, 0:4].all()  # every query reaches the first frame, the attention sink


@pytest.mark.parametrize("backend", ["reference", "gather", "masked", "flex", "triton"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: sliding_tile_pattern((4, 8, 8), (2, 4, 4), (1, 1, 1)),
        lambda: neighborhood_pattern((4, 8, 8), (1, 4, 4), (3, 4, 4), (3, 4, 4)),
        lambda: radial_pattern((8, 4, 8), block=32, decay_factor=0.5),
    ],
    ids=["sta", "gna", "radial"],
)
def test_attention_under_the_pattern_on_every_backend(make, backend, monkeypatch):
    monkeypatch.setenv("ZOO_KERNELS", backend)
    pattern = make()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 16) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.token_mask())
    with torch.no_grad():
        out = pattern.attend(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gradients_under_a_pattern_equal_masked_dense():
    pattern = neighborhood_pattern((4, 8, 8), (1, 4, 4), (3, 4, 4))
    q, k, v = (torch.randn(1, 2, 256, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grads = torch.autograd.grad(pattern.attend(q, k, v).square().sum(), (q, k, v))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.token_mask())
    for got, want in zip(grads, torch.autograd.grad(dense.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "name, grid, tile, low, high",
    [
        ("sta", (8, 12, 16), (2, 4, 4), 0.15, 0.5),
        ("neighborhood", (8, 12, 16), (2, 4, 4), 0.15, 0.5),
        # Radial's density is set by the video's length (O(n log n)): on 16 frames the decay factor moves it
        # between about 0.63 and 0.86.
        ("radial", (16, 8, 8), (1, 4, 4), 0.65, 0.85),
    ],
)
def test_pattern_at_density_approaches_the_target(name, grid, tile, low, high):
    sparse, dense = (pattern_at_density(name, grid, d, tile=tile) for d in (low, high))
    assert sparse.density() < dense.density()
    assert abs(sparse.density() - low) < 0.1 and abs(dense.density() - high) < 0.1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: neighborhood_pattern((4, 6, 6), (2, 4, 2), (2, 4, 2)), "multiple of the tile"),
        (lambda: neighborhood_pattern((4, 8, 8), (2, 2, 2), (4, 2, 2)), "odd multiples of the tile"),
        (lambda: neighborhood_pattern((4, 8, 8), (2, 2, 2), (2, 2, 2), (2, 4, 2)), "stride"),
        (lambda: sliding_tile_pattern((4, 8, 8), (2, 2, 2), (1, 1.5, 1)), "window_tiles"),
        (lambda: radial_pattern((4, 8, 8), decay_factor=float("nan")), "decay_factor"),
        (lambda: radial_pattern((4, 8, 8), model="mochi"), "model must be one of"),
        (lambda: pattern_at_density("moba", (4, 8, 8), 0.3), "name must be one of"),
        (lambda: pattern_at_density("sta", (4, 8, 8), 0.0), "density must lie in"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_wrong_sequence_length_is_named():
    pattern = sliding_tile_pattern((2, 4, 4), (1, 2, 2), (1, 1, 1))
    q = torch.randn(1, 1, 30, 8)
    with pytest.raises(ValueError, match=r"\(2, 4, 4\) = 32 tokens"):
        pattern.attend(q, q, q)


def _vmoba_by_definition(q, k, v, grid, chunk_shape, threshold, scope):
    """VMoBA written from its definition, query by query: chunks of the tiled grid, scores against mean keys,
    min-max normalisation, own chunk plus the best others up to the threshold; masked dense attention."""
    t, h, w = grid
    ct, ch, cw = chunk_shape
    cells = list(itertools.product(range(t), range(h), range(w)))
    chunk_of = torch.tensor([((a // ct) * (h // ch) + b // ch) * (w // cw) + c // cw for a, b, c in cells])
    count = int(chunk_of.max()) + 1
    out = torch.empty_like(v)
    for bi in range(q.shape[0]):
        for hi in range(q.shape[1]):
            means = torch.stack([k[bi, hi, chunk_of == c].mean(0) for c in range(count)])
            gate = q[bi, hi] @ means.T  # (L, C)
            if scope == "query_head":
                low, high = gate.amin(1, keepdim=True), gate.amax(1, keepdim=True)
            else:
                low, high = gate.min(), gate.max()
            norm = (gate - low) / torch.where(high - low <= 1e-6, torch.ones_like(high - low), high - low)
            own = torch.nn.functional.one_hot(chunk_of, count).bool()
            chosen = own.clone()
            if scope == "query_head":
                for i in range(len(cells)):
                    total = float(norm[i].sum())
                    need = max(0.0, threshold - float(norm[i][own[i]].sum()) / (total + 1e-6))
                    others = sorted(((float(norm[i, c]), c) for c in range(count) if c != chunk_of[i]), reverse=True)
                    run = 0.0
                    for value, c in others:
                        chosen[i, c] = True
                        run += value
                        if run / (total + 1e-6) >= need:
                            break
            else:
                total = float(norm.sum())
                need = max(0.0, threshold - float(norm[own].sum()) / (total + 1e-6))
                others = sorted(
                    ((float(norm[i, c]), i, c) for i in range(len(cells)) for c in range(count) if not own[i, c]),
                    reverse=True,
                )
                run = 0.0
                for value, i, c in others:
                    chosen[i, c] = True
                    run += value
                    if run / (total + 1e-6) >= need:
                        break
            mask = chosen[:, chunk_of]  # (L, L)
            out[bi, hi] = F.scaled_dot_product_attention(q[bi, hi], k[bi, hi], v[bi, hi], attn_mask=mask)
    return out


@pytest.mark.parametrize("layer, scope", [(0, "query_head"), (1, "query_head"), (2, "query_head"), (2, "head_global")])
def test_vmoba_follows_the_definition(layer, scope):
    grid = (4, 8, 8)
    torch.manual_seed(layer)
    q, k, v = (torch.randn(1, 2, 256, 8, dtype=torch.float64) for _ in range(3))
    out, density = vmoba_attention(q, k, v, grid, layer=layer, chunk=(2, 4, 4), threshold=0.4, scope=scope)
    expected = _vmoba_by_definition(q, k, v, grid, vmoba_chunk(grid, layer, (2, 4, 4)), 0.4, scope)
    torch.testing.assert_close(out, expected)
    # Two 1-D chunks leave no choice (own plus the other: dense); the 3-D partition's eight do.
    assert float(density) == 1.0 if layer == 0 else 0.0 < float(density) < 1.0


def test_vmoba_partitions_cycle_and_topk_keeps_own_chunk():
    grid = (4, 8, 8)
    assert [vmoba_chunk(grid, i, (2, 4, 4)) for i in range(4)] == [(2, 8, 8), (4, 4, 4), (2, 4, 4), (2, 8, 8)]
    q, k = torch.randn(1, 1, 256, 8), torch.randn(1, 1, 256, 8)
    chosen = vmoba_selection(q, k, 32, select="topk", topk=3)
    assert chosen.shape == (1, 1, 256, 8) and bool((chosen.sum(-1) == 3).all())
    assert bool(chosen[0, 0, torch.arange(256), torch.arange(256) // 32].all())  # own chunk always in


@pytest.mark.parametrize("backend", ["reference", "gather", "masked", "triton"])
def test_vmoba_is_the_same_on_every_backend(backend, monkeypatch):
    q, k, v = (torch.randn(1, 2, 128, 8) for _ in range(3))
    monkeypatch.setenv("ZOO_KERNELS", "reference")
    expected, _ = vmoba_attention(q, k, v, (2, 8, 8), layer=2, chunk=(1, 4, 4))
    monkeypatch.setenv("ZOO_KERNELS", backend)
    out, _ = vmoba_attention(q, k, v, (2, 8, 8), layer=2, chunk=(1, 4, 4))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_vmoba_bad_arguments_are_named():
    q = torch.randn(1, 1, 128, 8)
    with pytest.raises(ValueError, match="select must be one of"):
        vmoba_attention(q, q, q, (2, 8, 8), select="best")
    with pytest.raises(ValueError, match="threshold must lie in"):
        vmoba_attention(q, q, q, (2, 8, 8), threshold=1.5)
    with pytest.raises(ValueError, match="must be a multiple of layer 2's chunk"):
        vmoba_attention(q, q, q, (2, 8, 8), layer=2, chunk=(1, 3, 3))
