"""Orders of video tokens for block-sparse attention: a block of consecutive tokens should be a compact space-time
neighbourhood, not a strip of one row.

- "gilbert": along a 3-D generalized Hilbert ("Gilbert") curve, as the official PSA code orders video tokens
  (Li et al., arXiv:2512.04025; github.com/ziplab/Pyramid-Sparse-Attention);
- "tiles": tile by tile (t, h, w tiles, partial at the far edges), as the tile-granular patterns of
  `zoo.blocks.sparse_patterns` need;
- "none": row-major, as the tokens come.

Used by PSA (`zoo.blocks.pyramid_sparse`) and the sparse patterns; an order is a permutation, cached per grid.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["REORDERS", "gilbert_curve", "video_token_order"]

REORDERS = ("gilbert", "tiles", "none")


def gilbert_curve(depth: int, height: int, width: int) -> list[tuple[int, int, int]]:
    """The (t, h, w) cells of a depth x height x width grid along a 3-D generalized Hilbert curve.

    Červený's "Gilbert" construction, the curve the official code orders video tokens by: it fills any
    cuboid, and consecutive cells are face neighbours whenever the sides are even (odd sides may force
    one diagonal step). The curve starts along the longest side.
    """
    out: list[tuple[int, int, int]] = []

    def sign(v: int) -> int:
        return (v > 0) - (v < 0)

    def add(*vs):
        return tuple(sum(c) for c in zip(*vs, strict=True))

    def neg(v):
        return tuple(-c for c in v)

    def unit(v):
        return tuple(sign(c) for c in v)

    def length(v) -> int:
        return abs(sum(v))

    def half(v, d, full: int):
        h = tuple(c // 2 for c in v)
        # An odd half would leave an odd sub-box that the curve cannot cross without a diagonal step.
        return add(h, d) if length(h) % 2 and full > 2 else h

    def fill(p, a, b, c) -> None:
        w, h, d = length(a), length(b), length(c)
        da, db, dc = unit(a), unit(b), unit(c)
        if h == 1 and d == 1:
            out.extend(add(p, tuple(i * x for x in da)) for i in range(w))
            return
        if w == 1 and d == 1:
            out.extend(add(p, tuple(i * x for x in db)) for i in range(h))
            return
        if w == 1 and h == 1:
            out.extend(add(p, tuple(i * x for x in dc)) for i in range(d))
            return
        a2, b2, c2 = half(a, da, w), half(b, db, h), half(c, dc, d)
        a_rest, b_rest, c_rest = add(a, neg(a2)), add(b, neg(b2)), add(c, neg(c2))
        a_end, b_back, c_end = add(a, neg(da)), add(b2, neg(db)), add(c, neg(dc))
        if 2 * w > 3 * h and 2 * w > 3 * d:  # long along a: halve a only
            fill(p, a2, b, c)
            fill(add(p, a2), a_rest, b, c)
        elif 3 * h > 4 * d:  # flat in c: split a and b
            fill(p, b2, c, a2)
            fill(add(p, b2), a, b_rest, c)
            fill(add(p, a_end, b_back), neg(b2), c, neg(a_rest))
        elif 3 * d > 4 * h:  # flat in b: split a and c
            fill(p, c2, a2, b)
            fill(add(p, c2), a, b, c_rest)
            fill(add(p, a_end, add(c2, neg(dc))), neg(c2), neg(a_rest), b)
        else:  # split all three
            fill(p, b2, c2, a2)
            fill(add(p, b2), c, a2, b_rest)
            fill(add(p, b_back, c_end), a, neg(b2), neg(c_rest))
            fill(add(p, a_end, b2, c_end), neg(c), neg(a_rest), b_rest)
            fill(add(p, a_end, b_back), neg(b2), c2, neg(a_rest))

    # Cells are (x, y, z) = (w, h, t); the first vector is the longest side (ties: width, then height).
    x, y, z = (width, 0, 0), (0, height, 0), (0, 0, depth)
    if width >= height and width >= depth:
        fill((0, 0, 0), x, y, z)
    elif height >= width and height >= depth:
        fill((0, 0, 0), y, x, z)
    else:
        fill((0, 0, 0), z, x, y)
    return [(t, h, w) for w, h, t in out]


@functools.lru_cache(maxsize=64)
def _token_order(grid: tuple[int, int, int], method: str, tile_size: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = grid
    if method == "gilbert":
        cells = torch.tensor(gilbert_curve(t, h, w), dtype=torch.long)
        return (cells[:, 0] * h + cells[:, 1]) * w + cells[:, 2]
    tt, th, tw = tile_size
    ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    tile = ((ti // tt) * -(-h // th) + hi // th) * -(-w // tw) + wi // tw
    within = ((ti % tt) * th + hi % th) * tw + wi % tw
    return torch.argsort((tile * (tt * th * tw) + within).flatten())


def video_token_order(
    grid: tuple[int, int, int], method: str = "gilbert", tile_size: tuple[int, int, int] = (2, 8, 8)
) -> torch.Tensor:
    """Permutation of the T*H*W row-major video tokens into block order.

    Args:
        grid: (T, H, W) token grid.
        method: "gilbert", "tiles" or "none".
        tile_size: (t, h, w) tile extent for "tiles"; tiles at the far edges may be partial.

    Returns:
        (T*H*W,) int64 CPU tensor `perm`: reordered = x[..., perm, :]; `perm.argsort()` undoes it.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be 3 positive ints (T, H, W), got {grid}")
    if method not in REORDERS:
        raise ValueError(f"method must be one of {REORDERS}, got {method!r}")
    if method == "none":
        return torch.arange(math.prod(grid))
    return _token_order(grid, method, tuple(int(s) for s in tile_size))
