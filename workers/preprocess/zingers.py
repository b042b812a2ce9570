"""Zingers: isolated bright pixels from stray X-rays or cosmic rays hitting the detector, found
against the median of their 3 x 3 neighbourhood in their own frame, replaced by that median and
counted, on intensities before -log (a zinger there is a large bright outlier; after -log it is
a small negative one, and the ramp filter spreads it as a streak across the slice).

The rule is the classic median test (as TomoPy's `remove_outlier`, Gürsoy et al., J. Synchrotron
Rad. 21:1188, 2014; and Vo's `remove_zinger` in algotom): a pixel is a zinger where it exceeds
its neighbourhood median by more than a threshold. Two choices make it hold for any intensity
and cheap:

- the threshold is in noise units: the test runs on sqrt(intensity), where Poisson noise has
  the same spread at every intensity (the square root stabilises its variance), that spread
  measured on the frames at hand (the median absolute deviation of a pixel from its 4
  neighbours' mean, on a sample of pixels); so `threshold` is a number of standard
  deviations, and no scale of the data (raw counts or transmission) enters. A floor of
  `_NOISE_FLOOR` of the typical sqrt-intensity keeps noiseless data from turning every edge
  into a zinger;
- "exceeds the median of the 9 by t" is the same as "at least 5 of the 8 neighbours lie more
  than t below it" (the pixel itself never does), so no median is computed but at the few
  pixels found; and 5 of 8 below puts both of some opposite pair below, which rules out
  nearly every pixel in a few elementwise passes before any counting (`zinger_mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.preprocess.arrays import Array, as_float_tensor, chunk_elements, restore

# Pixels of frames tested at a time; pixels (every few rows of every few frames) sampled to
# measure the noise.
_CHUNK_ELEMENTS = 1 << 17
_NOISE_SAMPLE = 1 << 16
# Least noise, as a part of the frame's median sqrt-intensity (see the module docstring).
_NOISE_FLOOR = 2e-3
# Median absolute deviation -> standard deviation (Gaussian), and the spread of a pixel minus
# its 4 neighbours' mean in units of one pixel's.
_MAD_TO_SIGMA = 1.4826
_RESIDUAL_SPREAD = 1.25**0.5
# The 8 neighbours' offsets in a 3 x 3 window.
_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def remove_zingers(
    projections: Array, threshold: float = 6.0, in_place: bool = False
) -> tuple[Array, int]:
    """(count, rows, cols) or (rows, cols) intensities (raw counts less the dark, or
    flat-field-corrected transmission; before -log) -> (cleaned copy, zingers replaced).

    A pixel is replaced by the median of its 3 x 3 neighbourhood (edges replicated) where its
    square root exceeds that median's by more than `threshold` standard deviations of the
    frames' noise (see the module docstring). Counting syncs the device. `in_place`: clean a
    float32/float64 `projections` itself (no copy: what a caller that owns it wants) and
    return it.
    """
    if threshold <= 0:
        raise ValueError(f"threshold={threshold} must be a positive number of noise deviations")
    data = as_float_tensor(projections)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"projections must be (rows, cols) or (count, rows, cols), got {tuple(data.shape)}"
        )
    frames = data.reshape(-1, *data.shape[-2:])
    if not frames.numel():
        return restore(data if in_place else data.clone(), projections), 0
    margin = threshold * _noise(frames)
    cleaned = frames if in_place else torch.empty_like(frames)
    count = 0
    # a few frames at a time: the passes of `_find` then work in the CPU's caches
    step = max(1, chunk_elements(frames.device, _CHUNK_ELEMENTS) // frames[0].numel())
    for f0 in range(0, frames.shape[0], step):
        part, out = frames[f0 : f0 + step], cleaned[f0 : f0 + step]
        if not in_place:
            out.copy_(part)
        where = _find(part, margin)
        if where[0].numel():
            count += int(where[0].numel())
            out[where] = _local_median(part, where)
    return restore(cleaned.reshape(data.shape), projections), count


def zinger_mask(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    """(count, rows, cols) bool: the zingers of `remove_zingers` (see `_find`)."""
    found = torch.zeros(frames.shape, dtype=torch.bool, device=frames.device)
    found[_find(frames, threshold * _noise(frames))] = True
    return found


def _find(frames: torch.Tensor, margin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(frame, row, col) indices of the pixels of (count, rows, cols) whose square root exceeds
    that of at least 5 of their 8 neighbours by more than `margin`.

    Five of the 8 neighbours below the limit put both of some opposite pair below it (there
    are 4 pairs): so the pixels where no pair's larger value is below the limit are ruled out
    in 7 elementwise passes, and the 8 neighbours are counted only at the few left.
    """
    root = frames.clamp_min(0).sqrt_()
    rows, cols = frames.shape[-2:]
    padded = F.pad(root[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]

    def neighbour(dy: int, dx: int) -> torch.Tensor:
        return padded[:, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]

    lowest_pair = torch.maximum(neighbour(0, -1), neighbour(0, 1))
    pair = torch.empty_like(lowest_pair)
    for (ay, ax), (by, bx) in (((-1, 0), (1, 0)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1))):
        torch.maximum(neighbour(ay, ax), neighbour(by, bx), out=pair)
        torch.minimum(lowest_pair, pair, out=lowest_pair)
    candidates = torch.nonzero(lowest_pair.add_(margin) < root, as_tuple=True)
    if not candidates[0].numel():
        return candidates
    frame, row, col = candidates
    limit = root[candidates] - margin
    # the 8 neighbours of each candidate in one gather from the flattened padded frames
    width = cols + 2
    at = (frame * (rows + 2) + row + 1) * width + col + 1
    offsets = torch.tensor([dy * width + dx for dy, dx in _NEIGHBOURS], device=frames.device)
    neighbours = padded.reshape(-1)[at[:, None] + offsets]
    zinger = (neighbours < limit[:, None]).sum(dim=1) >= 5
    return frame[zinger], row[zinger], col[zinger]


