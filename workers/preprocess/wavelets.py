"""Orthonormal Daubechies wavelets and the periodic 2D discrete wavelet transform in PyTorch,
for the Fourier-wavelet stripe filter (no PyWavelets needed).

`daubechies(n)` builds the 2n-tap scaling filter with n vanishing moments by spectral
factorisation (I. Daubechies, "Ten Lectures on Wavelets", SIAM 1992, section 6.1): the
half-band polynomial P(y) = sum_k binom(n-1+k, k) y^k, y = sin^2(w/2), has its roots mapped to
z by y = (2 - z - 1/z)/4; keeping the root inside the unit circle of each reciprocal pair gives
the minimum-phase filter ((1+z)/2)^n prod (z - z_i), scaled to sum sqrt(2). `daubechies(2)` is
(1+sqrt3, 3+sqrt3, 3-sqrt3, 1-sqrt3) / (4 sqrt2).

The transform is periodic (circular), so with an orthonormal filter pair it is an orthogonal
map and `idwt2` (its transpose: strided transposed convolutions) inverts `dwt2` exactly; both
sides must be even. Callers pad their data to a multiple of 2^levels first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def daubechies(order: int) -> np.ndarray:
    """The 2*order-tap Daubechies scaling (low-pass) filter, float64, sum sqrt(2), norm 1."""
    if not 1 <= order <= 20:
        raise ValueError(f"order={order}: Daubechies filters here go from 1 to 20")
    coefficients = [math.comb(order - 1 + k, k) for k in range(order)]
    filter_ = np.array([1.0])
    for _ in range(order):
        filter_ = np.convolve(filter_, [1.0, 1.0])
    if order > 1:
        for y in np.roots(coefficients[::-1]):
            # z + 1/z = 2 - 4 y: of the two reciprocal roots keep the one inside the circle
            pair = np.roots([1.0, -(2.0 - 4.0 * y), 1.0])
            z = pair[np.argmin(np.abs(pair))]
            filter_ = np.convolve(filter_, [1.0, -z])
    filter_ = np.real(filter_)
    return np.asarray(filter_ * math.sqrt(2) / filter_.sum(), dtype=np.float64)


def _kernels(low: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(4, 1, L, L) analysis kernels: rows x columns = low x low, low x high, high x low,
    high x high (rows are the first image axis)."""
    high = low[::-1] * (-1.0) ** np.arange(len(low))  # the quadrature mirror filter
    pairs = [(low, low), (low, high), (high, low), (high, high)]
    stacked = np.stack([np.outer(a, b) for a, b in pairs])[:, None]
    return torch.as_tensor(stacked, dtype=like.dtype, device=like.device)


def dwt2(image: torch.Tensor, low: np.ndarray) -> torch.Tensor:
    """One level of the periodic 2D DWT: (N, H, W) with H, W even -> (N, 4, H/2, W/2) bands
    low-low, low-high (rows smooth, columns detail: vertical structure), high-low, high-high."""
    height, width = image.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"dwt2 needs even sides, got {height} x {width}")
    taps = len(low)
    kernels = _kernels(low, image)
    extended = image[:, None]
    if taps > 2:
        # circular extension past the end so that every output sees `taps` inputs
        extended = _wrap_pad(extended, taps - 2)
    return F.conv2d(extended, kernels, stride=2)


def idwt2(bands: torch.Tensor, low: np.ndarray) -> torch.Tensor:
    """The inverse (and transpose) of `dwt2`: (N, 4, h, w) -> (N, 2h, 2w)."""
    height, width = 2 * bands.shape[-2], 2 * bands.shape[-1]
    full = F.conv_transpose2d(bands, _kernels(low, bands), stride=2)[:, 0]
    # fold what runs past the end back onto the start (the transpose of the circular extension)
    rows = torch.arange(full.shape[-2], device=full.device) % height
    cols = torch.arange(full.shape[-1], device=full.device) % width
    folded = full.new_zeros((full.shape[0], height, full.shape[-1])).index_add_(1, rows, full)
    return folded.new_zeros((full.shape[0], height, width)).index_add_(2, cols, folded)


def _wrap_pad(image: torch.Tensor, extra: int) -> torch.Tensor:
    """Extend the last two axes periodically by `extra` (also past a whole period)."""
    height, width = image.shape[-2:]
    rows = torch.arange(height + extra, device=image.device) % height
    cols = torch.arange(width + extra, device=image.device) % width
    return image[..., rows, :][..., cols]
