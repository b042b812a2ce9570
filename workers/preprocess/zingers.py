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
  measured per frame (the median absolute deviation of each pixel from its 4 neighbours'
  mean, on a sample of pixels); so `threshold` is a number of standard deviations, and no
  scale of the data (raw counts or transmission) enters. A floor of `_NOISE_FLOOR` of the
  frame's typical sqrt-intensity keeps noiseless data from turning every edge into a zinger;
- "exceeds the median of the 9 by t" is the same as "at least 5 of the 8 neighbours lie more
  than t below it" (the pixel itself never does), so the test is 8 comparisons per pixel, all
  vectorised; the median itself is computed only at the few pixels found.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.preprocess.arrays import Array, as_float_tensor, restore

# Pixels per frame (every few rows) sampled to measure the noise.
_NOISE_SAMPLE = 1 << 16
# Least noise, as a part of the frame's median sqrt-intensity (see the module docstring).
_NOISE_FLOOR = 2e-3
# Median absolute deviation -> standard deviation (Gaussian), and the spread of a pixel minus
# its 4 neighbours' mean in units of one pixel's.
_MAD_TO_SIGMA = 1.4826
_RESIDUAL_SPREAD = 1.25**0.5
# The 8 neighbours' offsets in a 3 x 3 window.
_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def remove_zingers(projections: Array, threshold: float = 6.0) -> tuple[Array, int]:
    """(count, rows, cols) or (rows, cols) intensities (raw counts less the dark, or
    flat-field-corrected transmission; before -log) -> (cleaned copy, zingers replaced).

    A pixel is replaced by the median of its 3 x 3 neighbourhood (edges replicated) where its
    square root exceeds that median's by more than `threshold` standard deviations of the
    frame's noise (see the module docstring). Counting syncs the device.
    """
    if threshold <= 0:
        raise ValueError(f"threshold={threshold} must be a positive number of noise deviations")
    data = as_float_tensor(projections)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"projections must be (rows, cols) or (count, rows, cols), got {tuple(data.shape)}"
        )
    frames = data.reshape(-1, *data.shape[-2:])
    found = zinger_mask(frames, threshold)
    where = torch.nonzero(found, as_tuple=True)
    count = int(where[0].numel())
    cleaned = frames.clone()
    if count:
        cleaned[where] = _local_median(frames, where)
    return restore(cleaned.reshape(data.shape), projections), count


def zinger_mask(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    """(count, rows, cols) bool: the zingers of `remove_zingers`."""
    root = frames.clamp_min(0).sqrt()
    limit = root - threshold * _noise(root)[:, None, None]
    padded = F.pad(root[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    rows, cols = frames.shape[-2:]
    below = torch.zeros(frames.shape, dtype=torch.uint8, device=frames.device)
    for dy, dx in _NEIGHBOURS:
        below += padded[:, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols] < limit
    return below >= 5


def _noise(root: torch.Tensor) -> torch.Tensor:
    """(count,) standard deviation of each frame's sqrt-intensity noise, robustly, from every
    few rows (about `_NOISE_SAMPLE` pixels a frame)."""
    rows, cols = root.shape[-2:]
    picked = torch.arange(0, rows, max(1, rows * cols // _NOISE_SAMPLE), device=root.device)
    centre = root[:, picked]
    sides = F.pad(centre[:, None], (1, 1, 0, 0), mode="replicate")[:, 0]
    neighbours = (
        root[:, (picked - 1).clamp(min=0)]
        + root[:, (picked + 1).clamp(max=rows - 1)]
        + sides[..., :-2]
        + sides[..., 2:]
    ) / 4
    residual = (centre - neighbours).reshape(root.shape[0], -1)
    spread = _MAD_TO_SIGMA * residual.abs().median(dim=1).values / _RESIDUAL_SPREAD
    typical = centre.reshape(root.shape[0], -1).median(dim=1).values
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
