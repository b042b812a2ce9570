"""Continuous rotation (protocol v1.1): a bounded ring buffer per scan, cut into windows.

A scan_start with `continuous: true` opens a scan without a fixed number of projections. Its
projections (numbered from 0 without end, in increasing order; gaps are allowed and leave
holes) go into a ring of `window` slots, flat-field corrected as for any scan
(`service.sinogram.ScanBuffer` with `window` angles). Window k holds projections
[k * every, k * every + window): as soon as the projection that ends it has arrived (or a later
one), its projections are copied out of the ring, sorted by index, and become a
`CompletedScan` of their own (scan_id `<scan_id>.w<k>`, the window keys in its slice headers)
for the reconstruct loop. scan_end ends the scan: windows not complete then are not cut.

Angles: a chunk's `theta` (one per projection, radians, any value: they wrap) when it has one,
else theta[0] + index * step of the scan_start's declared theta (step: theta[1] - theta[0]), else
index * pi / n_angles (the v1 default spacing continued past pi).

Memory: the ring (window x rows x cols in the storage dtype) is allocated once at scan_start,
and a cut window is one copy of it; the ingest keeps at most `MAX_PENDING_WINDOWS` cut windows
waiting for the loop (drop-oldest, counted). Owned by the ingest thread; nothing here is
thread-safe.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from service.events import ScanCompleted, ScanLatency
from service.preprocess import FrameSteps
from service.protocol import FrameChunk, ScanStart, half_turn
from service.sinogram import MIN_ANGLES, CompletedScan, ScanBuffer

log = logging.getLogger(__name__)

# cut windows the ingest holds while the reconstruct loop's queue is full; a newer window
# pushes the oldest out (counted in tomocast_continuous_windows_dropped_total)
MAX_PENDING_WINDOWS = 2


@dataclass(frozen=True)
class WindowReady:
    """A window of a continuous scan is cut: it goes to the reconstruct loop (or waits)."""

    scan: CompletedScan


@dataclass(frozen=True)
class ContinuousEnded:
    """A continuous scan's scan_end: its `ScanCompleted` (with `windows`) goes out once the
    windows cut before it are handed to the loop."""

    event: ScanCompleted


class ContinuousScan:
    """One continuous scan: its ring buffer and the windows cut from it (the ingest's)."""

    def __init__(
        self,
        start: ScanStart,
        device: torch.device,
        storage: torch.dtype = torch.float32,
        steps: FrameSteps | None = None,
    ) -> None:
        self.start = start
        # decode fills the defaults in; a ScanStart built in code may leave them None
        self.window = start.window or half_turn(start.n_angles, start.theta)
        self.every = start.every or self.window
        ring = replace(start, n_angles=self.window, theta=None, continuous=False)
        self.buffer = ScanBuffer(ring, device, storage, steps)  # darks, flats, the ring
        self.slot_theta = np.zeros(self.window, dtype=np.float64)
        self.slot_index = np.full(self.window, -1, dtype=np.int64)  # projection held, -1: none
        self.next_index = 0  # one past the highest projection index received
        self.next_window = 0  # the next window to cut
        self.windows = 0  # windows cut and handed on
        self.skipped = 0  # windows with too few projections, or still raw (no references)
        self.max_seq = start.seq
        if start.theta is not None and len(start.theta) >= 2:
            self.theta0, self.step = start.theta[0], start.theta[1] - start.theta[0]
        else:
            self.theta0 = start.theta[0] if start.theta else 0.0
            self.step = math.pi / start.n_angles

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def _window_end(self, k: int) -> int:
        return k * self.every + self.window

    def store(self, chunk: FrameChunk, frames: np.ndarray) -> tuple[int, list[CompletedScan]]:
        """Store projections `chunk` (checked by the caller: index >= next_index); returns the
        pixels clipped and the windows cut, in order. Blocks never cross a window's end, so
        each window is cut while the ring holds all of it."""
        theta = (
            np.asarray(chunk.theta, dtype=np.float64)
            if chunk.theta is not None
            else self.theta0 + self.step * np.arange(chunk.index, chunk.index + chunk.count)
        )
        clipped, cut = 0, list[CompletedScan]()
        cut += self._cut_until(chunk.index)  # windows the gap before this chunk completed
        done = 0
        while done < chunk.count:
            first = chunk.index + done
            stop = min(chunk.index + chunk.count, first + self.window)
            stop = min(stop, max(first + 1, self._window_end(self.next_window)))
            slots = np.arange(first, stop) % self.window
            offset, slot = first - chunk.index, int(slots[0])
            run = min(stop - first, self.window - slot)  # up to the ring's end, then from 0
            clipped += self.buffer.store(slot, frames[offset : offset + run])
            if run < stop - first:
                clipped += self.buffer.store(0, frames[offset + run : stop - chunk.index])
            self.slot_index[slots] = np.arange(first, stop)
            self.slot_theta[slots] = theta[first - chunk.index : stop - chunk.index]
            self.next_index = stop
            done = stop - chunk.index
            cut += self._cut_until(stop)
        self.buffer.t_last_projection = time.time()
        self.buffer.t_last_message = time.monotonic()
        return clipped, cut

    def _cut_until(self, received: int) -> list[CompletedScan]:
        """Cut every window that ends at or before projection index `received`."""
        cut = []
        while self._window_end(self.next_window) <= received:
            scan = self._cut(self.next_window)
            self.next_window += 1
            if scan is not None:
                cut.append(scan)
        return cut

    def _cut(self, k: int) -> CompletedScan | None:
        first, stop = k * self.every, self._window_end(k)
        held = np.flatnonzero((self.slot_index >= first) & (self.slot_index < stop))
        held = held[np.argsort(self.slot_index[held])]
        scan_id = self.start.scan_id
        if len(held) < MIN_ANGLES or self.buffer.raw[held].any():
            why = "still raw (darks/flats incomplete)" if len(held) >= MIN_ANGLES else "missing"
            log.warning(
                "scan_id=%s window %d (projections %d..%d) skipped: %d projections, %s",
                *(scan_id, k, first, stop - 1, len(held), why),
            )
            self.skipped += 1
            return None
        theta = self.slot_theta[held].copy()
        index = torch.as_tensor(held, device=self.buffer.sinogram.device)
        sinogram = self.buffer.sinogram.index_select(1, index)  # a copy: the ring moves on
        start = replace(
            self.start,
            scan_id=f"{scan_id}.w{k}",
            n_angles=len(held),
            theta=tuple(float(t) for t in theta),
            continuous=False,
            window=None,
            every=None,
        )
        self.windows += 1
        return CompletedScan(
            start=start,
            sinogram=sinogram,
            theta=theta,
            center=start.rotation_center(),
            missing=self.window - len(held),
            clipped=self.buffer.clipped,
            rejected=self.buffer.rejected,
            t_first_message=self.buffer.t_first_message,
            t_last_projection=time.time(),
            flat_counts=self.buffer.flat_counts(),
            preprocessing=self.buffer.steps.done(self.buffer.start),
            window={
                "window_index": k,
                "first_projection": first,
                "last_projection": stop - 1,
                "continuous_scan": scan_id,
            },
        )

    def ended(self) -> ScanCompleted:
        """The scan's `scan_completed`: `windows` cut; its slices are the windows'."""
        return ScanCompleted(
            self.start.scan_id,
            slices=0,
            missing_projections=0,
            rejected_messages=self.buffer.rejected,
            clipped_pixels=self.buffer.clipped,
            model="",
            latency=ScanLatency(0.0, 0.0, None),
            windows=self.windows,
        )
