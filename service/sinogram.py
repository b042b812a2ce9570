"""One scan's sinogram while it is assembled: projections stored as they arrive (flat-field
corrected when the darks and flats are complete, else raw until they are), the reference
frames being averaged, and the complete scan handed to the reconstruct loop (`CompletedScan`).

Owned by the ingest thread through `service.scan.ScanAssembler`; nothing here is thread-safe.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.preprocess import FrameSteps, Preprocessing
from service.protocol import ScanStart
from workers.finite import bound_line_integrals_

MIN_ANGLES = 2  # fewer projections than this cannot make a slice worth publishing
FP16_MAX = 65504.0
# frames are stored this many float32 bytes at a time (a few frames of a large detector)
STORE_BLOCK_BYTES = 32 << 20
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def storage_for(start: ScanStart, storage: torch.dtype) -> tuple[torch.dtype, float]:
    """The sinogram dtype of scan `start` under the setting `storage`, and the power-of-two
    factor its raw counts are stored with (they wait in the sinogram until the darks and flats
    are complete). float16 holds line integrals, and raw integer counts scaled below its 65,504
    maximum by a power of two (exact both ways: `normalise_raw` divides it out).
    Raw float32 counts have no known range: such a scan keeps float32."""
    if storage != torch.float16:
        return torch.float32, 1.0
    if start.normalized:
        return torch.float16, 1.0
    if start.dtype == "float32":
        return torch.float32, 1.0
    largest = float(np.iinfo(np.dtype(start.dtype)).max)
    return torch.float16, 2.0 ** -max(0, math.ceil(math.log2(largest / FP16_MAX)))


@dataclass
class CompletedScan:
    """A scan ready for reconstruction. The sinogram lives on the worker's device."""

    start: ScanStart
    # (rows, angles_received, cols) line integrals, float32 or float16 (ingest.sinogram_dtype)
    sinogram: torch.Tensor
    theta: np.ndarray  # (angles_received,) radians
    center: float
    missing: int  # projections declared but never received
    clipped: int  # pixels clipped before -log, or beyond +-LINE_INTEGRAL_MAX (normalized)
    rejected: int  # messages of this scan that were rejected
    t_first_message: float  # unix seconds
    t_last_projection: float  # unix seconds
    # raw-count scans: the flat's photon counts per detector pixel (mean flat minus mean dark),
    # (rows, cols) float32 on the sinogram's device; the no-harm guard's noise model
    # (service/guard.py). None for `normalized` scans and scans without flats: the guard then
    # estimates the noise from the sinogram.
    flat_counts: torch.Tensor | None = None
    preprocessing: Preprocessing | None = None  # what [preprocess] did (service.preprocess)
    # a window of a continuous scan (service.continuous): the slice header keys
    # `window_index`, `first_projection`, `last_projection`, `continuous_scan`; None otherwise
    window: dict[str, Any] | None = None


@dataclass
class References:
    """Dark or flat frames being averaged."""

    declared: int
    total: torch.Tensor | None = None
    seen: set[int] = field(default_factory=set)

    def add(self, index: int, frames: torch.Tensor) -> None:
        # float64 a few frames at a time: exact sums without an 8x copy of a big chunk.
        if self.total is None:
            self.total = torch.zeros(frames.shape[1:], dtype=torch.float64, device=frames.device)
        for first in range(0, frames.shape[0], 8):
            self.total += frames[first : first + 8].to(torch.float64).sum(dim=0)
        self.seen.update(range(index, index + frames.shape[0]))

    @property
    def complete(self) -> bool:
        return len(self.seen) >= self.declared

    def mean(self, like: torch.Tensor) -> torch.Tensor:
        if self.total is None:
            return torch.zeros_like(like)
        return (self.total / len(self.seen)).to(torch.float32)


