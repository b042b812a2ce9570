"""The axis about which projections at theta + pi mirror those at theta: registration of two
half-turns, for 360-degree scans with the axis anywhere on the detector (half-acquisition too).

The projection at theta + pi, flipped left-right, is the one at theta moved by d = 2c - (cols-1)
pixels, c the axis' pixel index. `mirror_axis` finds d by least squares over the columns both
see, normalised by their energy. Whole pixels first, for every shift at once: the cross term is
one FFT cross-correlation summed over all rows and angle pairs, the energies prefix sums, and
the mismatch (squared difference + b) / (energy + b), with b a small ballast per shared column,
so that shared columns holding nothing (a sliver of empty detector edge) score 1, never a
perfect match; `min_overlap` bounds how little the halves may share. Then sub-pixel, in
`1 / _STEPS` steps over the pixel either side: both halves are smoothed (a Gaussian of
`_SMOOTH` pixels) and moved half the shift each way by linear interpolation, so both are
smoothed alike whatever the fraction (moving one alone, or not pre-smoothing noisy data, pulls
the match towards particular fractions), and a parabola through the three best steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Sub-pixel steps per pixel in the refinement.
_STEPS = 8
# Floor on the energy of the shared columns, as a part of the mean energy per column.
_ENERGY_FLOOR = 1e-3
# Gaussian (standard deviation in pixels) both halves are smoothed with before the refinement.
_SMOOTH = 1.5
# Angle pairs used by the sub-pixel refinement (evenly picked when there are more).
_REFINE_PAIRS = 256


def mirror_axis(first: torch.Tensor, second: torch.Tensor, min_overlap: int | None = None) -> float:
    """Axis pixel index (TomoPy's convention) from (rows, n, cols) projections `first` at angles
    theta and `second` at theta + pi. Shifts leaving fewer than `min_overlap` shared columns
    (default max(8, cols/20)) are not considered."""
    if first.shape != second.shape or first.ndim != 3:
        raise ValueError(
            f"both halves must be (rows, angles, cols) of one shape, got {tuple(first.shape)} "
            f"and {tuple(second.shape)}"
        )
    cols = first.shape[-1]
    overlap = max(8, cols // 20) if min_overlap is None else int(min_overlap)
    if not 2 <= overlap <= cols:
        raise ValueError(f"min_overlap={overlap} must be in [2, cols={cols}]")
    first = first.to(torch.float64)
    flipped = second.to(torch.float64).flip(-1)
    floor = _ENERGY_FLOOR * float((first**2).sum() + (flipped**2).sum()) / cols
    shift = _whole_pixel_shift(first, flipped, overlap, floor)
    # smoothed first: linear interpolation averages noise by an amount that depends on the
    # fraction, which would pull the match towards some fractions; after a Gaussian of a
    # pixel or two the noise is correlated over that width and interpolation barely changes it
    first, flipped = _smooth(first, _SMOOTH), _smooth(flipped, _SMOOTH)
    pairs = first.shape[1]
    if pairs > _REFINE_PAIRS:
        pick = torch.linspace(0, pairs - 1, _REFINE_PAIRS, device=first.device).round().long()
        first, flipped = first[:, pick], flipped[:, pick]
        floor *= _REFINE_PAIRS / pairs
    offsets = np.arange(-_STEPS, _STEPS + 1) / _STEPS
    mismatch = np.array([_mismatch(first, flipped, shift + o, floor) for o in offsets])
    best = int(np.argmin(mismatch))
    refined = shift + float(offsets[best])
    if 0 < best < len(offsets) - 1:
        left, middle, right = mismatch[best - 1 : best + 2]
        curvature = left - 2 * middle + right
        if curvature > 0:
            refined += float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5)) / _STEPS
    return (refined + cols - 1) / 2


def _whole_pixel_shift(
    first: torch.Tensor, flipped: torch.Tensor, overlap: int, floor: float
) -> float:
    """The whole-pixel d with the least normalised mismatch, |d| <= cols - overlap."""
    cols = first.shape[-1]
    padded = 2 * cols
    cross = (
        torch.fft.rfft(first, n=padded, dim=-1) * torch.fft.rfft(flipped, n=padded, dim=-1).conj()
    ).sum(dim=(0, 1))
    correlation = torch.fft.irfft(cross, n=padded).cpu().numpy()  # [d] = sum first[k] flip[k-d]
    first_energy = np.concatenate([[0.0], np.cumsum((first**2).sum(dim=(0, 1)).cpu().numpy())])
    flip_energy = np.concatenate([[0.0], np.cumsum((flipped**2).sum(dim=(0, 1)).cpu().numpy())])
    reach = cols - overlap
    shifts = np.arange(-reach, reach + 1)
    # shared columns: first[k] for k in [max(0, d), cols + min(0, d)), the flip at k - d
    start = np.maximum(0, shifts)
    stop = cols + np.minimum(0, shifts)
    energy = (
        first_energy[stop]
        - first_energy[start]
        + flip_energy[stop - shifts]
        - flip_energy[start - shifts]
    )
    ballast = floor * (stop - start)
    mismatch = (energy - 2 * correlation[shifts % padded] + ballast) / (energy + ballast)
    return float(shifts[int(np.argmin(mismatch))])


def _mismatch(first: torch.Tensor, flipped: torch.Tensor, shift: float, floor: float) -> float:
    """Normalised mismatch of first(y + d/2) and flipped(y - d/2) over the integer y where both
    lie on the detector (less the smoothing's reach at its edges), linearly interpolated."""
    cols = first.shape[-1]
    low = max(-shift / 2, shift / 2)
    high = min(cols - 1 - shift / 2, cols - 1 + shift / 2)
    # leave out the columns the smoothing took from beyond a detector edge (replicated)
    margin = min(math.ceil(3 * _SMOOTH), (high - low) / 4)
    low, high = low + margin, high - margin
    y = torch.arange(np.ceil(low), np.floor(high) + 1, dtype=torch.float64, device=first.device)
    if y.numel() < 2:
        return 1.0
    a = _sample(first, y + shift / 2)
    b = _sample(flipped, y - shift / 2)
    energy = float((a**2).sum() + (b**2).sum())
    # no ballast here: the overlap is known to hold the sample, and a ballast that grows with
    # the overlap's length would tilt the curve the parabola is fitted to
    return float(((a - b) ** 2).sum()) / max(energy, floor)


def _sample(data: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of `data` along its last axis at `position` (within [0, cols-1])."""
    cols = data.shape[-1]
    position = position.clamp(0, cols - 1)
    left = position.floor().clamp(max=cols - 2).long()
    fraction = position - left
    return data[..., left] * (1 - fraction) + data[..., left + 1] * fraction


def _smooth(data: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing along the last axis (edges replicated)."""
    half = math.ceil(3 * sigma)
    offsets = torch.arange(-half, half + 1, dtype=data.dtype, device=data.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    flat = data.reshape(-1, 1, data.shape[-1])
    padded = torch.nn.functional.pad(flat, (half, half), mode="replicate")
    return torch.nn.functional.conv1d(padded, kernel[None, None]).reshape(data.shape)
