"""Half-acquisition: a 360-degree scan with the rotation axis near one edge of the detector,
stitched into a 180-degree scan on a detector almost twice as wide.

With the axis at pixel index c near (say) the right edge, the projection at theta sees the
sample from its left edge to a little past the axis, the one at theta + pi the other side,
mirrored: its column j lands at 2c - j on the wide detector. Each pair of opposite rows becomes
one wide row: the first projection where only it has data, the mirrored second where only it
has, and across the columns both see (the overlap, 2 (cols - c) - 1 wide) a linear blend, so
a gain or flat-field mismatch between the two edges leaves no step. The axis comes from the data
by mirror registration (`workers.preprocess.mirror`), the same as for any 360-degree scan: it is
the overlap. This is the stitching of the literature (e.g. Vo, Atwood, Drakopoulos, Connolley,
"Data processing methods and data acquisition for samples larger than the field of view in
parallel-beam tomography", Opt. Express 29(12):17849, 2021); the sub-pixel part of 2c is applied
to the mirrored projection by linear interpolation.

The stitched detector keeps the first projection's columns where they are (no resampling) and
extends them on the axis' side: its `center` (tomocast's convention) is returned with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from workers.conventions import from_tomopy_center, to_tomopy_center
from workers.preprocess.arrays import Array, as_float_tensor, restore, sinogram_batch
from workers.preprocess.center import find_center_360


def find_half_acquisition_center(
    sinograms: np.ndarray | torch.Tensor, min_overlap: int | None = None
) -> float:
    """tomocast's `center` of a 360-degree scan (angles evenly spaced over [0, 2 pi), an even
    count) from the data: where the mirrored second half-turn matches the first
    (`workers.preprocess.center.find_center_360`). `min_overlap` (default max(8, cols/20)):
    the fewest columns the two half-turns may share."""
    return find_center_360(sinograms, min_overlap)


def stitched_width(cols: int, center: float) -> tuple[int, int]:
    """(width, first): the stitched detector's width and the column of the wide detector that
    holds the original column 0, for an axis at tomocast `center` on `cols` columns."""
    axis = to_tomopy_center(center)
    if axis >= (cols - 1) / 2:  # axis right of the middle: the mirrored half extends the right
        return math.floor(2 * axis) + 1, 0
    first = -math.ceil(2 * axis - (cols - 1))  # mirrored half extends the left
    return cols + first, first


def stitch_half_acquisition(sinograms: Array, center: float) -> tuple[Array, float]:
    """(angles, cols) or (rows, angles, cols) 360-degree sinograms -> (their 180-degree
    stitch, its `center`): angles [0, pi) (the first half), on `stitched_width` columns.

    `center` is the axis on the original detector, tomocast's convention (e.g. from
    `find_half_acquisition_center`); it must lie on the detector. Works on line integrals or
    transmissions alike (the blend is linear).
    """
    data = as_float_tensor(sinograms)
    batch = sinogram_batch(data)
    angles, cols = batch.shape[1:]
    if angles % 2:
        raise ValueError(f"a 360-degree scan needs an even number of angles, got {angles}")
    axis = to_tomopy_center(center)
    if not 0 <= axis <= cols - 1:
        raise ValueError(f"center={center} puts the axis off the {cols}-column detector")
    half = angles // 2
    first, second = batch[:, :half], batch[:, half:]
    width, offset = stitched_width(cols, center)
    device = data.device
    # wide column x holds original column x - offset of the first half and, mirrored, the
    # second half's column 2 axis - (x - offset)
    position = torch.arange(width, dtype=torch.float64, device=device) - offset
    mirrored = 2 * axis - position
    in_first = (position >= 0) & (position <= cols - 1)
    in_second = (mirrored >= -1e-9) & (mirrored <= cols - 1 + 1e-9)
    # linear blend over the overlap: 1 -> 0 for the first half towards its far edge
    low, high = max(0.0, 2 * axis - (cols - 1)), min(cols - 1.0, 2 * axis)
    right = axis >= (cols - 1) / 2
    span = max(high - low, 1.0)
    ramp = (high - position) / span if right else (position - low) / span
    weight = torch.where(in_second, ramp.clamp(0, 1), torch.ones_like(ramp))
    weight = torch.where(in_first, weight, torch.zeros_like(weight)).to(data.dtype)

    base = mirrored.clamp(0, cols - 1)
    left_index = base.floor().clamp(max=cols - 2).long()
    fraction = (base - left_index).to(data.dtype)
    second_values = (
        second[..., left_index] * (1 - fraction) + second[..., left_index + 1] * fraction
    )
    first_index = position.clamp(0, cols - 1).round().long()
    stitched = weight * first[..., first_index] + (1 - weight) * second_values
    if data.ndim == 2:
        stitched = stitched[0]
    return restore(stitched, sinograms), from_tomopy_center(axis + offset)
