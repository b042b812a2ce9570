"""The publisher: slices and scan events out to viewers over ZeroMQ.

One thread owns the XPUB socket. Producers (the ingest and worker threads) each hold a
`PublishChannel`, an inproc PUSH socket into that thread, because ZeroMQ sockets must not be
shared between threads. XPUB rather than PUB lets the service answer the viewers' handshake: a
viewer subscribes to its topics, then to a unique `hello.<token>` topic, and the service
publishes on that topic as soon as it sees the subscription. Subscriptions travel in order, so
when the hello arrives every earlier subscription of that viewer is in place and nothing
published afterwards is missed. Slow viewers lose messages at the high-water mark (PUB semantics)
and never slow the pipeline; every message carries `pub_seq`, numbered per topic, from which a
viewer counts what it lost (`Subscriber.dropped`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import zmq

from service.config import PublishSettings
from service.events import EVENT_TOPIC, PREVIEW_TOPIC, Event, PreviewHeader, ScanEnded, SliceHeader
from service.metrics import Metrics
from service.security import ServerKeys
from service.sinks import ScanDescription, SliceBatch
from service.stage import StageThread

log = logging.getLogger(__name__)

HELLO_PREFIX = b"hello."
_STOP = b"\x00stop"
_INPROC = "inproc://tomocast-publisher-{}"
# scans whose end went out, remembered so that a late slice of theirs is not sent after it
ENDED_REMEMBERED = 4096
_SLICE_TOPICS = (b"slice", b"recon")
_END_EVENTS = ("scan_completed", "scan_failed")


# At stop, how long the viewers get to take what was already forwarded to them; a viewer that
# reads nothing holds the stop no longer than this.
CLOSE_LINGER_MS = 2000


class Publisher(StageThread):
    """Owns the XPUB socket and its forwarding thread. `bind`/`start`/`stop`/`join` from the
    owner's thread; `channel()` for each producer thread (one channel per thread)."""

    def __init__(
        self,
        settings: PublishSettings,
        context: zmq.Context[Any],
        metrics: Metrics,
        service_info: dict[str, Any],
        curve: ServerKeys | None = None,
    ) -> None:
        super().__init__("publish", metrics)
        self.settings = settings
        self.context = context
        self.service_info = service_info
        self.curve = curve
        self._inproc = _INPROC.format(id(self))
        self._xpub: zmq.Socket[Any] | None = None
        self._pull: zmq.Socket[Any] | None = None
        self.endpoint = settings.endpoint
        # publisher thread only: scan_ids whose end event was forwarded, oldest first
        self._ended: OrderedDict[str, None] = OrderedDict()

    def bind(self) -> None:
        """Bind the XPUB socket (`endpoint` then says where) and the producers' inproc one."""
        self._xpub = self.context.socket(zmq.XPUB)
        self._xpub.setsockopt(zmq.SNDHWM, self.settings.sndhwm)
        self._xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every hello subscription reaches us
        self._xpub.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(self._xpub)
        self._xpub.bind(self.settings.endpoint)
        self.endpoint = self._xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pull = self.context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 1000)
        self._pull.bind(self._inproc)

    def start(self) -> None:
        if self._xpub is None:
            self.bind()
        super().start()
        log.info("publishing on %s", self.endpoint)

    def channel(self) -> PublishChannel:
        return PublishChannel(self.context, self._inproc, self.metrics)

    def stop(self) -> None:
        """The thread forwards everything already queued, then closes the sockets (`join`
        waits for that). Bound but never started: the sockets are closed here."""
        if not self.started:
            for socket in (self._pull, self._xpub):
                if socket is not None:
                    socket.close(linger=0)
            return
        super().stop()

    def _signal_stop(self) -> None:
        if self.alive:
            push = self.context.socket(zmq.PUSH)
            push.connect(self._inproc)
            push.send(_STOP)
            push.close(linger=-1)

    def _run(self) -> None:
        assert self._xpub is not None and self._pull is not None
        poller = zmq.Poller()
        poller.register(self._xpub, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        hello = msgpack.packb({"v": 1, **self.service_info})
        sequence: dict[bytes, int] = {}
        try:
            while True:
                ready = dict(poller.poll())
                if self._xpub in ready:
                    subscription = self._xpub.recv()
                    if subscription[:1] == b"\x01" and subscription[1:].startswith(HELLO_PREFIX):
                        self._xpub.send_multipart([subscription[1:], hello])
                if self._pull in ready:
                    frames = self._pull.recv_multipart(copy=False)
                    if frames[0].bytes == _STOP:
                        # The producers are closed by now, but PULL reads its pipes in turn:
                        # messages of theirs may still wait behind the sentinel's pipe.
                        while self._pull.poll(0):
                            self._forward(self._pull.recv_multipart(copy=False), sequence)
                        return
                    self._forward(frames, sequence)
        finally:
            self._pull.close(linger=0)
            # what was forwarded may still sit in the sockets' queues: viewers get a bounded
            # while to take it (with linger 0 a loaded machine lost the last few at stop)
            self._xpub.close(linger=CLOSE_LINGER_MS)

    def _forward(self, frames: list[zmq.Frame], sequence: dict[bytes, int]) -> None:
        assert self._xpub is not None
        self.metrics.queue_depth.labels("publish").dec()
        topic = frames[0].bytes
        # One counter per topic, stamped here where every producer's messages meet: a viewer
        # that sees a gap in `pub_seq` knows it lost messages (PUB drops silently for a slow
        # viewer; only the viewer can count what it missed).
        header = msgpack.unpackb(frames[1].bytes)
        if self._late(topic, header):
            return
        header["pub_seq"] = sequence[topic] = sequence.get(topic, -1) + 1
        try:
            self._xpub.send_multipart([topic, msgpack.packb(header), *frames[2:]], copy=False)
        except zmq.ZMQError as exc:  # one message lost, never the publisher
            self.error(f"a {topic[:16]!r} message", exc)

    def _late(self, topic: bytes, header: dict[str, Any]) -> bool:
        """Whether this is a slice of a scan whose end event already went out: dropped and
        counted, so every viewer sees a scan's slices, then its end, and nothing after (the
        drain timeout fails a scan from another thread while the worker may still be writing
        its batch). Also files the scan ends and starts (a scan_id may be used again)."""
        scan_id = header.get("scan_id")
        if not isinstance(scan_id, str):
            return False
        if topic == EVENT_TOPIC.encode():
            event = header.get("event")
            if event in _END_EVENTS:
                self._ended[scan_id] = None
                self._ended.move_to_end(scan_id)
                while len(self._ended) > ENDED_REMEMBERED:
                    self._ended.popitem(last=False)
            elif event == "scan_started":
                self._ended.pop(scan_id, None)
            return False
        if topic in _SLICE_TOPICS and scan_id in self._ended:
            self.metrics.late_dropped.labels(topic.decode()).inc()
            log.warning("scan_id=%s: a %s slice after the scan's end, not sent", scan_id, topic)
            return True
        return False


class PublishChannel:
    """A producer's handle on the publisher. Owned by one thread at a time; not thread-safe.

    Also the publisher's `SliceSink` (`service.sinks`): each scan's slices go out one message a
    slice under the scan's `SliceHeader`, then its outcome as an event.
    """

    def __init__(self, context: zmq.Context[Any], inproc: str, metrics: Metrics) -> None:
        self._push = context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 1000)  # blocks the producer if the forwarder lags
        self._push.connect(inproc)
        self.metrics = metrics
        self._headers: dict[str, SliceHeader] = {}  # by scan_id, between begin and end

    # ---- SliceSink ------------------------------------------------------------------------

    def begin(self, scan: ScanDescription) -> None:
        self._headers[scan.scan_id] = SliceHeader(
            scan.scan_id, scan.rows, scan.model, scan.t_last_projection, 0, {}, window=scan.window
        )

    def write(self, batch: SliceBatch) -> None:
        header, timing = self._headers[batch.scan_id], batch.timing.as_dict()
        for i, data in enumerate(batch.slices):
            denoised = batch.denoised is not None and bool(batch.denoised[i])
            consistency = None
            if batch.consistency is not None and math.isfinite(batch.consistency[i]):
                consistency = float(batch.consistency[i])
            self.send_slice(
                batch.topic,
                replace(
                    header,
                    index=batch.first + i,
                    timing=timing,
                    scale=batch.scale,
                    denoised=denoised,
                    consistency=consistency,
                ),
                data,
            )

    def end(self, outcome: ScanEnded) -> None:
        self._headers.pop(outcome.scan_id, None)
        self.send_event(outcome)

    # ---- messages -------------------------------------------------------------------------

    def send_slice(self, topic: str, header: SliceHeader, data: np.ndarray) -> None:
        """Publish one slice; stamps `shape`, `t_published` and the `end_to_end` timing."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        now = time.time()
        timing = {**header.timing, "end_to_end": now - header.t_last_projection}
        if topic == "slice":
            self.metrics.stage_seconds.labels("end_to_end").observe(timing["end_to_end"])
        stamped = replace(header, shape=data.shape, dtype="float32", t_published=now, timing=timing)
        self.metrics.queue_depth.labels("publish").inc()
        self._push.send_multipart(
            [topic.encode(), msgpack.packb(stamped.encode()), data], copy=False
        )
        self.metrics.slices.labels(topic).inc()

    def send_preview(self, header: PreviewHeader, data: np.ndarray) -> float:
        """Publish one preview (topic `preview`); stamps `shape` and `t_published`, which it
        returns."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        stamped = replace(header, shape=data.shape, dtype="float32", t_published=time.time())
        self.metrics.queue_depth.labels("publish").inc()
        self._push.send_multipart(
            [PREVIEW_TOPIC.encode(), msgpack.packb(stamped.encode()), data], copy=False
        )
        assert stamped.t_published is not None
        return stamped.t_published

    def send_event(self, event: Event) -> None:
        """Publish a scan event. Every scan's outcome is announced here exactly once, so this
        is where it is counted (`tomocast_scans_total`)."""
        if isinstance(event, ScanEnded):
            self.metrics.scan_ended(event)
        header = {"v": 1, "t_published": time.time(), **event.encode()}
        self.metrics.queue_depth.labels("publish").inc()
        self._push.send_multipart([EVENT_TOPIC.encode(), msgpack.packb(header, default=_plain)])

    def close(self) -> None:
        self._push.close(linger=-1)


def _plain(value: Any) -> Any:
    """msgpack fallback for numpy scalars and arrays in event headers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__} in an event")
