"""The typed boundaries between the service and its compute workers.

A CPU and a CUDA implementation satisfy the same protocol, so `service.app` never branches on
the device. Conformance is asserted where each implementation is tested:
tests/unit/workers/test_fbp.py, test_gridding.py, test_geometry_cache.py (Reconstructor,
PreparableReconstructor) and test_denoise.py (Denoiser).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Reconstructor(Protocol):
    """Filtered back-projection of a batch of sinograms, on one device, tensors in and out.

    Threading: an instance is owned by one worker thread; it may keep reusable buffers.
    """

    @property
    def device(self) -> torch.device: ...

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        """(batch, angles, cols) float32 line integrals on `device` -> (batch, cols, cols) float32
        slices on `device`, in line integral per pixel. `theta` is (angles,) radians, on the
        CPU or on `device`: on the CPU preferred, since reconstructors read the angles on the
        host (to key and build their geometry), and a `theta` on a GPU costs a copy back and
        a wait for the device in every call. `center` follows TomoPy's convention (cols/2 =
        the detector's middle)."""
        ...


@runtime_checkable
class PreparableReconstructor(Reconstructor, Protocol):
    """A `Reconstructor` that can build its per-geometry state (filters, weights, interpolation
    tables, spreading matrices) before the data arrive, e.g. when a scan starts.

    Threading: `prepare` may be called from any thread, also while the owning thread runs
    `reconstruct`. Both go through one thread-safe cache: a geometry is built once (a
    `reconstruct` that needs one being prepared waits for that build rather than starting
    another) and used only when complete. The geometry the owning thread last reconstructed
    with stays cached, whatever is prepared meanwhile, until that thread calls `release` (at
    the end of each scan, and after a warm-up). Optional: the service prepares only
    reconstructors that satisfy this protocol, and a failed `prepare` leaves `reconstruct` to
    build as usual.
    """

    def prepare(self, theta: torch.Tensor, center: float, cols: int) -> bool:
        """Build what `reconstruct` will need for (angles, cols) sinograms at `theta` (angles,)
        radians and `center`, handed to it exactly as `reconstruct` will be (the cache keys on
        the values). True if this call built it; False if it was there already."""
        ...

    def release(self) -> None:
        """The owning thread is done with the geometry of its last `reconstruct` (its scan
        ended): from now on it may be evicted like any other. Owning thread only."""
        ...


@runtime_checkable
class Denoiser(Protocol):
    """A slice denoiser taking `depth` adjacent slices as channels, predicting the centre one.

    Threading: an instance is owned by one worker thread.
    """

    @property
    def name(self) -> str: ...

    @property
    def depth(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def scale_for(self, slices: torch.Tensor) -> float:
        """The scan's intensity factor from some of its slices (any shape (..., H, W), on
        `device`): scale-equivariant, scale_for(k x) = k scale_for(x) for k > 0. The loop takes
        one per scan and passes it to every `denoise` call, so a scan's slices never flicker."""
        ...

    def denoise(self, stack: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """(batch, depth, H, W) float32 slices on `device` -> (batch, H, W) float32 on `device`,
        in the same physical units as the input, with the scan's `scale` (`scale_for`; None:
        measured on this stack). The result is a fresh tensor the caller owns (the worker hands
        it to zero-copy sends and to the copy stream): never a reused buffer."""
        ...
