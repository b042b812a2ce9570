"""Where the reconstruct loop's slices go: `SliceSink`, the service's one boundary on the way out.

For each scan the loop calls, on its own thread, in this order:

    begin(ScanDescription)      what the scan is: id, size, angles, centre, DAQ meta, model
    write(SliceBatch)  ...      each batch of slices as it reaches the host, rows in any order
    end(ScanCompleted | ScanFailed)
                                the scan's outcome; after a failure, write may not have run
                                for every row (or at all)

The loop hands every scan to every sink in `Service`'s list and never knows which they are:
`PublishChannel` (viewers over ZeroMQ) and `Archive` (HDF5 files) today. A new output, an EPICS
PV Access server for instance, is a class with these three methods added to that list in
`Service._sinks`; the loop does not change. A sink must not modify a batch's array, and may keep
it (the loop never writes to it again). A sink that can be slow (a disk) queues and works on a
thread of its own: `write` is on the loop's path, and a sink that blocks there holds every
other sink and, through the scan queue, the DAQ (backpressure, nothing lost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from service.events import ScanEnded

# "slice": the scan's output slices (denoised; plain FBP when denoising is off).
# "recon": the plain FBP slices alongside denoised ones (publish.recon). The publisher's topics.
Topic = Literal["slice", "recon"]


@dataclass(frozen=True)
class ScanDescription:
    """A scan as the loop starts on it: its slices are `rows` of (`cols`, `cols`) float32."""

    scan_id: str
    rows: int
    cols: int
    theta: np.ndarray  # (angles,) radians: the angles reconstructed
    center: float  # rotation axis, TomoPy's convention
    model: str  # the denoiser's name, "none" without one
    t_last_projection: float  # unix seconds
    meta: dict[str, Any] = field(default_factory=dict)  # the DAQ's, from scan_start
    # where `center` came from: declared (scan_start), config, estimated or default (cols/2)
    center_source: str = "declared"
    # what `[preprocess]` applied before FBP: setting -> what ran (service.preprocess)
    preprocessing: dict[str, str] = field(default_factory=dict)
    # a window of a continuous scan: the slice header keys it adds (service.continuous)
    window: dict[str, Any] | None = None


@dataclass(frozen=True)
class SliceTiming:
    """Per-slice seconds of a batch: queued before the loop took the scan (`wait`, the whole
    scan's), reconstruction and, for denoised slices, denoising and the no-harm guard's check."""

    wait: float
    fbp: float
    denoise: float | None = None
    guard: float | None = None

    def as_dict(self) -> dict[str, float]:
        """As published in the slice header's `timing`."""
        timing = {"wait": self.wait, "fbp": self.fbp}
        if self.denoise is not None:
            timing["denoise"] = self.denoise
        if self.guard is not None:
            timing["guard"] = self.guard
        return timing


@dataclass(frozen=True)
class SliceBatch:
    """Slices `first` .. `stop - 1` of scan `scan_id`, as (n, cols, cols) float32 on the host."""

    scan_id: str
    topic: Topic
    first: int
    slices: np.ndarray
    timing: SliceTiming
    scale: float | None = None  # denoised slices: the scan's intensity factor (the header's)
    # topic "slice" with a denoiser: per slice, whether it is the network's output (True) or
    # the plain FBP the no-harm guard published in its place (False); None: every slice is
    # plain FBP (no denoiser, topic "recon")
    denoised: np.ndarray | None = None  # (n,) bool
    # the guard's score per slice, NaN where it has none; None: the guard did not run
    consistency: np.ndarray | None = None  # (n,) float32

    @property
    def stop(self) -> int:
        return self.first + len(self.slices)


@runtime_checkable
class SliceSink(Protocol):
    """An output of the reconstruct loop. Called from the loop's thread only."""

    def begin(self, scan: ScanDescription) -> None: ...

    def write(self, batch: SliceBatch) -> None: ...

    def end(self, outcome: ScanEnded) -> None: ...
