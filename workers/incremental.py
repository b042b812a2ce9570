"""Incremental FBP: a slice as a sum over blocks of projection angles, added as they arrive.

FBP is linear in the projections: each one is filtered along the detector, weighted by its share
of [0, pi) and back-projected (direct), or spread onto the Fourier grid (gridding), and the slice
is the sum of those contributions (then, for gridding, one inverse 2D FFT and the
deapodisation). So a scan's projections can be folded into per-row accumulators a block of
angles at a time while the scan arrives, and at its end only the blocks not folded in yet (and,
for gridding, the FFT) are left. The weights are those of the scan's whole `theta` (all angles
must have arrived for the sum to be the scan's FBP) and the geometry is the whole scan's, so the
result equals `workers.fbp.FBP` / `workers.gridding.GriddingFBP` on the complete sinogram to
float rounding (the sums run in another order).

Blocks are fixed ranges of angle indices, `block` angles each; a `BlockPlan` holds what a block
needs (for gridding its own spreading matrix, built from the whole scan's polar samples: the
blocks' matrices hold together what one whole-scan matrix holds). Plans are immutable and shared
between threads; an `AngleSum` instance (its FFT buffers) belongs to one thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from workers.backproject import BackProjectionGeometry, backproject_geometry
from workers.fbp import FBP, _FBPGeometry
from workers.filters import angle_weights, filter_response
from workers.gridding import GriddingFBP, _GriddingGeometry, _period
from workers.spreading import SpreadingMatrix, kernel_beta


@dataclass(frozen=True)
class BlockPlan:
    """One scan geometry cut into angle blocks: `blocks[b]` covers angles
    [b * block, (b + 1) * block) of `angles`. `parts` is the method's per-block state."""

    method: str  # "direct" | "gridding"
    angles: int
    cols: int
    block: int
    center: float
    base: _FBPGeometry | _GriddingGeometry  # the whole scan's filter, weights, mask
    parts: tuple[BackProjectionGeometry | BlockSpread, ...]

    @property
    def blocks(self) -> int:
        return len(self.parts)

    def span(self, b: int) -> tuple[int, int]:
        return b * self.block, min(self.angles, (b + 1) * self.block)

    def nbytes(self) -> int:
        """Bytes of the blocks' state (matrices, cos/sin tables)."""
        total = 0
        for part in self.parts:
            if isinstance(part, BlockSpread):
                total += part.nbytes
            else:
                total += 4 * (part.col_term.numel() + part.row_term.numel())
        return total


def accumulator_bytes(method: str, rows: int, cols: int, grid: int) -> int:
    """Bytes of the accumulators of `rows` rows: (cols^2) float32 per row for direct, the
    (grid^2) complex grid shared by a pair of rows for gridding."""
    if method == "gridding":
        return 4 * grid * grid * (rows + rows % 2)
    return 4 * cols * cols * rows


class AngleSum(Protocol):
    """What the incremental stage needs of a method (`DirectSum`, `GriddingSum`)."""

    method: str

    def plan(self, theta64: torch.Tensor, center: float, cols: int, block: int) -> BlockPlan: ...

    def accumulator(self, plan: BlockPlan, rows: int) -> torch.Tensor: ...

    def rows_of(self, accumulator: torch.Tensor, r0: int, r1: int) -> torch.Tensor: ...

    def add(
        self, plan: BlockPlan, b: int, sinograms: torch.Tensor, accumulator: torch.Tensor
    ) -> None: ...

    def finish(
        self,
        plan: BlockPlan,
        accumulator: torch.Tensor,
        sinograms: torch.Tensor,
        remaining: list[int],
    ) -> torch.Tensor: ...


