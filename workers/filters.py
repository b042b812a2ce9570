"""The filter half of filtered back-projection: filter responses and angle weights.

Shared by both FBP methods (`workers.fbp`, `workers.gridding`), so a slice is filtered and
weighted the same whichever back-projects it. Filter names and responses follow scikit-image
and TomoPy; the angle weights make the sum over projections a quadrature of the integral over
[0, pi), which is what puts the slices in attenuation per pixel.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import torch

FILTER_NAMES = ("ramp", "shepp-logan", "cosine", "hamming", "hann", "parzen")
_FILTER_ALIASES = MappingProxyType(
    {"ramlak": "ramp", "ram-lak": "ramp", "shepp": "shepp-logan", "hanning": "hann"}
)
# Angles closer than this (radians, modulo pi) are the same view; float32 pi is 8.7e-8 off.
_SAME_ANGLE = 1e-6
# A gap between projection angles wider than this many median gaps is a missing wedge.
_WEDGE_GAPS = 20.0


def canonical_filter_name(name: str) -> str:
    """TomoPy/scikit-image filter name (or alias) -> one of FILTER_NAMES; ValueError otherwise."""
    key = name.lower()
    key = _FILTER_ALIASES.get(key, key)
    if key not in FILTER_NAMES:
        raise ValueError(
            f"filter_name={name!r}: choose one of {', '.join(FILTER_NAMES)} "
            f"(aliases: {', '.join(_FILTER_ALIASES)})"
        )
    return key


def padded_size(cols: int) -> int:
    """FFT length for filtering `cols` samples: a power of two >= 2*cols (and >= 64), the length
    scikit-image uses, so linear convolution with the ramp never wraps around."""
    return max(64, 1 << math.ceil(math.log2(2 * cols)))


def fourier_filter(filter_name: str, size: int) -> np.ndarray:
    """Real response of the named filter at the `size // 2 + 1` rfft frequencies of length `size`.

    The ramp is the DFT of the spatially sampled ramp kernel (Kak & Slaney eq. 61: h(0) = 1/4,
    h(n odd) = -1/(pi n)^2), not |f| sampled in frequency, so its DC term is the small positive
    value that makes the reconstruction's mean right. Windows follow scikit-image; hamming and hann
    use the symmetric form (scikit-image's differ by O(1/size)); parzen is the standard window
    over |f| / f_nyquist.
    """
    name = canonical_filter_name(filter_name)
    n = np.arange(size)
    k = np.minimum(n, size - n)
    kernel = np.zeros(size)
    kernel[0] = 0.25
    odd = k % 2 == 1
    kernel[odd] = -1.0 / (np.pi * k[odd]) ** 2
    response = np.fft.rfft(kernel).real
    freq = np.fft.rfftfreq(size)  # cycles per detector pixel, 0 .. 0.5
    if name == "shepp-logan":
        response *= np.sinc(freq)
    elif name == "cosine":
        response *= np.cos(np.pi * freq)
    elif name == "hamming":
        response *= 0.54 + 0.46 * np.cos(2 * np.pi * freq)
    elif name == "hann":
        response *= 0.5 + 0.5 * np.cos(2 * np.pi * freq)
    elif name == "parzen":
        q = 2 * freq
        response *= np.where(q <= 0.5, 1 - 6 * q**2 * (1 - q), 2 * (1 - q) ** 3)
    return response


def filter_response(filter_name: str, cols: int, device: torch.device) -> tuple[int, torch.Tensor]:
    """The FFT length for filtering `cols` samples (`padded_size`) and the filter's float32
    response at its rfft frequencies, on `device`: what both FBP methods multiply by."""
    size = padded_size(cols)
    response = torch.as_tensor(
        fourier_filter(filter_name, size), dtype=torch.float32, device=device
    )
    return size, response


def angle_weights(theta: np.ndarray) -> np.ndarray:
    """Quadrature weight (radians) of each projection in the integral over [0, pi).

    Angles are folded modulo pi (theta + pi sees the same lines), each distinct angle gets half the
    gap to its neighbours on that circle, and angles that coincide share their cell. Uniform
    angles over [0, pi) or [0, 2 pi) thus get pi / angles each, as in scikit-image and TomoPy.
    A gap wider than 20 median gaps is a missing wedge (limited-angle scan), not sparse sampling:
    it counts as one median gap, so the projections at its edges are not inflated. (Random angles
    have exponentially distributed gaps; one over 20 medians has odds of about 1e-6 per gap.)
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    folded = np.mod(theta, np.pi)
    order = np.argsort(folded, kind="stable")
    ordered = folded[order]
    group = np.concatenate(([0], np.cumsum(np.diff(ordered) > _SAME_ANGLE)))
    if group[-1] > 0 and ordered[0] + np.pi - ordered[-1] <= _SAME_ANGLE:
        group[group == group[-1]] = 0  # the last angles are the first ones seen from behind
    first = np.unique(group, return_index=True)[1]
    unique = ordered[first]
    gaps = np.diff(np.concatenate((unique, [unique[0] + np.pi])))
    median = np.median(gaps)
    gaps = np.where(gaps > _WEDGE_GAPS * median, median, gaps)
    cells = 0.5 * (gaps + np.roll(gaps, 1))
    counts = np.bincount(group, minlength=len(unique))
    weights = np.empty_like(theta)
    weights[order] = (cells / counts)[group]
    return weights