class ScanBuffer:
    """State of one scan being assembled."""

    def __init__(
        self,
        start: ScanStart,
        device: torch.device,
        storage: torch.dtype = torch.float32,
        steps: FrameSteps | None = None,
    ) -> None:
        self.start = start
        # flat-field correction and -log, with zingers and phase retrieval between when asked
        self.steps = steps if steps is not None else FrameSteps()
        self.device = device
        self.theta = start.theta_array()
        self.darks = References(start.n_dark)
        self.flats = References(start.n_flat)
        self.dark: torch.Tensor | None = None
        self.flat: torch.Tensor | None = None
        # Limits were checked in protocol.decode before this allocation.
        dtype, self.raw_scale = storage_for(start, storage)
        self.sinogram = torch.empty(
            (start.rows, start.n_angles, start.cols), dtype=dtype, device=device
        )
        self.received = np.zeros(start.n_angles, dtype=bool)
        # Projections that arrived before the darks/flats wait in the sinogram as raw counts;
        # they are normalised in place once the references are complete. No extra memory.
        self.raw = np.zeros(start.n_angles, dtype=bool)
        self.seqs: set[int] = {start.seq}
        self.max_seq = start.seq
        self.clipped = 0
        self.rejected = 0
        self.t_first_message = time.time()
        self.t_last_projection = self.t_first_message
        self.t_last_message = time.monotonic()

    @property
    def references_ready(self) -> bool:
        return self.start.normalized or (self.darks.complete and self.flats.complete)

    @property
    def nbytes(self) -> int:
        return self.sinogram.numel() * self.sinogram.element_size()

    def store(self, index: int, frames: np.ndarray) -> int:
        """Write frames into the sinogram (angles index..index+count): normalised when the
        references are there, else as raw counts. Returns the pixels clipped before -log.

        A block of frames (about STORE_BLOCK_BYTES as float32) at a time, so the temporaries
        (the copy out of the message, float32 values, masks) stay that small whatever the
        message's size: a 1 GiB message costs the message and the sinogram, not 5x it."""
        count = frames.shape[0]
        frame_bytes = max(1, frames[0].size * 4)
        step = max(1, STORE_BLOCK_BYTES // frame_bytes)
        clipped = 0
        for first in range(0, count, step):
            clipped += self._store_block(index + first, frames[first : first + step])
        self.received[index : index + count] = True
        self.clipped += clipped
        return clipped

    def _store_block(self, index: int, frames: np.ndarray) -> int:
        count = frames.shape[0]
        # a copy: the message's buffer is read-only, and is released when the message is
        tensor = torch.from_numpy(np.array(frames, copy=True)).to(self.device, non_blocking=True)
        clipped = 0
        if self.start.normalized or self.dark is None:
            values = tensor.to(torch.float32)
            self.raw[index : index + count] = not self.start.normalized
            if not self.start.normalized and self.raw_scale != 1.0:
                values.mul_(self.raw_scale)
        else:
            assert self.flat is not None
            values, clipped = self.steps.normalize(tensor, self.dark, self.flat)
        if self.start.normalized:
            # a wild line integral from the DAQ would fill whole slices with inf and NaN after
            # the ramp filter (flat-field corrected values are within +-14 by the transmission
            # clip; non-finite float payloads were rejected at decode): clamped and counted
            non_finite, clipped = bound_line_integrals_(values)
            clipped += non_finite
        self.sinogram[:, index : index + count, :] = values.transpose(0, 1)
        return clipped

    def normalise_raw(self, block: int | None = None) -> int:
        """Flat-field correct, in place, the projections stored raw, `block` at a time
        (default: about STORE_BLOCK_BYTES of float32); returns pixels clipped."""
        assert self.dark is not None and self.flat is not None
        if block is None:
            block = max(1, STORE_BLOCK_BYTES // (4 * self.start.rows * self.start.cols))
        clipped_before = self.clipped
        raw = np.flatnonzero(self.raw)
        i = 0
        while i < len(raw):  # runs of consecutive raw angles, at most `block` at a time
            j = i
            while j + 1 < len(raw) and raw[j + 1] == raw[j] + 1 and raw[j + 1] - raw[i] < block:
                j += 1
            first, stop = int(raw[i]), int(raw[j]) + 1
            i = j + 1
            counts = self.sinogram[:, first:stop, :].transpose(0, 1)
            if self.raw_scale != 1.0:
                counts = counts.to(torch.float32).div_(self.raw_scale)  # exact: a power of 2
            values, clipped = self.steps.normalize(counts, self.dark, self.flat)
            self.sinogram[:, first:stop, :] = values.transpose(0, 1)
            self.raw[first:stop] = False
            self.clipped += clipped
        return self.clipped - clipped_before

    def flat_counts(self) -> torch.Tensor | None:
        """The flat's counts per detector pixel, flat minus dark (`CompletedScan.flat_counts`),
        once the references are averaged; None for normalized scans or without flats."""
        if self.start.normalized or self.flat is None or self.dark is None:
            return None
        if not self.flats.seen:
            return None
        return self.flat - self.dark

    def finalise_references(self) -> None:
        like = torch.zeros((self.start.rows, self.start.cols), device=self.device)
        self.dark = self.darks.mean(like)
        self.flat = self.flats.mean(like)
        self.darks.total = self.flats.total = None
