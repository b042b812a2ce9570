"""The rotation axis from the data, sub-pixel: Vo's Fourier method for 180-degree scans, mirror
registration of opposite projections for 360-degree ones; and the two centre conventions.

Conventions. tomocast's `center` (protocol v1, `workers.fbp`, ASTRA, TomoPy's `fbp`) puts the
axis at detector *index* `center - 0.5`: the ray at signed distance s from the axis meets column
index u = s + (center - 0.5), pixel k covering u in [k - 1/2, k + 1/2], so center = cols/2 is the
detector's middle, index (cols - 1)/2. TomoPy's `find_center_vo`, `find_center_pc` and its
`gridrec` return or take the axis as that pixel index itself (511.5 for a centred axis on 1024
columns). Hence `from_tomopy_center(index) = index + 0.5` and `to_tomopy_center(center) =
center - 0.5`; everything here returns tomocast's `center`.

Vo's method (N. T. Vo, M. Drakopoulos, R. C. Atwood, C. Reinhard, "Reliable method for
calculating the center of rotation in parallel-beam tomography", Opt. Express 22(16):19078,
2014). A 180-degree sinogram p(theta, s) and its mirror about the true axis, p(theta, -s), are
the two halves of a 360-degree sinogram. In the 2D Fourier transform of a 360-degree sinogram of
an object within radius R of the axis, angular harmonic m and detector frequency f (cycles per
pixel) carry energy only where |m| <= 2 pi R |f| (a double wedge); a wrong axis breaks the
continuity between the halves and spreads energy outside it. The metric is the mean magnitude
outside the wedge (minus a band of low |m| and |f|, as in the paper), minimised over the axis:
first over whole pixels on a binned copy of the sinogram, then in `step`s around that at full
resolution, then a parabola through the three best steps.

Computed as the paper does, but with the Fourier transform taken once: with S1, S2 the
transforms of the sinogram and of its left-right flip (zero-padded along the detector to P, along
the angles to 2A), the 360-degree sinogram for a mirror shifted by d pixels has the transform
S1 + (-1)^m exp(-2 pi i f d / P) S2, so each candidate costs one complex multiply-add and a
magnitude over the masked coefficients, and sub-pixel shifts are exact Fourier shifts (no
interpolation that would blur some candidates more than others).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from workers.conventions import from_tomopy_center
from workers.gridding import fast_fft_length
from workers.preprocess.arrays import as_float_tensor, sinogram_batch
from workers.preprocess.mirror import mirror_axis

log = logging.getLogger(__name__)

# Coarse search resolution: the sinogram is binned to at most this many columns and angles.
_COARSE_COLS = 256
_COARSE_ANGLES = 256
# Fine search: at most this many angles (binned above it), all columns.
_FINE_ANGLES = 1024
# Complex coefficients x candidates evaluated at once (bounds the metric's temporaries).
_CHUNK_ELEMENTS = 1 << 23
# Gaussian smoothing (sigmas in angles and columns) before the metric, as in the paper: it
# damps the noise that fills the highest harmonics and frequencies.
_SMOOTH_ANGLES = 3.0
_SMOOTH_COLS = 2.0
# Coefficients whose smoothing weight is below this are left out of the metric: they would add
# under 1e-3 of their magnitude to it, and they are most of the spectrum (the angular Gaussian
# leaves about a fifth of the harmonics), so the metric costs a few times less.
_WEIGHT_FLOOR = 1e-3
# Part of the object's largest value that marks its support on the detector (for R).
_SUPPORT_LEVEL = 0.05


def find_center(
    sinograms: np.ndarray | torch.Tensor, theta: np.ndarray | torch.Tensor | None = None
) -> float:
    """tomocast's `center` of a scan with evenly spaced angles `theta` (radians; default
    evenly over [0, pi)): Vo's method for a half-turn, mirror registration for a full turn
    (which also finds an axis near the detector's edge). `sinograms` as in `find_center_vo`."""
    data = sinogram_batch(as_float_tensor(sinograms))
    if theta is None:
        return find_center_vo(data)
    angles = np.asarray(torch.as_tensor(theta).detach().cpu(), dtype=np.float64).reshape(-1)
    if len(angles) != data.shape[1] or len(angles) < 2:
        raise ValueError(f"theta has {len(angles)} angles, the sinograms {data.shape[1]}")
    steps = np.diff(angles)
    step = float(np.median(steps))
    if step <= 0 or np.abs(steps - step).max() > 0.01 * step:
        raise ValueError("theta must be evenly spaced and increasing for a centre estimate")
    turn = step * len(angles)
    if abs(turn - math.pi) < 1.5 * step:
        return find_center_vo(data)
    if abs(turn - 2 * math.pi) < 1.5 * step:
        return find_center_360(data)
    raise ValueError(
        f"theta covers {math.degrees(turn):.1f} degrees: the centre is estimated from a half "
        "(180) or a full (360) turn"
    )


def find_center_vo(
    sinograms: np.ndarray | torch.Tensor,
    search_radius: float | None = None,
    step: float = 0.25,
    radius: float | None = None,
) -> float:
    """tomocast's `center` of a 180-degree scan by Vo's method (see the module docstring).

    `sinograms`: (angles, cols) or (rows, angles, cols) line integrals at angles evenly spaced
    over [0, pi) (the metrics of several rows are averaged: a few rows around the middle of the
    detector are plenty). The axis is searched within `search_radius` pixels of the detector's
    middle (default max(24, cols/8)) and refined to `step` pixels and then a parabola.
    `radius`: the object's radius around the axis in pixels, which sets the wedge; default
    estimated from the sinogram's support (an overestimate is harmless, an underestimate lets
    the object's own spectrum into the metric).
    """
    data = sinogram_batch(as_float_tensor(sinograms))
    _, angles, cols = data.shape
    if angles < 8 or cols < 8:
        raise ValueError(f"need at least 8 angles and 8 columns, got {angles} x {cols}")
    if step <= 0:
        raise ValueError(f"step={step} must be positive")
    middle = (cols - 1) / 2  # pixel index of the detector's middle
    reach = max(24.0, cols / 8) if search_radius is None else float(search_radius)
    if radius is None:
        radius = _support_radius(data)

    binning = max(1, math.ceil(cols / _COARSE_COLS))
    coarse = _bin(data, max(1, math.ceil(angles / _COARSE_ANGLES)), binning)
    coarse_cols = coarse.shape[-1]
    # binned column k covers original columns [b k, b k + b - 1], centred at b k + (b - 1)/2
    coarse_middle = (middle - (binning - 1) / 2) / binning
    candidates = np.arange(
        math.floor(coarse_middle - reach / binning), math.ceil(coarse_middle + reach / binning) + 1
    ).astype(np.float64)
    candidates = candidates[(candidates >= 1) & (candidates <= coarse_cols - 2)]
    metric = _vo_metric(coarse, candidates, radius / binning)
    best = int(np.argmin(metric))
    if best in (0, len(candidates) - 1):
        log.warning(
            "centre search: best axis at the edge of the range (%.1f +- %.1f px): the axis may "
            "lie outside it; pass a larger search_radius",
            middle + 0.5,
            reach,
        )
    start = candidates[best] * binning + (binning - 1) / 2

    fine = _bin(data, max(1, math.ceil(angles / _FINE_ANGLES)), 1)
    half = binning + step
    offsets = np.arange(-half, half + step / 2, step)
    candidates = np.clip(start + offsets, 1.0, cols - 2.0)
    metric = _vo_metric(fine, candidates, radius)
    best = int(np.argmin(metric))
    index = float(candidates[best])
    if 0 < best < len(candidates) - 1:
        index += step * _parabola_vertex(*metric[best - 1 : best + 2])
    return from_tomopy_center(index)


def find_center_360(sinograms: np.ndarray | torch.Tensor, min_overlap: int | None = None) -> float:
    """tomocast's `center` of a 360-degree scan (angles evenly spaced over [0, 2 pi), an even
    count): each projection at theta + pi is the mirror of the one at theta about the axis, so
    the axis is where the mirrored second half best matches the first
    (`workers.preprocess.mirror.mirror_axis`). Works for an axis anywhere on the detector, also
    near an edge (half-acquisition: `workers.preprocess.halfacq`)."""
    data = sinogram_batch(as_float_tensor(sinograms))
    angles = data.shape[1]
    if angles % 2:
        raise ValueError(f"a 360-degree scan needs an even number of angles, got {angles}")
    half = angles // 2
    return from_tomopy_center(mirror_axis(data[:, :half], data[:, half:], min_overlap))


def find_center_pair(
    projection_0: np.ndarray | torch.Tensor, projection_180: np.ndarray | torch.Tensor
) -> float:
    """tomocast's `center` from two projections (rows, cols) or rows (cols,) taken 180 degrees
    apart, by mirror registration (flat-field corrected; line integrals or transmission)."""
    first = as_float_tensor(projection_0)
    second = as_float_tensor(projection_180)
    if first.shape != second.shape or first.ndim not in (1, 2):
        raise ValueError(
            f"projections must share a (rows, cols) or (cols,) shape, got {tuple(first.shape)} "
            f"and {tuple(second.shape)}"
        )
    if first.ndim == 1:
        first, second = first[None], second[None]
    return from_tomopy_center(mirror_axis(first[None], second[None]))


def _support_radius(data: torch.Tensor) -> float:
    """Half the width of the columns where the sinograms reach 5% of their largest magnitude:
    the object's radius around the axis, since over 180 degrees it sweeps +-R about it."""
    profile = data.abs().amax(dim=(0, 1))
    peak = float(profile.max())
    if peak == 0:
        return data.shape[-1] / 2
    inside = torch.nonzero(profile >= _SUPPORT_LEVEL * peak).flatten()
    width = int(inside[-1]) - int(inside[0]) + 1
    return max(width / 2, 2.0)


def _bin(data: torch.Tensor, angle_factor: int, col_factor: int) -> torch.Tensor:
    """Mean over blocks of `angle_factor` angles x `col_factor` columns (a ragged end dropped)."""
    rows, angles, cols = data.shape
    a, c = angles // angle_factor, cols // col_factor
    trimmed = data[:, : a * angle_factor, : c * col_factor]
    return trimmed.reshape(rows, a, angle_factor, c, col_factor).mean(dim=(2, 4))


def _vo_metric(data: torch.Tensor, axes: np.ndarray, radius: float) -> np.ndarray:
    """Vo's metric for each candidate axis pixel index in `axes` (see the module docstring)."""
    rows, angles, cols = data.shape
    shifts = 2 * axes - (cols - 1)  # the flipped sinogram moved by d mirrors it about the axis
    padded = fast_fft_length(cols + 2 * math.ceil(float(np.abs(shifts).max())) + 2)
    spectrum = torch.fft.rfft(data, n=padded, dim=-1)
    flipped = torch.fft.rfft(data.flip(-1), n=padded, dim=-1)
    first = torch.fft.fft(spectrum, n=2 * angles, dim=-2)
    second = torch.fft.fft(flipped, n=2 * angles, dim=-2)

    device = data.device
    harmonic = torch.fft.fftfreq(2 * angles, 1 / (2 * angles), device=device).abs()[:, None]
    frequency = torch.arange(padded // 2 + 1, device=device, dtype=torch.float64)[None, :]
    low_harmonics = min(20, int(0.05 * 2 * angles))
    # Vo's smoothing of the sinogram (Gaussian, in angle and detector pixels) as a weight
    weights = torch.exp(
        -2
        * math.pi**2
        * (
            (_SMOOTH_ANGLES * harmonic / (2 * angles)) ** 2
            + (_SMOOTH_COLS * frequency / padded) ** 2
        )
    )
    outside = (
        (harmonic > 2 * math.pi * radius * frequency / padded)
        & (harmonic > low_harmonics)
        & (frequency > 1)
        & (frequency < padded // 2)
        & (weights >= _WEIGHT_FLOOR)
    )
    index = torch.nonzero(outside, as_tuple=True)
    real = first.real.dtype
    sign = 1.0 - 2.0 * (index[0] % 2).to(real)  # (-1)^m
    weight = weights[index].to(real)
    first_masked = first[:, index[0], index[1]] * weight  # (rows, M)
    second_masked = second[:, index[0], index[1]] * (sign * weight)
    cycles = index[1].to(torch.float64) / padded  # f / P per coefficient

    metrics = np.empty(len(axes))
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, rows * first_masked.shape[1]))
    for k0 in range(0, len(axes), per_chunk):
        d = torch.as_tensor(shifts[k0 : k0 + per_chunk], dtype=torch.float64, device=device)
        # the angle in float64 (it reaches hundreds of radians), the phase in the data's type
        angle = (-2 * math.pi * d[:, None] * cycles).remainder_(2 * math.pi).to(real)
        phase = torch.polar(torch.ones(1, dtype=real, device=device), angle)
        combined = first_masked[:, None, :] + phase * second_masked[:, None, :]
        metrics[k0 : k0 + len(d)] = combined.abs().mean(dim=(0, 2)).double().cpu().numpy()
    return metrics


def _parabola_vertex(left: float, middle: float, right: float) -> float:
    """Offset in (-1/2, 1/2) steps of the vertex of the parabola through three equally spaced
    values whose middle one is the least."""
    curvature = left - 2 * middle + right
    if curvature <= 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))
