"""Single-distance phase retrieval for a homogeneous object (D. Paganin, S. C. Mayo, T. E.
Gureyev, P. R. Miller, S. W. Wilkins, "Simultaneous phase and amplitude extraction from a single
defocused image of a homogeneous object", J. Microsc. 206(1):33-40, 2002).

Free-space propagation over a distance z turns the sample's phase into edge fringes; for a
single material (refractive index 1 - delta + i beta, so delta/beta is fixed) the transport of
intensity equation inverts in closed form. Paganin's eq. (8):

    T(r) = -1/mu ln( F^-1[ F[I(r)/I0] / (1 + z delta/mu |k|^2) ] ),   mu = 4 pi beta / lambda,

with |k| = 2 pi |f| the angular spatial frequency. Since z delta/mu = z lambda (delta/beta)/(4 pi),
the filter is 1 / (1 + pi lambda z (delta/beta) |f|^2), f in cycles per metre. `paganin_filter`
applies it to flat-field-corrected transmission I/I0 and returns the filtered transmission, so
the usual -log gives mu T, the line integral of the attenuation, ready for FBP (divide by mu,
`attenuation_coefficient`, for a thickness in metres). lambda [m] = h c / E = 1.23984198e-9 m keV
/ E [keV].

Each projection is padded at its edges (replicated) before the 2D FFT, so the filter's tail does
not wrap one side of the detector onto the other; `pad` pixels a side (default: four decay
lengths of the filter's kernel, sqrt(lambda z (delta/beta) / (4 pi)) / pixel (the kernel is
K0(r / that)), at least 8, at most the frame's own size, and the far sides padded further to a
fast FFT length: no prime factor above 5). The filter's response depends only on the padded
shape and the physics, so it is built once per scan geometry (cached), and the projections are
transformed a few at a time, so the transforms work in the CPU's caches. The padded frames and
their spectrum live in work buffers that each thread keeps for its latest shape: the service
filters each chunk of projections as it arrives, and fresh pages for every chunk cost more than
the arithmetic (at 1,024 columns, a one-frame call took twice a frame's time).
"""

from __future__ import annotations

import functools
import math
import threading

import torch

from workers.gridding import fast_fft_length
from workers.preprocess.arrays import Array, as_float_tensor, chunk_elements, restore

# h c in metre keV.
PLANCK_C_M_KEV = 1.23984198e-9
# Padded pixels transformed at a time (whole projections; at least one).
_CHUNK_ELEMENTS = 1 << 18
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}
# Per thread: (key, padded, spectrum, filtered) of the latest shape filtered there.
_WORK = threading.local()


def wavelength(energy_kev: float) -> float:
    """X-ray wavelength in metres at `energy_kev`."""
    if energy_kev <= 0:
        raise ValueError(f"energy={energy_kev} keV must be positive")
    return PLANCK_C_M_KEV / energy_kev


def attenuation_coefficient(energy_kev: float, beta: float) -> float:
    """mu = 4 pi beta / lambda in 1/m: -log(transmission) / mu is a thickness in metres."""
    return 4 * math.pi * beta / wavelength(energy_kev)


