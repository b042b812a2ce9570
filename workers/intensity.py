"""Intensity normalisation per scan: one robust, scale-equivariant level for a whole scan.

A network sees values near the level it was trained at. Attenuation per pixel depends on the
sample, the energy and the pixel size, so a fixed input scale holds for one material at one
pixel size only. The engine instead measures the scan's own level (`intensity_level`) and divides
it by the artifact's reference level (`ModelMetadata.level`): that factor maps the scan to the
training level and its result back (`workers.denoise.DenoiseEngine.scale_for`).

The level is the `LEVEL_PERCENTILE` percentile of |x| over the central region of the slices
(the middle `CENTRAL_FRACTION` of each side: inside the reconstruction circle, away from the
FBP rim), after `POOL` x `POOL` averaging so that noise and sparse-view streaks weigh little.
Averaging, |x| and a linearly interpolated percentile are all positively homogeneous:
level(k x) = k level(x) for every k > 0, up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVEL_PERCENTILE = 90.0
CENTRAL_FRACTION = 0.7
POOL = 16
# torch.quantile takes at most 2**24 elements; slices beyond this many are subsampled evenly.
MAX_SLICES = 64


def intensity_level(slices: torch.Tensor) -> float:
    """The robust level of (..., H, W) slices (a volume, or a batch of adjacent-slice stacks):
    0.0 when they are all zero. Computed in float32 on the slices' device; one host sync."""
    if slices.ndim < 2 or slices.shape[-1] < 1 or slices.shape[-2] < 1:
        raise ValueError(f"slices must be (..., H, W) with H, W >= 1, got {tuple(slices.shape)}")
    images = slices.reshape(-1, *slices.shape[-2:])
    if images.shape[0] > MAX_SLICES:
        pick = torch.linspace(0, images.shape[0] - 1, MAX_SLICES, device=images.device)
        images = images.index_select(0, pick.round().long())
    height, width = images.shape[-2:]
    keep_h = max(1, round(height * CENTRAL_FRACTION))
    keep_w = max(1, round(width * CENTRAL_FRACTION))
    top, left = (height - keep_h) // 2, (width - keep_w) // 2
    central = images[:, None, top : top + keep_h, left : left + keep_w].float()
    pool = min(POOL, keep_h, keep_w)
    pooled = F.avg_pool2d(central, pool).abs().flatten()
    if pooled.numel() > 2**24:
        pooled = pooled[:: -(-pooled.numel() // 2**24)]
    return float(torch.quantile(pooled, LEVEL_PERCENTILE / 100.0))
