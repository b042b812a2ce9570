"""Filtered back-projection (FBP) of parallel-beam sinograms in PyTorch, on any device: the
direct method.

Geometry (DESIGN.md): pixel (row, col) of the N x N slice, N = cols, sits at x = col - (N-1)/2,
y = (N-1)/2 - row; at angle theta the ray through it meets detector column
u = x cos(theta) + y sin(theta) + (center - 0.5). Units: line integrals in, attenuation per pixel
out, the same scale as scikit-image's `iradon`, TomoPy's `fbp` and ASTRA.

Each projection is filtered along the detector and weighted by its share of [0, pi)
(`workers.filters`), then back-projected pixel by pixel with linear interpolation along u
(`workers.backproject`). `workers.gridding` is the other method, with the same filters, geometry
and units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.backproject import BackProjectionGeometry, backproject_geometry
from workers.fbp_base import (  # noqa: F401  (re-exported: the FBP module's public helpers)
    CachedGeometryFBP,
    check_inputs,
    circle_mask,
    default_work_bytes,
    work_bytes_for,
)
from workers.filters import angle_weights, filter_response

# Geometries (theta, center, cols) an FBP instance remembers; a service sees one or two at once.
_GEOMETRY_CACHE_SIZE = 8


@dataclass(frozen=True)
class _FBPGeometry:
    backprojection: BackProjectionGeometry
    filter: torch.Tensor  # (P//2 + 1,) float32 response at the rfft frequencies
    weights: torch.Tensor  # (A, 1) float32 quadrature weights
    padded_size: int
    mask: torch.Tensor | None


class FBP(CachedGeometryFBP[_FBPGeometry]):
    """Filtered back-projection satisfying `workers.protocols.PreparableReconstructor`.

    Threading: an instance is owned by one worker thread, which calls `reconstruct`; `prepare`
    may be called from any other thread at the same time (it only fills the geometry cache,
    `geometries`, which is thread-safe). The cache keeps the geometry (filter, weights, cos/sin
    terms) of the last few (theta, center, cols), so a stream of row batches with the same scan
    geometry recomputes none of it; the owner calls `release` when a scan ends. Uses torch's
    intra-op threads (all cores by default, `torch.set_num_threads` to change).
    `max_work_bytes` bounds the temporaries of one back-projection chunk (index and weight per
    pixel x angle), not the inputs and outputs; None takes `default_work_bytes` for the
    device: 256 MiB on a CPU, 1/8 of the device's memory up to 8 GiB on CUDA.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        filter_name: str = "ramp",
        circle_mask: bool = False,
        max_work_bytes: int | None = None,
    ) -> None:
        super().__init__(device, filter_name, circle_mask, max_work_bytes, _GEOMETRY_CACHE_SIZE)

    def _build(self, theta64: torch.Tensor, center: float, cols: int) -> _FBPGeometry:
        theta = theta64.numpy()
        device = self._device
        size, response = filter_response(self.filter_name, cols, device)
        return _FBPGeometry(
            BackProjectionGeometry.build(theta, center, cols, device),
            response,
            torch.as_tensor(angle_weights(theta)[:, None], dtype=torch.float32, device=device),
            size,
            circle_mask(cols, device) if self.circle_mask else None,
        )

    def filter_sinograms(self, sinograms: torch.Tensor, geometry: _FBPGeometry) -> torch.Tensor:
        """Ramp-type filter along the detector and the angle weights: (B, A, C) -> (B, A, C)."""
        cols = sinograms.shape[-1]
        spectrum = torch.fft.rfft(sinograms, n=geometry.padded_size, dim=-1)
        spectrum *= geometry.filter
        filtered: torch.Tensor = torch.fft.irfft(spectrum, n=geometry.padded_size, dim=-1)[
            ..., :cols
        ]
        return filtered * geometry.weights

    def _reconstruct(self, sinograms: torch.Tensor, geometry: _FBPGeometry) -> torch.Tensor:
        batch, _, cols = sinograms.shape
        # the back-projector holds (symmetry classes + 1) images per slice: bound that too
        per_slice = 4 * cols * cols * (len(geometry.backprojection.classes) + 1)
        step = max(1, self.max_work_bytes // per_slice)
        slices = torch.empty((batch, cols, cols), dtype=torch.float32, device=self._device)
        for b0 in range(0, batch, step):
            filtered = self.filter_sinograms(sinograms[b0 : b0 + step], geometry)
            slices[b0 : b0 + step] = backproject_geometry(
                filtered, geometry.backprojection, self.max_work_bytes
            )
        if geometry.mask is not None:
            slices *= geometry.mask
        return slices
