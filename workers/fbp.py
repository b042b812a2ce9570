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

import math
from dataclasses import dataclass

import torch

from workers.backproject import BackProjectionGeometry, backproject_geometry
from workers.filters import angle_weights, canonical_filter_name, filter_response
from workers.geometry_cache import GeometryCache

# Geometries (theta, center, cols) an FBP instance remembers; a service sees one or two at once.
_GEOMETRY_CACHE_SIZE = 8
# Work budget per chunk of slices (see `default_work_bytes`): on a CPU, and the least on CUDA.
CPU_WORK_BYTES = 256 << 20
# On CUDA: this fraction of the device's memory, at most CUDA_MAX_WORK_BYTES.
CUDA_WORK_FRACTION = 8
CUDA_MAX_WORK_BYTES = 8 << 30


def default_work_bytes(device_type: str, total_memory: int = 0) -> int:
    """The default `max_work_bytes` of both FBP methods on a device of `device_type` ("cpu",
    "cuda", ...) with `total_memory` bytes.

    256 MiB on a CPU, where bigger chunks only fall out of the cache. On CUDA 1/8 of the
    device's memory, at least 256 MiB and at most 8 GiB (8 GiB on an 80 GB H100, about 2 GB on
    a 16 GB card): 256 MiB there cuts a batch of 2048^2 slices into chunks of 2-3 slices, each a
    string of kernel launches too small to fill the device. The budget bounds a chunk's
    largest temporaries, not all of a call's memory (the filtered sinograms and the output
    come on top: up to about three times the budget for big batches of wide slices), and the
    cap keeps one back-projection gather's index count (budget / 12) well below 2^31."""
    if device_type != "cuda":
        return CPU_WORK_BYTES
    return min(CUDA_MAX_WORK_BYTES, max(CPU_WORK_BYTES, total_memory // CUDA_WORK_FRACTION))


def work_bytes_for(device: torch.device) -> int:
    """`default_work_bytes` for `device`; on CUDA asks the device for its memory."""
    if device.type != "cuda":
        return default_work_bytes(device.type)
    return default_work_bytes("cuda", torch.cuda.get_device_properties(device).total_memory)


def check_inputs(sinograms: torch.Tensor, theta: torch.Tensor, center: float) -> None:
    """ValueError naming the offender unless `sinograms` is (batch, angles, cols) with as many
    `theta` as angles and a finite `center`: the `Reconstructor.reconstruct` contract."""
    if sinograms.ndim != 3:
        raise ValueError(f"sinograms must be (batch, angles, cols), got {tuple(sinograms.shape)}")
    if theta.numel() != sinograms.shape[1]:
        raise ValueError(f"theta has {theta.numel()} angles, the sinograms {sinograms.shape[1]}")
    if not math.isfinite(center):
        raise ValueError(f"center={center} is not a finite number of pixels")


def circle_mask(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) float32, 1 where the pixel centre is within n/2 of the rotation axis."""
    coords = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
    return ((coords[:, None] ** 2 + coords[None, :] ** 2) <= (n / 2) ** 2).to(torch.float32)


@dataclass(frozen=True)
class _FBPGeometry:
    backprojection: BackProjectionGeometry
    filter: torch.Tensor  # (P//2 + 1,) float32 response at the rfft frequencies
    weights: torch.Tensor  # (A, 1) float32 quadrature weights
    padded_size: int
    mask: torch.Tensor | None


class FBP:
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

    def __init__(self, device: str | torch.device = "cpu", filter_name: str = "ramp",
                 circle_mask: bool = False, max_work_bytes: int | None = None) -> None:
        self._device = torch.device(device)
        self.filter_name = canonical_filter_name(filter_name)
        self.circle_mask = circle_mask
        if max_work_bytes is not None and max_work_bytes < 1 << 16:
            raise ValueError(f"max_work_bytes={max_work_bytes} is below 64 KiB: raise it")
        self._max_work_bytes = max_work_bytes
        self.geometries: GeometryCache[_FBPGeometry] = GeometryCache(_GEOMETRY_CACHE_SIZE)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_work_bytes(self) -> int:
        """The work budget: as given, or the device's default, asked of the device on first use
        (so constructing one, e.g. to ask `AutoFBP.method_for`, touches no device)."""
        if self._max_work_bytes is None:
            self._max_work_bytes = work_bytes_for(self._device)
        return self._max_work_bytes

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

    def _geometry(self, theta: torch.Tensor, center: float, cols: int) -> _FBPGeometry:
        """The geometry `reconstruct` uses: from the cache, built here if nobody has."""
        return self.geometries.for_reconstruct(theta, center, cols, self._build, self._device)

    @torch.inference_mode()
    def prepare(self, theta: torch.Tensor, center: float, cols: int) -> bool:
        """Build the geometry `reconstruct` will need for (angles, cols) sinograms at `theta`
        and `center`, from any thread; True if this call built it (False: it was cached, or
        another thread built it while this one waited)."""
        return self.geometries.prepare(theta, center, cols, self._build, self._device)

    def release(self) -> None:
        """The owning thread's scan ended: its geometry may be evicted like any other."""
        self.geometries.release()

    def filter_sinograms(self, sinograms: torch.Tensor, geometry: _FBPGeometry) -> torch.Tensor:
        """Ramp-type filter along the detector and the angle weights: (B, A, C) -> (B, A, C)."""
        cols = sinograms.shape[-1]
        spectrum = torch.fft.rfft(sinograms, n=geometry.padded_size, dim=-1)
        spectrum *= geometry.filter
        filtered = torch.fft.irfft(spectrum, n=geometry.padded_size, dim=-1)[..., :cols]
        return filtered * geometry.weights

    @torch.inference_mode()
    def reconstruct(self, sinograms: torch.Tensor, theta: torch.Tensor,
                    center: float) -> torch.Tensor:
        """(B, A, C) float32 line integrals -> (B, C, C) float32 attenuation per pixel."""
        check_inputs(sinograms, theta, center)
        batch, angles, cols = sinograms.shape
        sinograms = sinograms.to(self._device, torch.float32)
        if batch == 0 or angles == 0:
            return torch.zeros((batch, cols, cols), dtype=torch.float32, device=self._device)
        geometry = self._geometry(theta, center, cols)
        # the back-projector holds (symmetry classes + 1) images per slice: bound that too
        per_slice = 4 * cols * cols * (len(geometry.backprojection.classes) + 1)
        step = max(1, self.max_work_bytes // per_slice)
        slices = torch.empty((batch, cols, cols), dtype=torch.float32, device=self._device)
        for b0 in range(0, batch, step):
            filtered = self.filter_sinograms(sinograms[b0:b0 + step], geometry)
            slices[b0:b0 + step] = backproject_geometry(filtered, geometry.backprojection,
                                                        self.max_work_bytes)
        if geometry.mask is not None:
            slices *= geometry.mask
        return slices
