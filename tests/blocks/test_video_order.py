"""Video token orders (`zoo.blocks.video_order`): the Gilbert curve and tile order are permutations with compact
blocks."""

from __future__ import annotations

import math

import pytest
import torch
from zoo.blocks.video_order import gilbert_curve, video_token_order


@pytest.mark.parametrize("grid", [(4, 6, 8), (2, 8, 8), (21, 6, 10), (3, 5, 7), (1, 1, 9)])
def test_gilbert_curve_visits_every_cell_once(grid):
    cells = torch.tensor(gilbert_curve(*grid))
    assert cells.shape == (math.prod(grid), 3)
    assert len({tuple(c) for c in cells.tolist()}) == math.prod(grid)
    steps = (cells[1:] - cells[:-1]).abs()
    if all(s % 2 == 0 or s == 1 for s in grid):  # even sides: every step goes to a face neighbour
        assert steps.sum(1).max() == 1
    assert steps.max() == 1  # never jumps


def test_gilbert_blocks_are_compact():
    # 64 consecutive curve cells of an 8x16x16 grid span a small box; 64 row-major cells span a 4-row strip.
    cells = torch.tensor(gilbert_curve(8, 16, 16)).view(-1, 64, 3)
    extent = (cells.amax(1) - cells.amin(1) + 1).prod(-1).float().mean()
    assert extent < 2.5 * 64


@pytest.mark.parametrize("method", ["gilbert", "tiles", "none"])
@pytest.mark.parametrize("grid", [(4, 8, 8), (3, 5, 6)])
def test_token_orders_are_permutations(method, grid):
    perm = video_token_order(grid, method, (2, 4, 4))
    assert torch.equal(perm.sort().values, torch.arange(math.prod(grid)))


def test_tile_order_groups_tiles():
    perm = video_token_order((2, 4, 4), "tiles", (2, 2, 2))
    t, h, w = perm // 16, perm // 4 % 4, perm % 4
    first_tile = torch.stack([t[:8], h[:8], w[:8]], -1)
    assert first_tile.amax(0).tolist() == [1, 1, 1] and first_tile.amin(0).tolist() == [0, 0, 0]


def test_bad_grid_raises_value_error():
    with pytest.raises(ValueError, match="grid"):
        video_token_order((4, 0, 4))
