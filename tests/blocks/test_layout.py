"""Partition helpers: exact inverses, row-major windows, dilated grids."""

import pytest
import torch
from zoo.blocks import grid_partition, grid_reverse, pad_to_multiple, window_partition, window_reverse


def test_window_partition_round_trip_and_order():
    x = torch.arange(2 * 6 * 8 * 3).reshape(2, 6, 8, 3)
    windows = window_partition(x, (3, 4))
    assert windows.shape == (2, 4, 3, 4, 3)
    assert torch.equal(windows[0, 1], x[0, :3, 4:])  # second window: top row, right half
    assert torch.equal(window_reverse(windows, (2, 2)), x)


def test_grid_partition_round_trip_and_dilation():
    x = torch.arange(6 * 8).reshape(1, 6, 8, 1)
    groups = grid_partition(x, (2, 4))
    assert groups.shape == (1, 6, 2, 4, 1)
    assert torch.equal(groups[0, 0, :, :, 0], x[0, ::3, ::2, 0])  # tokens spaced H/gh, W/gw apart
    assert torch.equal(grid_reverse(groups, (6, 8)), x)


def test_pad_to_multiple():
    x = torch.ones(1, 5, 9, 2)
    padded, (pb, pr) = pad_to_multiple(x, (4, 3))
    assert padded.shape == (1, 8, 9, 2) and (pb, pr) == (3, 0)
    assert padded[:, 5:].abs().sum() == 0


def test_indivisible_sizes_are_named():
    with pytest.raises(ValueError, match=r"size \(5, 8\) is not divisible by window \(2, 4\)"):
        window_partition(torch.zeros(1, 5, 8, 1), (2, 4))
    with pytest.raises(ValueError, match="not divisible by grid"):
        grid_partition(torch.zeros(1, 6, 7, 1), (2, 2))
