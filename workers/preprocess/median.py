"""A running median along the last axis by a selection network: elementwise minima and maxima
over shifted copies of the data, so it vectorises (SIMD on the CPU, one kernel a step on a
GPU) where a median per window (`torch.median` on an unfold) pays a selection per window.

The network is Batcher's merge exchange for `size` inputs (K. E. Batcher, "Sorting networks
and their applications", AFIPS Spring Joint Computer Conference 32:307-314, 1968; D. E. Knuth,
The Art of Computer Programming vol. 3, 5.3.4, algorithm M), a sorting network for any n,
pruned to the compare-exchanges the middle output depends on (and, of each, to the half,
minimum or maximum, that is used later). A sorting network sorts every input if it sorts
every input of 0s and 1s (the 0-1 principle, same section), which the tests check
exhaustively for small windows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from workers.preprocess.arrays import chunk_elements

# Elements per shifted copy at a time: the copies of one chunk stay in the CPU's caches.
_CHUNK_ELEMENTS = 1 << 15
# Above this window a selection per window is cheaper than the network (n log^2 n steps).
_NETWORK_LARGEST = 63


def running_median(data: torch.Tensor, size: int) -> torch.Tensor:
    """Median over `size` (odd) neighbouring elements along the last axis of (..., n), the
    ends reflected (as `F.pad(mode="reflect")`: the edge element is not repeated); n > size//2.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size={size}: a running median needs an odd window")
    half = size // 2
    length = data.shape[-1]
    flat = data.reshape(-1, length)
    padded = F.pad(flat[:, None], (half, half), mode="reflect")[:, 0] if half else flat
    if size > _NETWORK_LARGEST:
        return padded.unfold(1, size, 1).median(dim=-1).values.reshape(data.shape)
    out = torch.empty_like(flat)
    steps = median_network(size)
    rows = max(1, chunk_elements(data.device, _CHUNK_ELEMENTS) // length)
    for r0 in range(0, flat.shape[0], rows):
        part = padded[r0 : r0 + rows]
        wires = [part[:, i : i + length] for i in range(size)]
        for low, high, keep_low, keep_high in steps:
            a, b = wires[low], wires[high]
            if keep_low:
                wires[low] = torch.minimum(a, b)
            if keep_high:
                wires[high] = torch.maximum(a, b)
        out[r0 : r0 + rows] = wires[half]
    return out.reshape(data.shape)


@functools.lru_cache(maxsize=32)
def median_network(size: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The compare-exchanges (low wire, high wire, keep the minimum, keep the maximum) that
    leave the median of `size` inputs on wire size // 2 (see the module docstring)."""
    exchanges = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        exchanges.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed = {size // 2}
    kept = []
    for low, high in reversed(exchanges):
        if low in needed or high in needed:
            kept.append((low, high, low in needed, high in needed))
            needed |= {low, high}
    return tuple(reversed(kept))