def paganin_filter(
    transmission: Array,
    energy_kev: float,
    distance_m: float,
    pixel_size_m: float,
    delta_beta: float,
    pad: int | None = None,
    in_place: bool = False,
) -> Array:
    """(count, rows, cols) or (rows, cols) flat-field-corrected transmission I/I0 -> the same,
    Paganin-filtered (see the module docstring); -log of it is mu x thickness. `in_place`:
    filter a float32/float64 `transmission` itself and return it (no copy: what a caller that
    owns it wants)."""
    if distance_m < 0 or pixel_size_m <= 0 or delta_beta < 0:
        raise ValueError(
            f"distance={distance_m} m must be >= 0, pixel_size={pixel_size_m} m > 0 and "
            f"delta_beta={delta_beta} >= 0"
        )
    data = as_float_tensor(transmission)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"transmission must be (rows, cols) or (count, rows, cols), got {tuple(data.shape)}"
        )
    frames = data.reshape(-1, *data.shape[-2:])
    rows, cols = frames.shape[-2:]
    strength = math.pi * wavelength(energy_kev) * distance_m * delta_beta  # m^2
    if pad is None:
        decay = math.sqrt(strength) / (2 * math.pi) / pixel_size_m  # kernel ~ K0(r / decay)
        pad_rows = pad_cols = max(8, math.ceil(4 * decay))
        pad_rows, pad_cols = min(pad_rows, rows), min(pad_cols, cols)
        height = fast_fft_length(rows + 2 * pad_rows)
        width = fast_fft_length(cols + 2 * pad_cols, even=True)
    else:
        pad_rows, pad_cols = min(int(pad), rows), min(int(pad), cols)
        height, width = rows + 2 * pad_rows, cols + 2 * pad_cols
    response = _response(height, width, strength, pixel_size_m, frames.device, frames.dtype)
    result = frames if in_place else torch.empty_like(frames)
    step = max(1, chunk_elements(frames.device, _CHUNK_ELEMENTS) // (height * width))
    step = max(1, min(step, frames.shape[0]))
    padded, spectrum, filtered = _work_buffers(step, height, width, frames.dtype, frames.device)
    for f0 in range(0, frames.shape[0], step):
        part = frames[f0 : f0 + step]
        n = part.shape[0]
        _replicate_pad(part, padded[:n], pad_rows, pad_cols)
        torch.fft.rfft2(padded[:n], out=spectrum[:n])
        torch.view_as_real(spectrum[:n]).mul_(response)  # real x real: no complex copy
        torch.fft.irfft2(spectrum[:n], s=(height, width), out=filtered[:n])
        result[f0 : f0 + n] = filtered[:n, pad_rows : pad_rows + rows, pad_cols : pad_cols + cols]
    return restore(result.reshape(data.shape), transmission)


def _work_buffers(
    step: int, height: int, width: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This thread's (padded, spectrum, filtered) buffers for `step` frames of `height` x
    `width`: those of its previous call when the shape is the same (one set per thread, the
    latest shape's), else new ones."""
    key = (step, height, width, dtype, device)
    cached = getattr(_WORK, "buffers", None)
    if cached is not None and cached[0] == key:
        padded, spectrum, filtered = cached[1]
        assert isinstance(padded, torch.Tensor) and isinstance(spectrum, torch.Tensor)
        assert isinstance(filtered, torch.Tensor)
        return padded, spectrum, filtered
    padded = torch.empty((step, height, width), dtype=dtype, device=device)
    spectrum = torch.empty((step, height, width // 2 + 1), dtype=_COMPLEX[dtype], device=device)
    buffers = (padded, spectrum, torch.empty_like(padded))
    _WORK.buffers = (key, buffers)
    return buffers


def _replicate_pad(frames: torch.Tensor, out: torch.Tensor, top: int, left: int) -> None:
    """`frames` into `out` at (`top`, `left`), the rest of `out` filled with the nearest edge
    pixel (as `F.pad(mode="replicate")`)."""
    rows, cols = frames.shape[-2:]
    inside = out[:, top : top + rows]
    inside[..., left : left + cols] = frames
    inside[..., :left] = frames[..., :1]
    inside[..., left + cols :] = frames[..., -1:]
    out[:, :top] = out[:, top : top + 1]
    out[:, top + rows :] = out[:, top + rows - 1 : top + rows]


@functools.lru_cache(maxsize=8)
def _response(
    height: int,
    width: int,
    strength: float,
    pixel_size_m: float,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(height, width // 2 + 1, 2) Paganin filter 1 / (1 + strength |f|^2) at the rfft2
    frequencies of a `height` x `width` frame, f in cycles per metre, each value twice (for the
    real and imaginary parts of the spectrum, `torch.view_as_real`); built once per
    geometry."""
    fy = torch.fft.fftfreq(height, d=pixel_size_m, dtype=torch.float64)
    fx = torch.fft.rfftfreq(width, d=pixel_size_m, dtype=torch.float64)
    response = torch.reciprocal(1 + strength * (fy[:, None] ** 2 + fx[None, :] ** 2))
    return response[..., None].expand(-1, -1, 2).to(device, dtype).contiguous()
