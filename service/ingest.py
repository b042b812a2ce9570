"""Ingest: the PULL socket the DAQ pushes to, validation, and scan assembly.

Policy: block. Complete scans go into a bounded queue to the reconstruct loop; when it is full
this thread stops reading, ZeroMQ's high-water marks fill, and the DAQ's sends block. Nothing is
dropped on the way in. A bad message is rejected with a counter and one log line (at most
`REJECT_LOG_PER_S` a second per reason, the rest summed up); the stream goes on.

The scan assembler (`service.scan`) says what each message led to; this thread dispatches it:

    Started    -> `ScanStarted` event to the publisher, the scan's geometry to the preparer
    Completed  -> the scan queue (blocks: backpressure)
    Failed     -> the preparer forgets the scan, `ScanFailed` event to the publisher
    Clipped    -> tomocast_clipped_pixels_total
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import replace
from typing import Any

import torch
import zmq

from service.config import IngestSettings
from service.continuous import MAX_PENDING_WINDOWS, ContinuousEnded, WindowReady
from service.errors import ProtocolError
from service.events import ScanFailed
from service.incremental import Incremental
from service.metrics import Metrics
from service.prepare import GeometryPreparer
from service.preprocess import ScanPreprocessor
from service.preview import PreviewTap
from service.protocol import FrameChunk, decode
from service.publish import PublishChannel, Publisher
from service.scan import (
    Clipped,
    Completed,
    Failed,
    Outcome,
    ScanAssembler,
    Started,
)
from service.security import ServerKeys
from service.sinogram import STORAGE_DTYPES, CompletedScan
from service.stage import StageThread

log = logging.getLogger(__name__)

POLL_MS = 250  # how often an idle ingest looks at the stop flag and scan timeouts
RECONNECT_MS = 100  # connect mode: first retry after a lost DAQ, backing off to 10x
# rejected messages logged per reason and second; the rest are counted and summed up in one
# line, so a flood of bad messages cannot flood the log (the counter has every one)
REJECT_LOG_PER_S = 10


class RejectionLog:
    """One log line per rejected message, at most `per_second` per reason and second; those
    beyond are summed up in one line (`suppressed K`) once their second is over. Used on the
    ingest thread only."""

    def __init__(self, per_second: int = REJECT_LOG_PER_S) -> None:
        self.per_second = per_second
        self._window: dict[str, tuple[float, int]] = {}  # reason -> (window start, logged)
        self._suppressed: dict[str, int] = {}

    def rejected(self, exc: ProtocolError) -> None:
        now = time.monotonic()
        self._summarise(now)
        start, logged = self._window.get(exc.reason, (now, 0))
        if logged < self.per_second:
            log.warning("%s", exc)
            self._window[exc.reason] = (start, logged + 1)
        else:
            self._suppressed[exc.reason] = self._suppressed.get(exc.reason, 0) + 1

    def tick(self, final: bool = False) -> None:
        """Sum up the seconds that are over (called as the ingest polls); `final`: all of
        them (the ingest is stopping)."""
        self._summarise(time.monotonic(), final)

    def _summarise(self, now: float, final: bool = False) -> None:
        for reason, (start, _) in list(self._window.items()):
            if now - start < 1.0 and not final:
                continue
            del self._window[reason]
            if suppressed := self._suppressed.pop(reason, 0):
                log.warning(
                    "suppressed %d more rejected messages (reason %s) in %.1f s; "
                    "tomocast_rejected_messages_total counts every one",
                    suppressed,
                    reason,
                    now - start,
                )


class Ingest(StageThread):
    """Owns the PULL socket and the scan assembler on its own thread.

    `bind`/`start`/`stop`/`join` are called from the owner's thread; complete scans are put on
    `scans` (a bounded queue the reconstruct loop consumes); `None` is put there when ingest
    stops (the loop's end of stream). Each accepted `scan_start` is handed to `preparer`, and
    that of each scan that fails while being assembled is cancelled there, on this thread
    (neither blocks).
    """

    def __init__(
        self,
        settings: IngestSettings,
        context: zmq.Context[Any],
        device: torch.device,
        scans: queue.Queue[CompletedScan | ContinuousEnded | None],
        publisher: Publisher,
        metrics: Metrics,
        curve: ServerKeys | None = None,
        preparer: GeometryPreparer | None = None,
        preprocessor: ScanPreprocessor | None = None,
        tap: PreviewTap | None = None,
        incremental: Incremental | None = None,
    ) -> None:
        super().__init__("ingest", metrics)
        self.incremental = incremental  # FBP of blocks of projections as they arrive
        self.tap = tap  # live scans and their previews (service.preview), on this thread
        self.settings = settings
        self.context = context
        self.device = device
        self.scans = scans
        self.publisher = publisher
        self.limits = settings.limits()
        self.curve = curve
        self.preparer = preparer
        self.preprocessor = preprocessor  # its frame steps run here, as projections arrive
        self._socket: zmq.Socket[Any] | None = None
        self.endpoint = settings.endpoint
        self.assembler: ScanAssembler | None = None
        self._channel: PublishChannel | None = None
        self._drain_deadline = float("inf")
        self._rejections = RejectionLog()
        # continuous scans' windows waiting for room in the loop's queue (drop-oldest)
        self._windows: deque[CompletedScan] = deque()
        self._windows_dropped: dict[str, int] = {}  # by continuous scan, until its end

    @property
    def live_scans(self) -> int:
        """Scans being assembled; safe to read from any thread."""
        return 0 if self.assembler is None else self.assembler.live_scans

    def bind(self) -> None:
        self._socket = self.context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, self.settings.rcvhwm)
        self._socket.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        self._socket.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(self._socket)
        if self.settings.mode == "connect":
            # ZeroMQ reconnects by itself when the DAQ restarts; backpressure and validation
            # are those of the bound socket (the DAQ's PUSH blocks at its high-water mark)
            self._socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
            self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, 10 * RECONNECT_MS)
            self._socket.connect(self.settings.endpoint)
            self.endpoint = self.settings.endpoint
            log.info("ingest connected to the DAQ at %s", self.endpoint)
            return
        self._socket.bind(self.settings.endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("ingest listening on %s", self.endpoint)

    def stop(self, drain_s: float = 30.0) -> None:
        """Stop reading; a complete scan still waiting for the loop may wait up to `drain_s`
        more seconds before it is failed (`join` waits for the thread). Never started (the
        service failed to start): what the thread would have done at its end, close the
        socket and end the loop's stream."""
        self._drain_deadline = time.monotonic() + drain_s
        super().stop()
        if not self.started:
            if self._socket is not None:
                self._socket.close(linger=0)
            self._put(None, force=True)

    def _run(self) -> None:
        assert self._socket is not None
        self._channel = self.publisher.channel()
        self.assembler = assembler = ScanAssembler(
            self.device,
            self.limits,
            STORAGE_DTYPES[self.settings.sinogram_dtype],
            self.settings.idle_evict_s,
            self.preprocessor.frame_steps if self.preprocessor is not None else None,
            self.settings.max_live_scans_per_client,
        )
        try:
            while not self.stopping:
                if self._socket.poll(POLL_MS):
                    frames = self._socket.recv_multipart(copy=False)
                    self.guarded("an ingest message (dropped)", self._handle, assembler, frames)
                self._dispatch(assembler.expire(self.settings.scan_timeout_s))
                self._offer_windows()
                if self.tap is not None:  # projections not previewed yet, once one is due
                    self.tap.tick(assembler.scans.values())
                self._rejections.tick()
            self._dispatch(assembler.drop_all("the service is stopping"))
            self._rejections.tick(final=True)
        finally:
            self._channel.close()
            self._socket.close(linger=0)
            self._put(None, force=True)

    def _handle(self, assembler: ScanAssembler, frames: list[zmq.Frame]) -> None:
        t0 = time.perf_counter()
        try:
            message = decode(frames, self.limits)
            outcomes = assembler.handle(message, self._client(frames[0]))
        except ProtocolError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self._rejections.rejected(exc)
            return
        live = assembler.scans.get(message.scan_id) if isinstance(message, FrameChunk) else None
        if self.tap is not None and live is not None:
            self.tap.frames(live)
        if self.incremental is not None and live is not None:
            self.incremental.scan_frames(live)
        self._dispatch(outcomes)  # a complete scan may wait for the loop: timed as receive
        elapsed = time.perf_counter() - t0
        self.metrics.messages.labels(message.type).inc()
        if isinstance(message, FrameChunk):
            nbytes = len(frames[1].buffer) if hasattr(frames[1], "buffer") else len(frames[1])
            self.metrics.ingest_bytes.inc(nbytes)
            if message.kind == "projections":
                self.metrics.projections.inc(message.count)
                self.metrics.stage_seconds.labels("normalize").observe(elapsed)
                return
        self.metrics.stage_seconds.labels("receive").observe(elapsed)

    def _client(self, frame: zmq.Frame) -> str | None:
        """The sender's authenticated identity: its CURVE key (z85, ZeroMQ's User-Id, which
        the authenticator sets), or None without CURVE (a peer address proves nothing)."""
        if self.curve is None:
            return None
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return str(user) if user else None

    def _dispatch(self, outcomes: list[Outcome] | list[Failed]) -> None:
        assert self._channel is not None
        for outcome in outcomes:
            if isinstance(outcome, Clipped):
                self.metrics.clipped_pixels.inc(outcome.pixels)
            elif isinstance(outcome, WindowReady):
                self._window_ready(outcome.scan)
            elif isinstance(outcome, ContinuousEnded):
                # after its windows, through the loop: its event follows their slices
                self._offer_windows(block=True)
                dropped = self._windows_dropped.pop(outcome.event.scan_id, 0)
                if dropped:  # `windows`: those reconstructed
                    windows = (outcome.event.windows or 0) - dropped
                    outcome = ContinuousEnded(replace(outcome.event, windows=windows))
                if not self._put(outcome, force=False):
                    self._channel.send_event(outcome.event)
            elif isinstance(outcome, Started) and outcome.start.continuous:
                self._channel.send_event(outcome.event)  # no previews or incremental FBP
            elif isinstance(outcome, Started):
                self._channel.send_event(outcome.event)
                if self.tap is not None:
                    self.tap.started(outcome.start)
                if self.incremental is not None:
                    self.incremental.scan_started(outcome.start)
                if self.preparer is not None:
                    self.preparer.submit(outcome.start)
            elif isinstance(outcome, Completed):
                scan = outcome.scan if self.tap is None else self.tap.completed(outcome.scan)
                self._hand_over(scan)
            else:
                if self.tap is not None:
                    self.tap.failed(outcome.start)
                if self.incremental is not None:
                    self.incremental.scan_failed(outcome.start)
                if outcome.evicted:
                    self.metrics.scans_evicted.inc()
                self._windows_dropped.pop(outcome.start.scan_id, None)
                if self.preparer is not None:
                    self.preparer.cancel(outcome.start)
                self._channel.send_event(outcome.event)

    def _window_ready(self, scan: CompletedScan) -> None:
        """A continuous scan's window: to the loop's queue when it has room, else it waits;
        more than MAX_PENDING_WINDOWS waiting: the oldest is dropped (the loop is behind)."""
        self._windows.append(scan)
        self.metrics.continuous_windows.inc()
        while len(self._windows) > MAX_PENDING_WINDOWS:
            dropped = self._windows.popleft()
            self.metrics.continuous_windows_dropped.inc()
            assert dropped.window is not None
            of = dropped.window["continuous_scan"]
            self._windows_dropped[of] = self._windows_dropped.get(of, 0) + 1
            log.warning(
                "scan_id=%s dropped: the reconstruct loop is behind the continuous scan",
                dropped.start.scan_id,
            )
        self._offer_windows()

    def _offer_windows(self, block: bool = False) -> None:
        """Hand waiting windows to the loop: as far as its queue has room, or all (`block`)."""
        while self._windows:
            if block:
                self._hand_over(self._windows.popleft())
                continue
            try:
                self.scans.put_nowait(self._windows[0])
            except queue.Full:
                break
            self._windows.popleft()
        if self.assembler is not None:
            pending = sum(w.sinogram.numel() * w.sinogram.element_size() for w in self._windows)
            rings = sum(r.nbytes for r in self.assembler.continuous.values())
            self.metrics.continuous_buffer_bytes.set(rings + pending)

    def _hand_over(self, scan: CompletedScan) -> None:
        t0 = time.monotonic()
        delivered = self._put(scan, force=False)
        if self.assembler is not None:
            # Time spent blocked on our own backpressure is not the DAQ's silence.
            self.assembler.extend_deadlines(time.monotonic() - t0)
        if not delivered:
            log.error(
                "scan_id=%s failed: the service stopped before the worker could take it",
                scan.start.scan_id,
            )
            assert self._channel is not None
            self._channel.send_event(
                ScanFailed(
                    scan.start.scan_id,
                    "drain timeout: the service stopped before the worker could take "
                    "this scan (worker.drain_timeout_s)",
                )
            )

    def _put(self, item: CompletedScan | ContinuousEnded | None, force: bool) -> bool:
        """Block while the loop is busy (backpressure). After stop, a scan waits until the
        drain deadline; the end-of-stream sentinel (force) is always delivered."""
        while True:
            try:
                self.scans.put(item, timeout=POLL_MS / 1000)
                return True
            except queue.Full:
                if not force and self.stopping and time.monotonic() > self._drain_deadline:
                    return False
