"""Ingest: the PULL socket the DAQ pushes to, validation, and scan assembly.

Policy: block. Complete scans go into a bounded queue to the worker; when it is full this thread
stops reading, ZeroMQ's high-water marks fill, and the DAQ's sends block. Nothing is dropped on
the way in. A bad message is rejected with one log line and a counter; the stream goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from service.config import IngestSettings
from service.errors import ProtocolError
from service.metrics import Metrics
from service.protocol import FrameChunk, ScanStart, decode
from service.publish import PublishChannel, Publisher
from service.scan import STORAGE_DTYPES, CompletedScan, ScanAssembler
from service.security import ServerKeys

log = logging.getLogger(__name__)

POLL_MS = 250  # how often an idle ingest looks at the stop flag and scan timeouts


class Ingest:
    """Owns the PULL socket and the scan assembler on its own thread.

    `start`/`stop` are called from the owner's thread; complete scans are put on `scans`
    (a bounded queue the worker consumes); `None` is put there when ingest stops. Each accepted
    `scan_start` is handed to `on_scan_start`, and that of each scan that fails while being
    assembled to `on_scan_failed`, on this thread (they must not block).
    """

    def __init__(
        self,
        settings: IngestSettings,
        context: zmq.Context,
        device: torch.device,
        scans: queue.Queue[CompletedScan | None],
        publisher: Publisher,
        metrics: Metrics,
        curve: ServerKeys | None = None,
        on_scan_start: Callable[[ScanStart], None] = lambda start: None,
        on_scan_failed: Callable[[ScanStart], None] = lambda start: None,
    ) -> None:
        self.settings = settings
        self.context = context
        self.device = device
        self.scans = scans
        self.publisher = publisher
        self.metrics = metrics
        self.limits = settings.limits()
        self.curve = curve
        self.on_scan_start = on_scan_start
        self.on_scan_failed = on_scan_failed
        self._stop = threading.Event()
        self._socket: zmq.Socket | None = None
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self.endpoint = settings.endpoint
        self.assembler: ScanAssembler | None = None
        self._channel: PublishChannel | None = None
        self._drain_deadline = float("inf")

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
        self._socket.bind(self.settings.endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("ingest listening on %s", self.endpoint)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop reading; a complete scan still waiting for the worker may wait up to `timeout`
        more seconds before it is failed. Never started (the service failed to start): what
        the thread would have done at its end, close the socket and end the worker's stream."""
        self._drain_deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread.ident is None:
            if self._socket is not None:
                self._socket.close(linger=0)
            self._put(None, force=True)
            return
        self._thread.join(timeout + 2 * POLL_MS / 1000)

    def _run(self) -> None:
        assert self._socket is not None
        self._channel = channel = self.publisher.channel()
        self.assembler = assembler = ScanAssembler(
            self.device,
            self.settings.max_live_scans,
            on_complete=self._hand_over,
            on_event=self._event,
            on_clipped=self.metrics.clipped_pixels.inc,
            max_live_bytes=self.settings.max_live_bytes,
            on_start=self.on_scan_start,
            on_failed=self.on_scan_failed,
            storage=STORAGE_DTYPES[self.settings.sinogram_dtype],
        )
        try:
            while not self._stop.is_set():
                if self._socket.poll(POLL_MS):
                    frames = self._socket.recv_multipart(copy=False)
                    self._handle(assembler, frames)
                assembler.expire(self.settings.scan_timeout_s)
            assembler.drop_all("the service is stopping")
        finally:
            channel.close()
            self._socket.close(linger=0)
            self._put(None, force=True)

    def _handle(self, assembler: ScanAssembler, frames: list[zmq.Frame]) -> None:
        t0 = time.perf_counter()
        try:
            message = decode(frames, self.limits)
            assembler.handle(message)
        except ProtocolError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            log.warning("%s", exc)
            return
        except Exception:  # the one place an ingest failure becomes a log line + counter
            log.exception("unexpected error handling an ingest message; it is dropped")
            self.metrics.errors.labels("ingest").inc()
            return
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

    def _event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "scan_failed":
            self.metrics.scans.labels("failed").inc()
        assert self._channel is not None
        self._channel.send_event(event)

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
            self._event(
                {
                    "event": "scan_failed",
                    "scan_id": scan.start.scan_id,
                    "reason": "the service is stopping; the drain timeout ran out before "
                    "the worker could take this scan",
                }
            )

    def _put(self, item: CompletedScan | None, force: bool) -> bool:
        """Block while the worker is busy (backpressure). After stop, a scan waits until the
        drain deadline; the end-of-stream sentinel (force) is always delivered."""
        while True:
            try:
                self.scans.put(item, timeout=POLL_MS / 1000)
                return True
            except queue.Full:
                if not force and self._stop.is_set() and time.monotonic() > self._drain_deadline:
                    return False
