"""The running median's selection network: exhaustively by the 0-1 principle for small windows,
against numpy's median of each reflected window for the windows the stripe filters use."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from workers.preprocess.median import median_network, running_median


@pytest.mark.parametrize("size", [1, 3, 5, 7, 9, 11, 13])
def test_the_network_selects_the_median_of_every_0_1_input(size: int) -> None:
    inputs = np.array(list(itertools.product([0.0, 1.0], repeat=size))).T
    wires = list(inputs)
    for low, high, keep_low, keep_high in median_network(size):
        a, b = wires[low], wires[high]
        if keep_low:
            wires[low] = np.minimum(a, b)
        if keep_high:
            wires[high] = np.maximum(a, b)
    np.testing.assert_array_equal(wires[size // 2], np.median(inputs, axis=0))


@pytest.mark.parametrize("size", [3, 17, 31, 51, 65])
def test_matches_numpys_median_of_each_reflected_window(size: int) -> None:
    rng = np.random.default_rng(size)
    data = rng.normal(size=(3, 5, 97)).astype(np.float32)
    data[0, 0, 10:20] = 0.5  # ties
    half = size // 2
    padded = np.pad(data, [(0, 0), (0, 0), (half, half)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, size, axis=-1)
    expected = np.median(windows, axis=-1)
    result = running_median(torch.from_numpy(data), size)
    assert result.shape == data.shape and result.dtype == torch.float32
    np.testing.assert_array_equal(result.numpy(), expected)
    with pytest.raises(ValueError, match="odd window"):
        running_median(torch.from_numpy(data), 4)
