"""What both FBP methods share: the `Reconstructor` contract's input checks, the work budget,
and the per-geometry state kept in a `GeometryCache` that another thread may fill ahead
(`prepare`) while the owning thread reconstructs.

`CachedGeometryFBP` is the template: `reconstruct` checks its inputs, moves them to the device
in float32, fetches the geometry and hands both to the method's `_reconstruct`; a method
supplies `_build` (theta, center, cols -> its geometry) and `_reconstruct`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import torch

from workers.filters import canonical_filter_name
from workers.geometry_cache import GeometryCache

# Work budget per chunk of slices (see `default_work_bytes`): on a CPU, and the least on CUDA.
CPU_WORK_BYTES = 256 << 20
# On CUDA: this fraction of the device's memory, at most CUDA_MAX_WORK_BYTES.
CUDA_WORK_FRACTION = 8
CUDA_MAX_WORK_BYTES = 8 << 30

G = TypeVar("G")


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


class CachedGeometryFBP(ABC, Generic[G]):
    """An FBP method whose per-geometry state `G` lives in a `GeometryCache` of `cache_size`.

    Threading: an instance is owned by one worker thread, which calls `reconstruct`; `prepare`
    may be called from any other thread at the same time (it only fills `geometries`, which is
    thread-safe); the owner calls `release` when a scan ends. `max_work_bytes` bounds a
    method's temporaries per chunk of slices; None takes `default_work_bytes` for the device.
    """

    def __init__(
        self,
        device: str | torch.device,
        filter_name: str,
        circle_mask: bool,
        max_work_bytes: int | None,
        cache_size: int,
    ) -> None:
        self._device = torch.device(device)
        self.filter_name = canonical_filter_name(filter_name)
        self.circle_mask = circle_mask
        if max_work_bytes is not None and max_work_bytes < 1 << 16:
            raise ValueError(f"max_work_bytes={max_work_bytes} is below 64 KiB: raise it")
        self._max_work_bytes = max_work_bytes
        self.geometries: GeometryCache[G] = GeometryCache(cache_size)

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

    @abstractmethod
    def _build(self, theta64: torch.Tensor, center: float, cols: int) -> G:
        """The geometry of (theta as float64 on the CPU, center, cols), on the device."""

    @abstractmethod
    def _reconstruct(self, sinograms: torch.Tensor, geometry: G) -> torch.Tensor:
        """(B >= 1, A >= 1, C) float32 on the device -> (B, C, C) float32 slices."""

    def _geometry(self, theta: torch.Tensor, center: float, cols: int) -> G:
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

    @torch.inference_mode()
    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        """(B, A, C) float32 line integrals -> (B, C, C) float32 attenuation per pixel."""
        check_inputs(sinograms, theta, center)
        batch, angles, cols = sinograms.shape
        sinograms = sinograms.to(self._device, torch.float32)
        if batch == 0 or angles == 0:
            return torch.zeros((batch, cols, cols), dtype=torch.float32, device=self._device)
        return self._reconstruct(sinograms, self._geometry(theta, center, cols))
