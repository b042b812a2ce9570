"""Parallel-beam forward projection (Joseph's method) in PyTorch, on any device.

Same geometry as `workers.fbp`: pixel (row, col) of the N x N slice sits at x = col - (N-1)/2,
y = (N-1)/2 - row, and the ray for detector column u at angle theta is the line
x cos(theta) + y sin(theta) = u - (center - 0.5). The slice is the linear interpolant of its pixel
values, zero outside. Joseph's method walks each ray one pixel row (or column, whichever the ray
crosses more steeply) at a time, interpolates linearly between the two pixels it passes, and
scales by the path length per step, 1/|cos| (or 1/|sin|). It is the standard accurate projector
(ASTRA's `linear` CPU kernel); to discretisation error it is the adjoint of
`workers.backproject.backproject_tensor`.

Each ray is a sum of 2N weighted pixels, so the projector is an `embedding_bag` over a
(pixel -> batch) table, the same fused gather-and-reduce the back-projector uses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Ray x step pairs per gather on CPU, sized like the back-projector's chunks (cache-resident).
_CPU_CHUNK_PAIRS = 1 << 21


def _ray_terms(
    theta: np.ndarray, center: float, cols: int, n: int, steep: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each ray crosses each pixel row (steep: |cos| >= |sin|) or column, split as
    ray_term (A, cols) + walk_term (A, N), in pixel units from the slice's first row/column;
    and the path length per step (A,)."""
    coords = np.arange(n) - (n - 1) / 2
    s = np.arange(cols) - (center - 0.5)  # signed distance of each ray from the axis
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    if steep:
        # row r is at y = -coords[r], so x = (s + coords[r] sin) / cos and col = x + (N-1)/2
        return s / cos + (n - 1) / 2, coords * (sin / cos), 1.0 / np.abs(cos[:, 0])
    # column c is at x = coords[c], so y = (s - coords[c] cos) / sin and row = (N-1)/2 - y
    return (n - 1) / 2 - s / sin, coords * (cos / sin), 1.0 / np.abs(sin[:, 0])


def project_tensor(
    volume: torch.Tensor,
    theta: torch.Tensor,
    center: float,
    cols: int,
    max_work_bytes: int = 256 << 20,
) -> torch.Tensor:
    """Line integrals of each (B, N, N) slice: -> (B, A, cols) float32 on the volume's device.

    `theta` is (A,) radians, `center` TomoPy's rotation axis (cols/2 = the detector's middle).
    Units: slice values are attenuation per pixel, results are line integrals in pixel lengths.
    """
    if volume.ndim != 3 or volume.shape[1] != volume.shape[2]:
        raise ValueError(f"volume must be (batch, N, N), got {tuple(volume.shape)}")
    batch, n, _ = volume.shape
    device = volume.device
    theta64 = theta.detach().to("cpu", torch.float64).numpy().reshape(-1)
    angles = len(theta64)
    out = torch.zeros((batch, angles, cols), dtype=torch.float32, device=device)
    if batch == 0 or angles == 0 or cols == 0 or n == 0:
        return out
    padded = n + 3  # one zero row/column before the slice, two after: off-slice taps read 0
    with torch.inference_mode():
        image = F.pad(volume.to(torch.float32), (1, 2, 1, 2))
        table = image.permute(1, 2, 0).reshape(padded * padded, batch).contiguous()
        # interpolation as table[i] + frac * (table[i + stride] - table[i]): one index, two gathers
        slope_along_row = torch.zeros_like(table)
        slope_along_row[:-1] = table[1:] - table[:-1]
        slope_along_col = torch.zeros_like(table)
        slope_along_col[:-padded] = table[padded:] - table[:-padded]
        steep = np.abs(np.cos(theta64)) >= np.abs(np.sin(theta64))
        budget = max(1, max_work_bytes // 12)
        if device.type == "cpu":
            budget = min(budget, _CPU_CHUNK_PAIRS)
        step_angles = max(1, budget // (cols * n))
        for kind in (True, False):
            chosen = np.flatnonzero(steep == kind)
            slope = slope_along_row if kind else slope_along_col
            for a0 in range(0, len(chosen), step_angles):
                picked = chosen[a0 : a0 + step_angles]
                sums = _project_chunk(table, slope, theta64[picked], center, cols, n, kind, budget)
                out[:, torch.as_tensor(picked, device=device)] = sums
    return out


def _project_chunk(
    table: torch.Tensor,
    slope: torch.Tensor,
    theta: np.ndarray,
    center: float,
    cols: int,
    n: int,
    steep: bool,
    budget: int,
) -> torch.Tensor:
    """Rays of angles `theta` (all steep or all shallow): -> (B, len(theta), cols)."""
    device = table.device
    padded = n + 3
    ray_term, walk_term, step = _ray_terms(theta, center, cols, n, steep)
    position = (
        torch.as_tensor(ray_term, dtype=torch.float32, device=device)[:, :, None]
        + torch.as_tensor(walk_term, dtype=torch.float32, device=device)[:, None, :]
    )
    position.clamp_(-1.0, float(n)).add_(1.0)  # padded coordinate in [0, n + 1]
    index = position.to(torch.int32)  # position >= 0, so truncation is floor
    frac = position.sub_(index)
    fixed = torch.arange(1, n + 1, dtype=torch.int32, device=device)  # padded row/col walked
    if steep:
        index += fixed * padded
    else:
        index *= padded
        index += fixed
    index = index.view(-1, n)
    frac = frac.view(-1, n)
    rays = index.shape[0]
    ray_step = max(1, budget // n)
    sums = torch.empty((rays, table.shape[1]), dtype=torch.float32, device=device)
    for r0 in range(0, rays, ray_step):
        r1 = min(rays, r0 + ray_step)
        part = F.embedding_bag(index[r0:r1], table, mode="sum")
        part += F.embedding_bag(index[r0:r1], slope, mode="sum", per_sample_weights=frac[r0:r1])
        sums[r0:r1] = part
    sums = sums.view(len(theta), cols, -1)
    sums *= torch.as_tensor(step, dtype=torch.float32, device=device)[:, None, None]
    return sums.permute(2, 0, 1)
