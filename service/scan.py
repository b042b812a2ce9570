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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from service.continuous import ContinuousEnded, ContinuousScan, WindowReady
from service.errors import ProtocolError
from service.events import ScanFailed, ScanStarted
from service.preprocess import FrameSteps
from service.protocol import FrameChunk, Limits, Message, ScanEnd, ScanStart, half_turn
from service.sinogram import (
    MIN_ANGLES,
    CompletedScan,
    ScanBuffer,
    storage_for,
)

log = logging.getLogger(__name__)

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


Outcome = Started | Completed | Failed | Clipped | WindowReady | ContinuousEnded


class ScanAssembler:
    """Turns validated messages into complete scans. Owned by the ingest thread.

    `handle`, `expire` and `drop_all` return outcomes, in the order they happened, for the
    owner to dispatch; none of them blocks. `limits` gives `max_live_scans` and
    `max_live_bytes`; `storage` the sinogram dtype (`ingest.sinogram_dtype`). A `scan_start`
    that finds no room evicts live scans silent for `idle_evict_s` or more, idle longest first,
    when that makes room (`ingest.idle_evict_s`).

    `per_client` (`ingest.max_live_scans_per_client`, 0: none) caps the live scans of one
    authenticated client (its CURVE key, passed to `handle` as `client`): a start beyond it
    first evicts that client's own silent scans, else is refused, so one key cannot hold every
    place. Messages for a scan from another authenticated client than the one that started it
    are refused as `unknown_scan`. Without a `client` (no CURVE) neither applies.
    """

    def __init__(
        self,
        device: torch.device,
        limits: Limits | None = None,
        storage: torch.dtype = torch.float32,
        idle_evict_s: float = 30.0,
        frame_steps: Callable[[ScanStart], FrameSteps] | None = None,
        per_client: int = 0,
    ) -> None:
        self.per_client = per_client
        self.clients: dict[str, str] = {}  # scan_id -> the client key that started it
        self.device = device
        self.frame_steps = frame_steps  # a scan's steps before -log ([preprocess])
        self.storage = storage
        self.idle_evict_s = idle_evict_s
        self.limits = limits if limits is not None else Limits()
        self.scans: dict[str, ScanBuffer] = {}
        self.continuous: dict[str, ContinuousScan] = {}  # v1.1 continuous scans (their rings)

    @property
    def live_scans(self) -> int:
        return len(self.scans) + len(self.continuous)

    def handle(self, message: Message, client: str | None = None) -> list[Outcome]:
        """Apply one message; `client`: the sender's authenticated identity, if any. Raises
        ProtocolError when the message is rejected; the scan's state is then unchanged except
        for its rejection count."""
        if isinstance(message, ScanStart):
            return self._start(message, client)
        if message.scan_id in self.continuous:
            return self._continuous(self.continuous[message.scan_id], message, client)
        scan = self.scans.get(message.scan_id)
        owner = self.clients.get(message.scan_id)
        if scan is not None and client is not None and owner is not None and owner != client:
            raise refused(
                message,
                "unknown_scan",
                f"scan {message.scan_id!r} was started by another client key; only the "
                "client that started a scan may send to it",
            )
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
        rings = self.continuous.values()
        for ring in [r for r in rings if now - r.buffer.t_last_message > timeout_s]:
            why = f"no message for {timeout_s:g} s (ingest.scan_timeout_s); {ring.windows} windows"
            failed.append(self._fail_continuous(ring, why))
        return failed

    def extend_deadlines(self, seconds: float) -> None:
        """Credit every live scan with `seconds` of silence that was not the DAQ's doing."""
        for scan in self.scans.values():
            scan.t_last_message += seconds
        for ring in self.continuous.values():
            ring.buffer.t_last_message += seconds

    def drop_all(self, reason: str) -> list[Failed]:
        rings = [self._fail_continuous(r, reason) for r in list(self.continuous.values())]
        return [self._fail(scan, reason) for scan in list(self.scans.values())] + rings

    # ---- message kinds ---------------------------------------------------------------------

    def _start(self, start: ScanStart, client: str | None = None) -> list[Outcome]:
        self._check_new(start)
        if start.continuous:
            return self._start_continuous(start, client)
        evicted = self._evict_own(start, client)
        evicted += self._evict_for(start)
        self._check_room(start)
        try:
            steps = self.frame_steps(start) if self.frame_steps is not None else None
            scan = ScanBuffer(start, self.device, self.storage, steps)
        except torch.cuda.OutOfMemoryError:
            raise refused(
                start,
                "too_large",
                f"the device has no room for {self._bytes(start)} bytes of sinogram",
            ) from None
        if scan.references_ready:
            scan.finalise_references()
        self.scans[start.scan_id] = scan
        if client is not None:
            self.clients[start.scan_id] = client
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
        """The sinogram bytes scan `start` holds while it is assembled (a continuous scan:
        its ring of `window` projections)."""
        itemsize = storage_for(start, self.storage)[0].itemsize
        angles = start.n_angles
        if start.continuous:
            angles = start.window or half_turn(start.n_angles, start.theta)
        return start.rows * angles * start.cols * itemsize

    @property
    def held_bytes(self) -> int:
        """Sinogram and ring bytes of the live scans."""
        rings = sum(r.nbytes for r in self.continuous.values())
        return sum(s.nbytes for s in self.scans.values()) + rings

    # ---- continuous scans (v1.1, service.continuous) ----------------------------------------

    def _start_continuous(self, start: ScanStart, client: str | None) -> list[Outcome]:
        if start.scan_id in self.continuous:
            raise refused(start, "scan_exists", f"scan {start.scan_id!r} is already live")
        self._check_room(start)
        try:
            steps = self.frame_steps(start) if self.frame_steps is not None else None
            ring = ContinuousScan(start, self.device, self.storage, steps)
        except torch.cuda.OutOfMemoryError:
            raise refused(
                start, "too_large", f"the device has no room for a {self._bytes(start)} byte ring"
            ) from None
        if ring.buffer.references_ready:
            ring.buffer.finalise_references()
        self.continuous[start.scan_id] = ring
        if client is not None:
            self.clients[start.scan_id] = client
        log.info(
            "scan_id=%s seq=%d started continuous: %d rows x %d cols, window %d every %d",
            *(start.scan_id, start.seq, start.rows, start.cols, start.window, start.every),
        )
        return [Started(start)]

    def _continuous(
        self, ring: ContinuousScan, message: FrameChunk | ScanEnd, client: str | None
    ) -> list[Outcome]:
        owner = self.clients.get(message.scan_id)
        if client is not None and owner is not None and owner != client:
            raise refused(message, "unknown_scan", "another client key started this scan")
        if message.seq <= ring.max_seq:
            # a continuous scan keeps no set of seqs (it would grow without end): in order only
            ring.buffer.rejected += 1
            raise refused(
                message,
                "duplicate",
                f"seq {message.seq} <= {ring.max_seq} already received (a continuous scan's "
                "messages come in seq order)",
            )
        try:
            outcomes = self._continuous_message(ring, message)
        except ProtocolError:
            ring.buffer.rejected += 1
            raise
        ring.max_seq = message.seq
        ring.buffer.t_last_message = time.monotonic()
        return outcomes

    def _continuous_message(
        self, ring: ContinuousScan, message: FrameChunk | ScanEnd
    ) -> list[Outcome]:
        if isinstance(message, ScanEnd):
            self.continuous.pop(message.scan_id, None)
            self.clients.pop(message.scan_id, None)
            log.info(
                "scan_id=%s continuous scan ended: %d windows (%d skipped)",
                *(message.scan_id, ring.windows, ring.skipped),
            )
            return [ContinuousEnded(ring.ended())]
        if message.kind != "projections":
            return self._frames(ring.buffer, message)
        if message.index < ring.next_index:
            raise refused(
                message,
                "index_out_of_range",
                f"projection index {message.index} < {ring.next_index}, the next expected: a "
                "continuous scan's projections come in increasing index order",
            )
        data = message.to_array(ring.buffer.start)
        clipped, windows = ring.store(message, data)
        return [*_clipped(clipped), *(WindowReady(w) for w in windows)]

    def _fail_continuous(self, ring: ContinuousScan, reason: str) -> Failed:
        self.continuous.pop(ring.start.scan_id, None)
        self.clients.pop(ring.start.scan_id, None)
        log.error("scan_id=%s failed: %s", ring.start.scan_id, reason)
        return Failed(ring.start, reason)

    def _fits(self, start: ScanStart, leaving: list[ScanBuffer]) -> bool:
        """Whether scan `start` fits the live limits once the scans `leaving` are gone."""
        live = len(self.scans) - len(leaving)
        held = sum(s.nbytes for s in self.scans.values()) - sum(s.nbytes for s in leaving)
        return (
            live < self.limits.max_live_scans
            and held + self._bytes(start) <= self.limits.max_live_bytes
        )

    def _evict_own(self, start: ScanStart, client: str | None) -> list[Outcome]:
        """Make room under `per_client` for `client`'s new scan from its own scans silent for
        `idle_evict_s` or more, idle longest first; refuse the start when they do not."""
        if client is None or self.per_client <= 0:
            return []
        own = [s for s in self.scans.values() if self.clients.get(s.start.scan_id) == client]
        excess = len(own) - self.per_client + 1
        if excess <= 0:
            return []
        idle = self._idle(own)
        if len(idle) < excess:
            log.warning(
                "scan_id=%s refused: client %s already has %d live scans "
                "(ingest.max_live_scans_per_client=%d)",
                *(start.scan_id, client[:8], len(own), self.per_client),
            )
            raise refused(
                start,
                "too_many_scans",
                f"this client key already has {len(own)} live scans "
                f"(ingest.max_live_scans_per_client={self.per_client}); end one first",
            )
        because = (
            f"when the same client started scan {start.scan_id!r} "
            f"(ingest.max_live_scans_per_client={self.per_client})"
        )
        return self._evict(idle[:excess], because)

    def _evict_for(self, start: ScanStart) -> list[Outcome]:
        """Fail the scans idle for `idle_evict_s` or more, idle longest first, that `start`
        needs gone to fit; none when evicting all of them would still not make room."""
        if self._fits(start, []):
            return []
        idle = self._idle(self.scans.values())
        for n in range(1, len(idle) + 1):
            if self._fits(start, idle[:n]):
                break
        else:
            return []
        return self._evict(idle[:n], f"when scan {start.scan_id!r} needed its room")

    def _idle(self, scans: Iterable[ScanBuffer]) -> list[ScanBuffer]:
        """Those of `scans` silent for `idle_evict_s` or more, idle longest first."""
        now = time.monotonic()
        idle = [s for s in scans if now - s.t_last_message >= self.idle_evict_s]
        return sorted(idle, key=lambda s: s.t_last_message)

    def _evict(self, scans: list[ScanBuffer], because: str) -> list[Outcome]:
        """Fail `scans` as evicted (`scan_failed`, reason "evicted: ..." + `because`)."""
        now, evicted = time.monotonic(), list[Outcome]()
        for scan in scans:
            silent = now - scan.t_last_message
            why = (
                f"evicted: silent for {silent:.1f} s (ingest.idle_evict_s={self.idle_evict_s:g})"
                f" {because}"
            )
            evicted.append(self._fail(scan, why, evicted=True))
        return evicted

    def _check_new(self, start: ScanStart) -> None:
        """Refuse a start that is not new or cannot be flat-field corrected."""
        if start.scan_id in self.scans or start.scan_id in self.continuous:
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
        live = len(self.scans) + len(self.continuous)
        if live >= limit:
            raise refused(
                start,
                "too_many_scans",
                f"{live} scans are live (ingest.max_live_scans={limit})",
            )
        need = self._bytes(start)
        held = self.held_bytes
        if held + need > self.limits.max_live_bytes:
            raise refused(
                start,
                "too_many_scans",
                f"this scan needs {need} bytes and live scans "
                f"hold {held}: over ingest.max_live_bytes={self.limits.max_live_bytes}",
            )

    def _check_seq(self, scan: ScanBuffer, message: FrameChunk | ScanEnd) -> None:
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

    def _frames(self, scan: ScanBuffer, chunk: FrameChunk) -> list[Outcome]:
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
            if chunk.theta is not None:  # v1.1: the angles measured with these frames
                scan.theta[chunk.index : chunk.index + chunk.count] = chunk.theta
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

    def _apply_references(self, scan: ScanBuffer) -> list[Outcome]:
        scan.finalise_references()
        return _clipped(scan.normalise_raw())

    def _end(self, scan: ScanBuffer, end: ScanEnd) -> list[Outcome]:
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

    def _finish(self, scan: ScanBuffer) -> list[Outcome]:
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
        self.clients.pop(scan.start.scan_id, None)
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
                flat_counts=scan.flat_counts(),
                preprocessing=scan.steps.done(scan.start),
            )
        )
        return [*outcomes, completed]

    def _fail(self, scan: ScanBuffer, reason: str, evicted: bool = False) -> Failed:
        self.scans.pop(scan.start.scan_id, None)
        self.clients.pop(scan.start.scan_id, None)
        log.error("scan_id=%s failed: %s", scan.start.scan_id, reason)
        return Failed(scan.start, reason, evicted)


def refused(message: Message, reason: str, detail: str) -> ProtocolError:
    """The rejection of `message` for `reason` (a `REJECT_REASONS` label)."""
    return ProtocolError(reason, detail, message.scan_id, message.seq)


def _clipped(pixels: int) -> list[Outcome]:
    return [Clipped(pixels)] if pixels else []