def _noise(frames: torch.Tensor) -> torch.Tensor:
    """The standard deviation of the sqrt-intensity noise, robustly, from about
    `_NOISE_SAMPLE` pixels on every few rows of every few frames (one value: in sqrt-intensity
    the Poisson spread is the same for every frame of a scan)."""
    count, rows, cols = frames.shape
    step = max(1, count * rows * cols // (4 * _NOISE_SAMPLE))
    picked = torch.arange(0, rows, min(step, rows), device=frames.device)
    # and every few frames, where every few rows would still be too many
    every = max(1, count * len(picked) * cols // _NOISE_SAMPLE)
    sample = frames[::every]

    def root(at: torch.Tensor) -> torch.Tensor:
        return sample[:, at].clamp_min(0).sqrt_()

    centre = root(picked)
    sides = F.pad(centre[:, None], (1, 1, 0, 0), mode="replicate")[:, 0]
    neighbours = (
        root((picked - 1).clamp(min=0))
        + root((picked + 1).clamp(max=rows - 1))
        + sides[..., :-2]
        + sides[..., 2:]
    ) / 4
    residual = (centre - neighbours).reshape(-1)
    stride = max(1, residual.numel() // _NOISE_SAMPLE)
    spread = _MAD_TO_SIGMA * residual[::stride].abs().median() / _RESIDUAL_SPREAD
    typical = centre.reshape(-1)[::stride].median()
    return torch.maximum(spread, _NOISE_FLOOR * typical)


def _local_median(frames: torch.Tensor, where: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Median of the 3 x 3 neighbourhood (edges replicated) of each pixel in `where`."""
    frame, row, col = where
    rows, cols = frames.shape[-2:]
    values = torch.stack(
        [
            frames[frame, (row + dy).clamp(0, rows - 1), (col + dx).clamp(0, cols - 1)]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ],
        dim=1,
    )
    return values.median(dim=1).values
