"""Scan assembly: validated messages in, flat-field corrected sinograms (rows, angles, cols) out.

Projections may arrive in any chunk size and order, and before the darks/flats are complete (they
wait, raw, until the references are). Duplicates and gaps are detected from `seq` and `index`.
A scan is complete at `scan_end`; if projections are missing then, it is reconstructed with the
angles present (its `ScanCompleted` event says how many were missing), unless fewer than
`MIN_ANGLES` arrived, in which case it fails.

The assembler does nothing beyond its own state: each call returns what came of it, as
outcomes (`Started`, `Completed`, `Failed`, `Clipped`), and its owner (`service.ingest`)
dispatches them: the queue to the reconstruct loop, events to the publisher, the geometry
preparer, metrics.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from service.errors import ProtocolError
from service.events import ScanFailed, ScanStarted
from service.protocol import FrameChunk, Limits, Message, ScanEnd, ScanStart
from workers.finite import bound_line_integrals_
from workers.preprocess import normalize

log = logging.getLogger(__name__)

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


@dataclass
class _References:
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


class _Scan:
    """State of one scan being assembled."""

    def __init__(
        self, start: ScanStart, device: torch.device, storage: torch.dtype = torch.float32
    ) -> None:
        self.start = start
        self.device = device
        self.theta = start.theta_array()
        self.darks = _References(start.n_dark)
        self.flats = _References(start.n_flat)
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
            values, clipped = normalize(tensor, self.dark, self.flat)
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
            values, clipped = normalize(counts, self.dark, self.flat)
            self.sinogram[:, first:stop, :] = values.transpose(0, 1)
            self.raw[first:stop] = False
            self.clipped += clipped
        return self.clipped - clipped_before

    def finalise_references(self) -> None:
        like = torch.zeros((self.start.rows, self.start.cols), device=self.device)
        self.dark = self.darks.mean(like)
        self.flat = self.flats.mean(like)
        self.darks.total = self.flats.total = None


# ---- outcomes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """A `scan_start` was accepted: the scan is announced and its geometry can be prepared."""

    start: ScanStart

    @property
    def event(self) -> ScanStarted:
        start = self.start
        return ScanStarted(start.scan_id, start.rows, start.cols, start.n_angles, start.meta)


@dataclass(frozen=True)
class Completed:
    """A scan is complete: it goes to the reconstruct loop (and may wait for it there)."""

    scan: CompletedScan


@dataclass(frozen=True)
class Failed:
    """A scan ends without slices, for `reason`; its geometry is no longer wanted."""

    start: ScanStart
    reason: str
    evicted: bool = False  # made room for a new scan (ingest.idle_evict_s)

    @property
    def event(self) -> ScanFailed:
        return ScanFailed(self.start.scan_id, self.reason)


@dataclass(frozen=True)
class Clipped:
    """Pixels whose flat-field ratio was not positive, clipped before -log."""

    pixels: int


Outcome = Started | Completed | Failed | Clipped


class ScanAssembler:
    """Turns validated messages into complete scans. Owned by the ingest thread.

    `handle`, `expire` and `drop_all` return outcomes, in the order they happened, for the
    owner to dispatch; none of them blocks. `limits` gives `max_live_scans` and
    `max_live_bytes`; `storage` the sinogram dtype (`ingest.sinogram_dtype`). A `scan_start`
    that finds no room evicts live scans silent for `idle_evict_s` or more, idle longest first,
    when that makes room (`ingest.idle_evict_s`).
    """

    def __init__(
        self,
        device: torch.device,
        limits: Limits | None = None,
        storage: torch.dtype = torch.float32,
        idle_evict_s: float = 30.0,
    ) -> None:
        self.device = device
        self.storage = storage
        self.idle_evict_s = idle_evict_s
        self.limits = limits if limits is not None else Limits()
        self.scans: dict[str, _Scan] = {}

    @property
    def live_scans(self) -> int:
        return len(self.scans)

    def handle(self, message: Message) -> list[Outcome]:
        """Apply one message. Raises ProtocolError when the message is rejected; the scan's
        state is then unchanged except for its rejection count."""
        if isinstance(message, ScanStart):
            return self._start(message)
        scan = self.scans.get(message.scan_id)
        if scan is None:
            raise refused(
                message,
                "unknown_scan",
                f"no live scan {message.scan_id!r} (send "
                "scan_start first, or the scan already ended)",
            )
        try:
            self._check_seq(scan, message)
            if isinstance(message, ScanEnd):
                outcomes = self._end(scan, message)
            else:
                outcomes = self._frames(scan, message)
        except ProtocolError:
            scan.rejected += 1
            raise
        scan.seqs.add(message.seq)
        scan.max_seq = max(scan.max_seq, message.seq)
        scan.t_last_message = time.monotonic()
        return outcomes

    def expire(self, timeout_s: float) -> list[Failed]:
        """Fail and release scans idle for longer than `timeout_s`.

        A scan without `scan_end` means the DAQ stopped mid-scan: its slices would be built from
        an unknown subset of the data, so none are published."""
        now, failed = time.monotonic(), []
        for scan in [s for s in self.scans.values() if now - s.t_last_message > timeout_s]:
            log.warning(
                "scan_id=%s seq=%d timed out after %.1f s without a message",
                *(scan.start.scan_id, scan.max_seq, timeout_s),
            )
            received = f"{int(scan.received.sum())} of {scan.start.n_angles} projections"
            why = f"no message for {timeout_s:g} s (ingest.scan_timeout_s); {received} had arrived"
            failed.append(self._fail(scan, why))
        return failed

    def extend_deadlines(self, seconds: float) -> None:
        """Credit every live scan with `seconds` of silence that was not the DAQ's doing."""
        for scan in self.scans.values():
            scan.t_last_message += seconds

    def drop_all(self, reason: str) -> list[Failed]:
        return [self._fail(scan, reason) for scan in list(self.scans.values())]

    # ---- message kinds ---------------------------------------------------------------------

    def _start(self, start: ScanStart) -> list[Outcome]:
        self._check_new(start)
        evicted = self._evict_for(start)
        self._check_room(start)
        try:
            scan = _Scan(start, self.device, self.storage)
        except torch.cuda.OutOfMemoryError:
            raise refused(
                start,
                "too_large",
                f"the device has no room for {self._bytes(start)} bytes of sinogram",
            ) from None
        if scan.references_ready:
            scan.finalise_references()
        self.scans[start.scan_id] = scan
        log.info(
            "scan_id=%s seq=%d started: %d rows x %d cols x %d angles %s",
            start.scan_id,
            start.seq,
            start.rows,
            start.cols,
            start.n_angles,
            start.dtype,
        )
        return [*evicted, Started(start)]

    def _bytes(self, start: ScanStart) -> int:
        """The sinogram bytes scan `start` holds while it is assembled."""
        itemsize = storage_for(start, self.storage)[0].itemsize
        return start.rows * start.n_angles * start.cols * itemsize

    def _fits(self, start: ScanStart, leaving: list[_Scan]) -> bool:
        """Whether scan `start` fits the live limits once the scans `leaving` are gone."""
        live = len(self.scans) - len(leaving)
        held = sum(s.nbytes for s in self.scans.values()) - sum(s.nbytes for s in leaving)
        return (
            live < self.limits.max_live_scans
            and held + self._bytes(start) <= self.limits.max_live_bytes
        )

    def _evict_for(self, start: ScanStart) -> list[Outcome]:
        """Fail the scans idle for `idle_evict_s` or more, idle longest first, that `start`
        needs gone to fit; none when evicting all of them would still not make room."""
        if self._fits(start, []):
            return []
        now = time.monotonic()
        idle = sorted(
            (s for s in self.scans.values() if now - s.t_last_message >= self.idle_evict_s),
            key=lambda s: s.t_last_message,
        )
        for n in range(1, len(idle) + 1):
            if self._fits(start, idle[:n]):
                break
        else:
            return []
        evicted: list[Outcome] = []
        for scan in idle[:n]:
            silent = now - scan.t_last_message
            why = (
                f"evicted: silent for {silent:.1f} s (ingest.idle_evict_s={self.idle_evict_s:g})"
                f" when scan {start.scan_id!r} needed its room"
            )
            evicted.append(self._fail(scan, why, evicted=True))
        return evicted

    def _check_new(self, start: ScanStart) -> None:
        """Refuse a start that is not new or cannot be flat-field corrected."""
        if start.scan_id in self.scans:
            raise refused(
                start,
                "scan_exists",
                f"scan {start.scan_id!r} is already live; end it or use a new scan_id",
            )
        if not start.normalized and start.n_flat == 0:
            raise refused(
                start,
                "no_flats",
                "a raw scan needs flat fields (n_flat >= 1), or send "
                "line integrals with normalized=true",
            )

    def _check_room(self, start: ScanStart) -> None:
        """Refuse a start that does not fit beside the live scans."""
        limit = self.limits.max_live_scans
        if len(self.scans) >= limit:
            raise refused(
                start,
                "too_many_scans",
                f"{len(self.scans)} scans are live (ingest.max_live_scans={limit})",
            )
        need = self._bytes(start)
        held = sum(s.nbytes for s in self.scans.values())
        if held + need > self.limits.max_live_bytes:
            raise refused(
                start,
                "too_many_scans",
                f"this scan needs {need} bytes and live scans "
                f"hold {held}: over ingest.max_live_bytes={self.limits.max_live_bytes}",
            )

    def _check_seq(self, scan: _Scan, message: FrameChunk | ScanEnd) -> None:
        if message.seq in scan.seqs:
            raise refused(message, "duplicate", f"seq {message.seq} was already received")
        if message.seq > scan.max_seq + 1:
            log.warning(
                "scan_id=%s seq=%d gap: messages %d..%d not (yet) received",
                message.scan_id,
                message.seq,
                scan.max_seq + 1,
                message.seq - 1,
            )

    def _frames(self, scan: _Scan, chunk: FrameChunk) -> list[Outcome]:
        start = scan.start
        if start.normalized and chunk.kind != "projections":
            raise refused(
                chunk,
                "bad_value",
                f"{chunk.kind} frames sent for a normalized scan",
            )
        declared = {"dark": start.n_dark, "flat": start.n_flat, "projections": start.n_angles}[
            chunk.kind
        ]
        if chunk.index + chunk.count > declared:
            raise refused(
                chunk,
                "index_out_of_range",
                f"{chunk.kind} index {chunk.index}+count "
                f"{chunk.count} exceeds the {declared} declared at scan_start",
            )
        data = chunk.to_array(start)
        span = range(chunk.index, chunk.index + chunk.count)
        if chunk.kind == "projections":
            if scan.received[chunk.index : chunk.index + chunk.count].any():
                raise refused(
                    chunk,
                    "duplicate",
                    f"projections {span.start}..{span.stop - 1} overlap ones already received",
                )
            clipped = scan.store(chunk.index, data)
            scan.t_last_projection = time.time()
            return _clipped(clipped)
        refs = scan.darks if chunk.kind == "dark" else scan.flats
        if refs.seen.intersection(span):
            raise refused(
                chunk,
                "duplicate",
                f"{chunk.kind} frames {span.start}..{span.stop - 1} overlap ones already received",
            )
        if scan.dark is not None:
            raise refused(
                chunk,
                "bad_value",
                f"{chunk.kind} frames after the references were complete",
            )
        refs.add(chunk.index, torch.from_numpy(np.array(data, copy=True)).to(scan.device))
        if scan.references_ready:
            return self._apply_references(scan)
        return []

    def _apply_references(self, scan: _Scan) -> list[Outcome]:
        scan.finalise_references()
        return _clipped(scan.normalise_raw())

    def _end(self, scan: _Scan, end: ScanEnd) -> list[Outcome]:
        received = int(scan.received.sum())
        if end.count != received:
            log.warning(
                "scan_id=%s seq=%d scan_end says %d projections were sent, %d arrived",
                end.scan_id,
                end.seq,
                end.count,
                received,
            )
        return self._finish(scan)

    def _finish(self, scan: _Scan) -> list[Outcome]:
        received = int(scan.received.sum())
        outcomes: list[Outcome] = []
        if scan.dark is None:
            if scan.flats.seen:
                log.warning(
                    "scan_id=%s references incomplete (%d/%d darks, %d/%d flats): "
                    "averaging those received",
                    scan.start.scan_id,
                    len(scan.darks.seen),
                    scan.darks.declared,
                    len(scan.flats.seen),
                    scan.flats.declared,
                )
                outcomes += self._apply_references(scan)
            else:
                return [self._fail(scan, "no flat field frames arrived")]
        if received < MIN_ANGLES:
            return [*outcomes, self._fail(scan, f"only {received} projections arrived")]
        del self.scans[scan.start.scan_id]
        keep = np.flatnonzero(scan.received)
        sinogram = scan.sinogram
        if len(keep) < scan.start.n_angles:
            log.warning(
                "scan_id=%s reconstructing with %d of %d projections",
                scan.start.scan_id,
                len(keep),
                scan.start.n_angles,
            )
            sinogram = sinogram[:, torch.as_tensor(keep, device=sinogram.device), :].contiguous()
        completed = Completed(
            CompletedScan(
                start=scan.start,
                sinogram=sinogram,
                theta=scan.theta[keep],
                center=scan.start.rotation_center(),
                missing=scan.start.n_angles - len(keep),
                clipped=scan.clipped,
                rejected=scan.rejected,
                t_first_message=scan.t_first_message,
                t_last_projection=scan.t_last_projection,
            )
        )
        return [*outcomes, completed]

    def _fail(self, scan: _Scan, reason: str, evicted: bool = False) -> Failed:
        self.scans.pop(scan.start.scan_id, None)
        log.error("scan_id=%s failed: %s", scan.start.scan_id, reason)
        return Failed(scan.start, reason, evicted)


def refused(message: Message, reason: str, detail: str) -> ProtocolError:
    """The rejection of `message` for `reason` (a `REJECT_REASONS` label)."""
    return ProtocolError(reason, detail, message.scan_id, message.seq)


def _clipped(pixels: int) -> list[Outcome]:
    return [Clipped(pixels)] if pixels else []