class DirectSum(FBP):
    """Direct FBP by blocks of angles: the accumulators are the slices' partial sums."""

    method = "direct"

    def plan(self, theta64: torch.Tensor, center: float, cols: int, block: int) -> BlockPlan:
        base = self._build(theta64, center, cols)
        theta = theta64.numpy()
        parts = tuple(
            BackProjectionGeometry.build(theta[a0 : a0 + block], center, cols, self.device)
            for a0 in range(0, len(theta), block)
        )
        return BlockPlan("direct", len(theta), cols, block, center, base, parts)

    def accumulator(self, plan: BlockPlan, rows: int) -> torch.Tensor:
        return torch.zeros((rows, plan.cols, plan.cols), dtype=torch.float32, device=self.device)

    def rows_of(self, accumulator: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """The accumulator of rows [r0, r1)."""
        return accumulator[r0:r1]

    def _contribution(self, plan: BlockPlan, b: int, sinograms: torch.Tensor) -> torch.Tensor:
        base = plan.base
        assert isinstance(base, _FBPGeometry)
        a0, a1 = plan.span(b)
        part = plan.parts[b]
        assert isinstance(part, BackProjectionGeometry)
        filtered = self.filter_sinograms(
            sinograms.to(self.device, torch.float32), replace(base, weights=base.weights[a0:a1])
        )
        return backproject_geometry(filtered, part, self.max_work_bytes)

    def add(
        self, plan: BlockPlan, b: int, sinograms: torch.Tensor, accumulator: torch.Tensor
    ) -> None:
        """accumulator (rows, N, N) += block b of (rows, block angles, cols) sinograms."""
        with torch.inference_mode():
            accumulator += self._contribution(plan, b, sinograms)

    def finish(
        self,
        plan: BlockPlan,
        accumulator: torch.Tensor,
        sinograms: torch.Tensor,
        remaining: list[int],
    ) -> torch.Tensor:
        """The slices: `accumulator` (rows, N, N) plus the `remaining` blocks of `sinograms`
        (rows, angles, cols), masked; a new tensor, the accumulator is left as it was."""
        with torch.inference_mode():
            slices = accumulator.clone()
            for b in remaining:
                a0, a1 = plan.span(b)
                slices += self._contribution(plan, b, sinograms[:, a0:a1])
            base = plan.base
            assert isinstance(base, _FBPGeometry)
            if base.mask is not None:
                slices *= base.mask
            return slices


class GriddingSum(GriddingFBP):
    """Gridding FBP by blocks of angles: the accumulators are the Fourier grids (two rows to a
    complex grid) before the inverse FFT."""

    method = "gridding"

    def plan(self, theta64: torch.Tensor, center: float, cols: int, block: int) -> BlockPlan:
        # `GriddingFBP._build` with one spreading matrix per block instead of one in all
        device, grid, half = self.device, self.grid_size(cols), cols // 2
        weights = torch.as_tensor(angle_weights(theta64.numpy()), device=device)[:, None]
        cos, sin = torch.cos(theta64.to(device))[:, None], torch.sin(theta64.to(device))[:, None]
        reach = (cols - 1) / 2 * float((cos.abs() + sin.abs()).max())
        period = _period(cols, center - 0.5 - reach, center - 0.5 + reach)
        most = int(0.75 * period)
        freq = torch.arange(-most, most + 1, dtype=torch.float64, device=device)
        shift = (center - 0.5) + (half - (cols - 1) / 2) * (cos - sin)
        phase = torch.polar(torch.ones_like(shift * freq), 2 * math.pi * freq / period * shift)
        factor = weights * torch.sinc(freq / period) ** 2 / period * phase
        radius = freq * grid / period
        beta = kernel_beta(self.width, self.oversampling)
        rows, cols_ = -radius * sin, radius * cos
        parts = tuple(
            _touched(
                SpreadingMatrix.build(
                    rows[a0 : a0 + block].flatten(),
                    cols_[a0 : a0 + block].flatten(),
                    grid,
                    self.width,
                    beta,
                )
            )
            for a0 in range(0, len(theta64), block)
        )
        deapodize = self.deapodization(cols, beta)
        size, response = filter_response(self.filter_name, cols, device)
        base = _GriddingGeometry(
            parts[0].matrix,
            response,
            factor[..., None].to(torch.complex64),
            deapodize.float(),
            size,
            period,
            grid // 2 - half,
        )
        return BlockPlan("gridding", len(theta64), cols, block, center, base, parts)

    def accumulator(self, plan: BlockPlan, rows: int) -> torch.Tensor:
        """(pairs, grid, grid, 2) float32: row 2k is the real, 2k + 1 the imaginary part of
        pair k's grid, each pair contiguous (its inverse FFT at the end reads it in order)."""
        grid = self.grid_size(plan.cols)
        pairs = (rows + 1) // 2
        return torch.zeros((pairs, grid, grid, 2), dtype=torch.float32, device=self.device)

    def rows_of(self, accumulator: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """The accumulator of rows [r0, r1), r0 even: pairs r0 / 2 .. (r1 - 1) / 2."""
        return accumulator[r0 // 2 : (r1 + 1) // 2]

    def _spread_into(
        self, plan: BlockPlan, b: int, sinograms: torch.Tensor, grids: torch.Tensor
    ) -> None:
        """grids (B / 2, grid, grid, 2) += block b's share of (B even, block angles, cols)
        sinograms: spread onto the grid points its polar samples reach, and added there."""
        base = plan.base
        assert isinstance(base, _GriddingGeometry)
        a0, a1 = plan.span(b)
        part = plan.parts[b]
        assert isinstance(part, BlockSpread)
        geometry = replace(base, spreading=part.matrix, factor=base.factor[a0:a1])
        table = self._table(sinograms.to(self.device, torch.float32), geometry)
        pairs = sinograms.shape[0] // 2
        spread = part.matrix.spread(table).view(-1, pairs, 2).permute(1, 0, 2)
        grids.view(pairs, -1, 2).index_add_(1, part.bags, spread)

    def add(
        self, plan: BlockPlan, b: int, sinograms: torch.Tensor, accumulator: torch.Tensor
    ) -> None:
        """accumulator (pairs, grid, grid, 2) += block b of (rows, block angles, cols)."""
        with torch.inference_mode():
            self._spread_into(plan, b, _even(sinograms), accumulator)

    def finish(
        self,
        plan: BlockPlan,
        accumulator: torch.Tensor,
        sinograms: torch.Tensor,
        remaining: list[int],
    ) -> torch.Tensor:
        """The slices of `sinograms` (rows, angles, cols): `accumulator`'s pair grids (`rows_of`
        those rows) plus the `remaining` blocks, through the inverse FFT; the accumulator is
        left as it was."""
        base = plan.base
        assert isinstance(base, _GriddingGeometry)
        batch, cols = sinograms.shape[0], plan.cols
        crop = slice(base.crop, base.crop + cols)
        with torch.inference_mode():
            # the accumulator's pairs are read in place when nothing is added to them
            grids = accumulator.clone() if remaining else accumulator
            for b in remaining:
                a0, a1 = plan.span(b)
                self._spread_into(plan, b, _even(sinograms[:, a0:a1]), grids)
            image = torch.view_as_complex(grids)  # (pairs, grid, grid)
            # the 2D inverse FFT one axis at a time, cropped in between: the second pass
            # transforms only the slice's columns
            columns = torch.fft.ifft(image, dim=2, norm="forward")[:, :, crop]
            transformed = torch.fft.ifft(columns, dim=1, norm="forward")[:, crop]
            real = torch.view_as_real(transformed).permute(0, 3, 1, 2)  # (pairs, 2, N, N)
            slices = (real * base.deapodize).reshape(-1, cols, cols)
            return slices[:batch].contiguous()


@dataclass(frozen=True)
class BlockSpread:
    """A block's spreading matrix cut to the grid points its samples reach (`bags`, int64):
    a block of angles covers a wedge of the Fourier plane, so most of the grid is untouched
    and neither spread nor added."""

    matrix: SpreadingMatrix  # offsets of the touched grid points only
    bags: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes + self.bags.numel() * self.bags.element_size()


def _touched(matrix: SpreadingMatrix) -> BlockSpread:
    """`matrix` without its empty bags. Bag i of `embedding_bag` runs from offsets[i] to
    offsets[i + 1]: with the empty ones gone, the next offset is still where bag i ends."""
    offsets = matrix.offsets.long()
    ends = torch.cat((offsets[1:], offsets.new_tensor([matrix.indices.numel()])))
    bags = torch.nonzero(ends > offsets).flatten()
    kept = SpreadingMatrix(matrix.grid, matrix.indices, matrix.weights, matrix.offsets[bags])
    return BlockSpread(kept, bags)


def _even(sinograms: torch.Tensor) -> torch.Tensor:
    """An odd batch gets a zero row: gridding packs rows in pairs."""
    if sinograms.shape[0] % 2 == 0:
        return sinograms
    return torch.cat((sinograms, sinograms.new_zeros((1, *sinograms.shape[1:]))))


def angle_sum(
    method: str, device: torch.device, filter_name: str, circle_mask: bool
) -> DirectSum | GriddingSum:
    """The incremental twin of FBP `method` ("direct" or "gridding") on `device`."""
    if method == "gridding":
        return GriddingSum(device, filter_name=filter_name, circle_mask=circle_mask)
    return DirectSum(device, filter_name=filter_name, circle_mask=circle_mask)
