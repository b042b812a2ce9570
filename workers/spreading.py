"""Spreading scattered Fourier samples onto a periodic Cartesian grid: the gridding step of a
type-1 non-uniform FFT, as a sparse matrix that `embedding_bag` applies.

Kaiser-Bessel kernel of `width` cells with Beatty et al.'s shape for the grid's oversampling
(IEEE TMI 24(6), 2005), and its closed-form Fourier transform for the deapodisation that follows
the inverse FFT. The matrix is built in torch on the target device with int32 indices and
bounded temporaries; `embedding_bag` is a fused multithreaded gather-and-sum on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Samples placed per step of the matrix build: bounds its temporaries (~30 bytes a sample).
_BUILD_SAMPLES = 1 << 21
# Samples of the kernel's table (linear interpolation between them).
_KERNEL_TABLE = 4097


def kaiser_bessel(distance: torch.Tensor, width: int, beta: float) -> torch.Tensor:
    """The Kaiser-Bessel kernel I0(beta sqrt(1 - (2 d / width)^2)) - 1, zero for |d| >= width/2.

    The - 1 makes it continuous at its edge. With the jump, a sample lying on a grid line meets
    the grid asymmetrically (its taps start at ceil(g - width / 2)), a Hermitian set of samples
    no longer spreads to a Hermitian grid, and real data come back with an imaginary part
    (which, for gridding FBP, is the other slice of a pair). Interpolated from a table
    (relative error about float32's resolution): torch's I0 is scalar code, much slower than its
    exp.
    """
    t = torch.linspace(0, 1, _KERNEL_TABLE, dtype=torch.float64, device=distance.device)
    table = (torch.special.i0(beta * (1 - t * t).clamp(min=0).sqrt()) - 1).to(distance.dtype)
    position = (2 / width * distance.abs()).clamp(max=1) * (_KERNEL_TABLE - 1)
    index = position.long().clamp(max=_KERNEL_TABLE - 2)
    return torch.lerp(table[index], table[index + 1], position - index)


def kaiser_bessel_transform(frequency: torch.Tensor, width: int, beta: float) -> torch.Tensor:
    """Continuous Fourier transform of `kaiser_bessel` at `frequency` (cycles per grid cell)."""
    arg = beta**2 - (math.pi * width * frequency) ** 2
    root = arg.abs().sqrt().clamp(min=1e-12)
    kernel = width * torch.where(arg >= 0, torch.sinh(root), torch.sin(root)) / root
    return kernel - width * torch.sinc(width * frequency)  # the transform of the - 1


def kernel_beta(width: int, oversampling: float) -> float:
    """Beatty et al.'s kernel shape for `width` cells on a grid oversampled `oversampling` times."""
    return math.pi * math.sqrt((width / oversampling) ** 2 * (oversampling - 0.5) ** 2 - 0.8)


@dataclass(frozen=True)
class SpreadingMatrix:
    """Grid point <- sample weights in CSR form, as `embedding_bag` takes them: bag g (grid point
    g = row * grid + col) sums `weights[k] * table[indices[k]]` over k in its offsets range.

    The weights carry (-1)^(row + col): the grid's inverse FFT then comes out shifted by half
    the grid each way, so an image centred on the grid's origin is a contiguous crop of it.
    Immutable once built; safe to share between threads.
    """

    grid: int
    indices: torch.Tensor  # (entries,) int32 sample
    weights: torch.Tensor  # (entries,) float32
    offsets: torch.Tensor  # (grid * grid,) int32 first entry of each bag

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.weights, self.offsets))

    @classmethod
    def build(
        cls, g_row: torch.Tensor, g_col: torch.Tensor, grid: int, width: int, beta: float
    ) -> SpreadingMatrix:
        """`g_row`, `g_col`: (samples,) float64 positions in cells of the periodic grid.

        A sample's taps are the `width` grid lines from ceil(g - width / 2) on, each way, and its
        "cell" is its first tap. Bag (r, c) lists, tap offset by tap offset (tr, tc), the samples
        of cell (r - tr, c - tc) in cell order, so each entry's place in the CSR arrays follows
        from cell counts alone: entries are scattered straight there, with no sort of entries
        and temporaries of O(grid^2 + samples).
        """
        device, samples = g_row.device, len(g_row)
        if samples * width * width >= 2**31:
            raise ValueError(f"{samples} samples x {width}^2 taps overflow int32 indices")

        def taps(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # (samples, width) int32 grid lines and their weights, times (-1)^line
            unwrapped = torch.ceil(g - width / 2)[:, None] + torch.arange(width, device=device)
            line = unwrapped.long().remainder(grid)
            weight = kaiser_bessel((g[:, None] - unwrapped).float(), width, beta)
            return line.int(), weight * (1 - 2 * (line % 2))

        row, weight_row = taps(g_row)
        col, weight_col = taps(g_col)
        # samples in cell order from here on: consecutive samples then fill neighbouring bags,
        # so the scattered writes below walk the arrays instead of jumping about them
        order = torch.argsort(row[:, 0].long() * grid + col[:, 0], stable=True)
        row, col, weight_row, weight_col = (t[order] for t in (row, col, weight_row, weight_col))
        cell = row[:, 0].long() * grid + col[:, 0]
        count = torch.bincount(cell, minlength=grid * grid)
        rank = (torch.arange(samples, device=device) - (count.cumsum(0) - count)[cell]).int()
        # bag (r, c) takes, at tap offset (tr, tc), the samples of cell (r - tr, c - tc)
        count = count.view(grid, grid).int()
        size = torch.zeros(grid * grid, dtype=torch.int64, device=device)
        for tr in range(width):
            for tc in range(width):
                size += count.roll((tr, tc), (0, 1)).flatten()
        offsets = (size.cumsum(0) - size).int()
        indices = torch.empty(samples * width * width, dtype=torch.int32, device=device)
        weights = torch.empty(samples * width * width, dtype=torch.float32, device=device)
        before, sample = offsets.clone(), order.int()  # next free entry of each bag
        for tr in range(width):
            for tc in range(width):
                for s0 in range(0, samples, _BUILD_SAMPLES):
                    s1 = min(samples, s0 + _BUILD_SAMPLES)
                    bag = row[s0:s1, tr] * grid + col[s0:s1, tc]
                    where = (before[bag] + rank[s0:s1]).long()
                    indices.scatter_(0, where, sample[s0:s1])
                    weights.scatter_(0, where, weight_row[s0:s1, tr] * weight_col[s0:s1, tc])
                before += count.roll((tr, tc), (0, 1)).flatten()
        return cls(grid, indices, weights, offsets)

    def spread(self, table: torch.Tensor) -> torch.Tensor:
        """(samples, channels) float32 rows -> (grid * grid, channels) float32 grid."""
        return F.embedding_bag(
            self.indices, table, self.offsets, mode="sum", per_sample_weights=self.weights
        )
