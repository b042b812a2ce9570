"""Stripe (ring artifact) removal in sinograms of line integrals: (batch, angles, cols) in, same
out, on the data's device, batched over rows.

A detector pixel whose response the flats do not capture (a gain error, a scintillator defect)
adds the same error at every angle: a vertical stripe in the sinogram, a ring after FBP. Real
structure varies with angle; a stripe does not. The methods:

- "sorting" (N. T. Vo, R. C. Atwood, M. Drakopoulos, "Superior techniques for eliminating ring
  artifacts in X-ray micro-tomography", Opt. Express 26(22):28396, 2018, algorithm 3): sort
  each column along the angles, so every column becomes a smooth monotone profile and a stripe
  a column that sits off its neighbours; a median across `size` columns puts it back in line;
  the values are returned to their angles. The median runs on blocks of `rank_block` sorted
  values and the correction is interpolated back along the rank (the sorted profiles are
  smooth along it): the median, the costly step, shrinks by that factor; 1 is the paper's.
- "filtering" (same paper, algorithm 2 with sorting: Vo's sorting + filtering combination):
  split each column into its part smooth along the angles (Gaussian, `sigma`) and the rest;
  sort and median-filter only the smooth part, where stripes live, and add the rest back
  untouched, so noise and fine detail pass through. The smooth part is band-limited, so the
  sort and the median run on a few dozen samples of it (see `remove_stripes_filtering`).
- "large" (algorithm 5): columns whose trimmed mean in the sorted sinogram stands out from the
  sorted sinogram's median across `size` columns by more than `snr` robust deviations are
  corrected by that offset and replaced by their sorted-median values (wide stripes).
- "vo-all": "large" then "filtering", the paper's recipe for stripes of every width.
- "fourier-wavelet" (B. Münch, P. Trtik, F. Marone, M. Stampanoni, "Stripe and ring artifact
  removal with combined wavelet-Fourier filtering", Opt. Express 17(10):8567, 2009): a
  Daubechies DWT of the sinogram over `levels` levels (`workers.preprocess.wavelets`); in each
  level's band that is detail along the detector and smooth along the angles (where vertical
  stripes land), the Fourier transform along the angles is damped near zero frequency by
  1 - exp(-k^2 / (2 sigma^2)); inverse DWT.
- "auto": the recommended method, "filtering" with its defaults: of these it is the one that
  meets both done-criteria of issue 15 in tests/unit/workers/test_stripes.py (the gain rings
  of a foam scan cut to at most 0.6x the error, a ring-free scan changed by at most 10%) and it
  is the cheapest. "sorting" and "large" also touch ring-free data where a sorted profile
  curves across columns (the edge of a sample centred on the axis, which is itself constant in
  angle), and the wavelet method damps every feature constant or slowly varying in angle at
  the scales it filters: both show in the same tests.

A median across columns cannot tell a stripe from the sample where the sinogram changes across
the window by more than the stripe's height; so the window (`default_window`) follows the
detector's width, as a sample's features do.

Every median across columns is a running median by a selection network
(`workers.preprocess.median`): the same values as a median per window, vectorised.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from workers.preprocess.arrays import (
    Array,
    as_float_tensor,
    chunk_elements,
    restore,
    sinogram_batch,
)
from workers.preprocess.median import running_median
from workers.preprocess.wavelets import daubechies, dwt2, idwt2

METHODS = ("auto", "sorting", "filtering", "large", "vo-all", "fourier-wavelet")
# Elements of the data interpolated and added at a time (they stay in the CPU's caches).
_CHUNK_ELEMENTS = 1 << 16
# Least spread of the column offsets "large" measures stripes against, in line-integral units
# (a 0.1% gain): on noiseless data the spread is ~0 and every column would stand out.
_LEAST_SPREAD = 1e-3
# Robust-deviation scale: the MAD of a Gaussian times this is its standard deviation.
_MAD_TO_SIGMA = 1.4826


def remove_stripes(
    sinograms: Array, method: str = "auto", in_place: bool = False, **options: float
) -> Array:
    """(angles, cols) or (batch, angles, cols) line integrals -> the same with stripes removed
    by `method` (see the module docstring); `options` go to that method's function.
    `in_place`: a float32/float64 `sinograms` may be overwritten with the result (what a
    caller that owns it wants: at a detector's width the data no longer fit the CPU's caches
    and each copy costs); use the returned value either way."""
    functions = {
        "sorting": remove_stripes_sorting,
        "filtering": remove_stripes_filtering,
        "large": remove_large_stripes,
        "vo-all": remove_stripes_vo,
        "fourier-wavelet": remove_stripes_fourier_wavelet,
    }
    name = "filtering" if method == "auto" else method
    if name not in functions:
        raise ValueError(f"stripe removal method={method!r}: choose one of {', '.join(METHODS)}")
    if name == "filtering":
        return remove_stripes_filtering(sinograms, in_place=in_place, **options)  # type: ignore[arg-type]
    return functions[name](sinograms, **options)  # type: ignore[operator,no-any-return]


def remove_stripes_sorting(sinograms: Array, size: int | None = None, rank_block: int = 4) -> Array:
    """Vo et al. 2018, algorithm 3 (see the module docstring); `size` defaults to
    `default_window(cols)`."""
    data = as_float_tensor(sinograms)
    batch = sinogram_batch(data)
    size = _window(size, batch.shape[-1])
    result = batch + _sorted_median_correction(batch, size, rank_block)
    return restore(result.reshape(data.shape), sinograms)


def remove_stripes_filtering(
    sinograms: Array, sigma: float = 0.5, size: int | None = None, in_place: bool = False
) -> Array:
    """Vo et al. 2018, algorithm 2 with sorting (see the module docstring). `sigma`: width of
    the Gaussian low-pass along the angles, in angular frequency samples (the paper's 3 keeps
    more of the angular variation in the part that is median-filtered; 0.5 keeps little more
    than each column's mean and its first harmonics, which spared ring-free foam scans best in
    the tests); `size` defaults to `default_window(cols)`.

    The smooth part is band-limited, so it is sampled at `_smooth_samples(sigma)` angles
    (evaluated from its few cosine coefficients: two thin matrix products), sorted and filtered
    there, and the correction, as smooth along the angles as the part it came from, is
    interpolated back linearly: the sort and the median, the costly steps, run on a few dozen
    angles. `in_place`: see `remove_stripes`.
    """
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be positive")
    data = as_float_tensor(sinograms)
    batch = sinogram_batch(data)
    angles = batch.shape[1]
    size = _window(size, batch.shape[-1])
    samples = min(angles, _smooth_samples(sigma))
    analysis, synthesis = _lowpass_operators(angles, samples, sigma, batch)
    # (batch, cols, samples): each column's smooth part contiguous, for the sort
    smooth = torch.matmul(torch.matmul(analysis, batch).transpose(1, 2), synthesis.T)
    ordered, order = torch.sort(smooth, dim=-1)
    median = _median_along_cols(ordered.transpose(1, 2).contiguous(), size).transpose(1, 2)
    correction = torch.empty_like(ordered).scatter_(-1, order, median - ordered)
    result = _add_interpolated(batch, correction, batch if in_place else torch.empty_like(batch))
    return restore(result.reshape(data.shape), sinograms)


def remove_large_stripes(
    sinograms: Array, snr: float = 3.0, size: int | None = None, drop_ratio: float = 0.1
) -> Array:
    """Vo et al. 2018, algorithm 5, additive (line integrals: a gain error is an offset), on
    the columns it detects only. `size` defaults to 3 `default_window(cols)`, at most 51
    (the paper's)."""
    data = as_float_tensor(sinograms)
    batch = sinogram_batch(data)
    angles, cols = batch.shape[-2:]
    size = _window(size if size is not None else min(51, 3 * default_window(cols)), cols)
    ordered, order = torch.sort(batch, dim=1)
    smooth = _median_along_cols(ordered, size)
    drop = int(0.5 * min(max(drop_ratio, 0.0), 0.8) * angles)
    kept = slice(drop, angles - drop)
    offset = ordered[:, kept].mean(dim=1) - smooth[:, kept].mean(dim=1)  # (batch, cols)
    stripe = _outliers(offset, snr)
    stripe = F.max_pool1d(stripe[:, None].to(batch.dtype), 3, 1, 1)[:, 0] > 0  # one more column
    corrected = batch - torch.where(stripe, offset, torch.zeros_like(offset))[:, None, :]
    replaced = torch.empty_like(smooth).scatter_(1, order, smooth)
    result = torch.where(stripe[:, None, :], replaced, corrected)
    return restore(result.reshape(data.shape), sinograms)


def remove_stripes_vo(
    sinograms: Array,
    snr: float = 3.0,
    large_size: int | None = None,
    size: int | None = None,
    sigma: float = 0.5,
) -> Array:
    """Vo et al. 2018's combination for all stripe sizes: large stripes (algorithm 5), then
    the rest (algorithm 2 with sorting)."""
    cleaned = remove_large_stripes(sinograms, snr=snr, size=large_size)
    return remove_stripes_filtering(cleaned, sigma=sigma, size=size)


def remove_stripes_fourier_wavelet(
    sinograms: Array, levels: int = 4, order: int = 5, sigma: float = 2.0
) -> Array:
    """Münch et al. 2009 with a `order`-moment Daubechies wavelet (db5 by default, TomoPy's)
    over `levels` levels; `sigma` is the Gaussian damping width in angular frequency samples
    of each band (see the module docstring)."""
    if levels < 1 or sigma <= 0:
        raise ValueError(f"levels={levels} and sigma={sigma} must be positive")
    data = as_float_tensor(sinograms)
    batch = sinogram_batch(data)
    angles, cols = batch.shape[-2:]
    low = daubechies(order)
    # reflect-pad to a multiple of 2^levels (and by a filter length, so the periodic transform
    # wraps onto mirrored data, not onto the opposite edge)
    unit = 1 << levels
    pad_rows = (-angles) % unit + unit * math.ceil(len(low) / unit)
    pad_cols = (-cols) % unit + unit * math.ceil(len(low) / unit)
    image = _reflect_pad(batch, pad_rows, pad_cols)
    details = []
    for _ in range(levels):
        bands = dwt2(image, low)
        vertical = bands[:, 1]
        frequency = torch.fft.fftfreq(vertical.shape[-2], 1 / vertical.shape[-2])
        damping = 1 - torch.exp(-(frequency**2) / (2 * sigma**2))
        spectrum = torch.fft.fft(vertical, dim=-2) * damping.to(vertical.device)[:, None]
        bands = torch.stack(
            [bands[:, 0], torch.fft.ifft(spectrum, dim=-2).real, bands[:, 2], bands[:, 3]], 1
        )
        details.append(bands[:, 1:])
        image = bands[:, 0]
    for detail in reversed(details):
        image = idwt2(torch.cat([image[:, None], detail], dim=1), low)
    result = image[:, pad_rows // 2 : pad_rows // 2 + angles, pad_cols // 2 : pad_cols // 2 + cols]
    return restore(result.reshape(data.shape), sinograms)


def _sorted_median_correction(smooth: torch.Tensor, size: int, rank_block: int) -> torch.Tensor:
    """Per value: what the median across `size` columns of the angle-sorted `smooth` changes,
    returned to each value's angle. With rank_block > 1 the median runs on block means of
    `rank_block` sorted values and the correction is interpolated linearly along the rank."""
    angles = smooth.shape[1]
    ordered, order = torch.sort(smooth, dim=1)
    if rank_block > 1 and angles >= 4 * rank_block:
        blocks = angles // rank_block
        means = (
            F.avg_pool1d(
                ordered.transpose(1, 2).reshape(-1, 1, angles)[..., : blocks * rank_block],
                rank_block,
            )
            .reshape(smooth.shape[0], smooth.shape[2], blocks)
            .transpose(1, 2)
        )
        change = _median_along_cols(means, size) - means  # (batch, blocks, cols)
        # block b's mean sits at rank b * rank_block + (rank_block - 1)/2
        change = (
            F.interpolate(
                change.transpose(1, 2).reshape(-1, 1, blocks),
                size=angles,
                mode="linear",
                align_corners=False,
            )
            .reshape(smooth.shape[0], smooth.shape[2], angles)
            .transpose(1, 2)
        )
    else:
        change = _median_along_cols(ordered, size) - ordered
    return torch.empty_like(change).scatter_(1, order, change)


def _median_along_cols(data: torch.Tensor, size: int) -> torch.Tensor:
    """Median over `size` neighbouring columns (reflect at the edges) of (batch, rows, cols)."""
    return running_median(data, size)


def _smooth_samples(sigma: float) -> int:
    """Angles at which a part low-passed with `sigma` is sampled: 4 per period of its highest
    harmonic that matters (`_harmonics`), at least 64."""
    return max(64, 4 * _harmonics(sigma))


def _harmonics(sigma: float) -> int:
    """Highest cosine index (cycles per two scans) kept by the low-pass: the weight
    exp(-k^2 / (2 (2 sigma)^2)) is below e^-12 past it."""
    return math.ceil(2 * sigma * math.sqrt(24)) + 1


def _lowpass_operators(
    angles: int, samples: int, sigma: float, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian low-pass of a column, reflected at both ends (so its ends do not wrap onto
    each other), evaluated at `samples` evenly spaced angles, as two factors: (harmonics,
    angles) `analysis`, the column's weighted cosine coefficients, and (samples, harmonics)
    `synthesis`; `synthesis @ analysis` is the (samples, angles) low-pass. The reflected
    column's Fourier series is the cosine series sum_k c_k cos(pi k (t + 1/2) / angles),
    c_k = (2 - [k = 0]) / angles sum_t x_t cos(pi k (t + 1/2) / angles) (a DCT-II), weighted by
    exp(-k^2 / (2 (2 sigma)^2)) (k counts cycles per two scans, hence 2 sigma)."""
    analysis, synthesis = _lowpass_factors(angles, samples, sigma)
    return analysis.to(like.device, like.dtype), synthesis.to(like.device, like.dtype)


@functools.lru_cache(maxsize=16)
def _lowpass_factors(angles: int, samples: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_lowpass_operators` in float64 on the CPU, built once per geometry."""
    harmonics = torch.arange(min(angles, _harmonics(sigma) + 1), dtype=torch.float64)
    t = torch.arange(angles, dtype=torch.float64)
    analysis = torch.cos(math.pi * harmonics[:, None] * (t[None, :] + 0.5) / angles)
    weight = torch.exp(-(harmonics**2) / (2 * (2 * sigma) ** 2)) * 2 / angles
    weight[0] /= 2
    # sample j stands for the block of angles around (j + 1/2) angles / samples - 1/2
    tau = (torch.arange(samples, dtype=torch.float64) + 0.5) * angles / samples - 0.5
    synthesis = torch.cos(math.pi * harmonics[None, :] * (tau[:, None] + 0.5) / angles)
    return weight[:, None] * analysis, synthesis


@functools.lru_cache(maxsize=16)
def _interpolation(angles: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation from `samples` evenly spaced angles (as `_lowpass_factors` places
    them) back to all `angles`: angle t sits at (t + 1/2) samples / angles - 1/2 on the
    samples' axis, clamped to it; (angles,) index of the sample below and weight of the one
    above."""
    t = torch.arange(angles, dtype=torch.float64)
    position = ((t + 0.5) * samples / angles - 0.5).clamp(0, samples - 1)
    left = position.floor().clamp(max=max(samples - 2, 0))
    return left.long(), position - left


def _add_interpolated(
    batch: torch.Tensor, correction: torch.Tensor, result: torch.Tensor
) -> torch.Tensor:
    """(batch, angles, cols) plus the (batch, cols, samples) `correction` interpolated
    linearly along the samples to the angles (`_interpolation`), into `result` (which may be
    `batch`), a few angles at a time so that the data pass through memory once."""
    angles, cols = batch.shape[1:]
    left, fraction = _interpolation(angles, correction.shape[-1])
    left, fraction = left.to(batch.device), fraction.to(batch.device, batch.dtype)
    by_sample = correction.transpose(1, 2).contiguous()  # (batch, samples, cols)
    step = torch.diff(by_sample, dim=1, append=by_sample[:, -1:])  # next sample minus this
    chunk = max(1, chunk_elements(batch.device, _CHUNK_ELEMENTS) // (batch.shape[0] * cols))
    for a0 in range(0, angles, chunk):
        below, weight = left[a0 : a0 + chunk], fraction[a0 : a0 + chunk, None]
        out = result[:, a0 : a0 + chunk]
        torch.addcmul(batch[:, a0 : a0 + chunk], step.index_select(1, below), weight, out=out)
        out.add_(by_sample.index_select(1, below))
    return result


def _outliers(values: torch.Tensor, snr: float) -> torch.Tensor:
    """Where (batch, n) offsets depart from their row's median by more than `snr` robust
    standard deviations, the deviation counted as at least `_LEAST_SPREAD`."""
    deviation = values - values.median(dim=-1, keepdim=True).values
    spread = _MAD_TO_SIGMA * deviation.abs().median(dim=-1, keepdim=True).values
    return deviation.abs() > snr * spread.clamp_min(_LEAST_SPREAD)


def _reflect_pad(data: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Pad (batch, angles, cols) by `rows` and `cols` in all, split evenly (odd one at the end)
    by reflection (repeatedly for pads larger than the data)."""
    out = data[:, None]
    for axis, total in ((-2, rows), (-1, cols)):
        before, after = total // 2, total - total // 2
        while before or after:
            length = out.shape[axis]
            b, a = min(before, length - 1), min(after, length - 1)
            pad = (0, 0, b, a) if axis == -2 else (b, a, 0, 0)
            out = F.pad(out, pad, mode="reflect")
            before, after = before - b, after - a
    return out[:, 0]


def default_window(cols: int) -> int:
    """The median window across columns for a `cols`-wide sinogram: about cols/32, odd, in
    [5, 31]. The sorted profiles' structure scales with the detector (a sample fills it), and
    a window much wider than that structure bends real edges; the paper's 21 is for 2k
    detectors (the ring tests of tests/unit/workers/test_stripes.py were tuned on 256 and 512
    columns)."""
    return max(5, min(31, 2 * round(cols / 64) + 1))


def _window(size: int | None, cols: int) -> int:
    size = default_window(cols) if size is None else int(size)
    if size < 3 or size % 2 == 0 or size >= cols:
        raise ValueError(f"size={size}: use an odd window of at least 3 columns, below {cols}")
    return size
