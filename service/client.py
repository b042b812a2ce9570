"""Clients of the service: `Detector` (the DAQ side) and `Subscriber` (the viewer side)."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import msgpack
import numpy as np
import zmq

from service.events import EVENT_TOPIC, Event, SliceHeader, decode_event
from service.protocol import DTYPES, FrameChunk, Message, ScanEnd, ScanStart, encode
from service.publish import HELLO_PREFIX
from service.security import ClientKeys


class Detector:
    """Sends scans to the ingest socket over PUSH. Owned by one thread.

    With `curve` (ClientKeys) the connection is encrypted and authenticated (CURVE). With
    `bind` the detector binds `endpoint` (its actual address in `self.endpoint`) and the service
    connects to it (`ingest.mode = "connect"`), as DAQ gateways that bind do.
    Sends block while the service applies backpressure (that is the point: nothing is dropped);
    `send_timeout_s` turns a blocked send into TimeoutError. `close()` waits up to `linger_s` for
    queued messages to leave, so a DAQ that exits right after its last send loses nothing.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context[Any] | None = None,
        sndhwm: int = 64,
        send_timeout_s: float | None = None,
        linger_s: float = 60.0,
        curve: ClientKeys | None = None,
        bind: bool = False,
    ) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.LINGER, int(linger_s * 1000))
        if send_timeout_s is not None:
            self.socket.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        if curve is not None:
            curve.apply(self.socket)
        if bind:  # a DAQ that binds; the service connects to it (ingest.mode = "connect")
            self.socket.bind(endpoint)
            self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.socket.connect(endpoint)
            self.endpoint = endpoint
        self._seq: dict[str, int] = {}

    def next_seq(self, scan_id: str) -> int:
        seq = self._seq.get(scan_id, 0)
        self._seq[scan_id] = seq + 1
        return seq

    def send(self, message: Message) -> None:
        try:
            self.socket.send_multipart(encode(message), copy=False)
        except zmq.Again:
            raise TimeoutError(
                "the service did not accept the message in time "
                "(backpressure or no service listening)"
            ) from None

    def send_raw(self, frames: list[bytes]) -> None:
        """Send arbitrary frames (for testing how the service treats bad input)."""
        self.socket.send_multipart(frames)

    def start_scan(
        self, scan_id: str, rows: int, cols: int, n_angles: int, dtype: str, **options: Any
    ) -> ScanStart:
        """Send `scan_start`; `options` are the optional header keys (theta, center, n_dark,
        n_flat, normalized, meta; v1.1: continuous, window, every)."""
        if "theta" in options and options["theta"] is not None:
            options["theta"] = tuple(float(t) for t in options["theta"])
        start = ScanStart(scan_id, self.next_seq(scan_id), rows, cols, n_angles, dtype, **options)
        self.send(start)
        return start

    def send_frames(
        self,
        kind: Literal["dark", "flat", "projections"],
        scan_id: str,
        index: int,
        data: np.ndarray,
        theta: Sequence[float] | None = None,
    ) -> None:
        """`theta`: one angle per projection (radians, protocol v1.1), e.g. of a fly scan."""
        chunk = FrameChunk.from_array(kind, scan_id, self.next_seq(scan_id), index, data)
        if theta is not None:
            chunk = replace(chunk, theta=tuple(float(t) for t in theta))
        self.send(chunk)

    def end_scan(self, scan_id: str, count: int) -> None:
        self.send(ScanEnd(scan_id, self.next_seq(scan_id), count))
        self._seq.pop(scan_id, None)

    def send_scan(
        self,
        scan_id: str,
        projections: np.ndarray,
        *,
        darks: np.ndarray | None = None,
        flats: np.ndarray | None = None,
        chunk: int = 8,
        pace: Callable[[int], object] | None = None,
        progress: Callable[[int], None] | None = None,
        **options: Any,
    ) -> ScanStart:
        """Send a whole scan: start, darks, flats, projections in chunks of `chunk`, end.

        `pace(n)` is called before each chunk of n projections (e.g. to hold a frame rate);
        `progress(n)` after each chunk is sent.
        """
        n_angles, rows, cols = projections.shape
        if projections.dtype.name not in DTYPES:
            raise ValueError(f"projections dtype {projections.dtype} is not one of {list(DTYPES)}")
        start = self.start_scan(
            scan_id,
            rows,
            cols,
            n_angles,
            projections.dtype.name,
            n_dark=0 if darks is None else len(darks),
            n_flat=0 if flats is None else len(flats),
            **options,
        )
        for kind, frames in (("dark", darks), ("flat", flats)):
            if frames is not None and len(frames):
                self.send_frames(kind, scan_id, 0, frames)  # type: ignore[arg-type]
        for index in range(0, n_angles, chunk):
            block = projections[index : index + chunk]
            if pace is not None:
                pace(len(block))
            self.send_frames("projections", scan_id, index, block)
            if progress is not None:
                progress(len(block))
        self.end_scan(scan_id, n_angles)
        return start

    def close(self) -> None:
        self.socket.close()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Published:
    """One message from the publisher: a slice (data set) or an event (data None)."""

    topic: str
    header: dict[str, Any]
    data: np.ndarray | None

    def event(self) -> Event | None:
        """The typed scan event of an `event` message, None for a slice. Raises
        `service.events.UnknownEvent` for an event this version does not know."""
        return decode_event(self.header) if self.topic == EVENT_TOPIC else None

    def slice_header(self) -> SliceHeader:
        """The typed header of a slice (topics `slice`, `recon`); ValueError when it is not
        one."""
        if self.data is None:
            raise ValueError(f"a {self.topic!r} message is not a slice")
        return SliceHeader.decode(self.header)


class Subscriber:
    """Receives slices and events from the publisher over SUB. Owned by one thread.

    Construction subscribes; `wait_ready()` completes the handshake, after which nothing the
    service publishes is missed (short of this viewer falling behind by the high-water mark).
    """

    def __init__(
        self,
        endpoint: str,
        topics: tuple[str, ...] = ("slice", "event"),
        *,
        context: zmq.Context[Any] | None = None,
        rcvhwm: int = 100_000,
        curve: ClientKeys | None = None,
    ) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(endpoint)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._hello = HELLO_PREFIX + uuid.uuid4().hex.encode()
        self.socket.setsockopt(zmq.SUBSCRIBE, self._hello)
        self._early: deque[Published] = deque()
        self._last_seq: dict[str, int] = {}
        self.dropped: dict[str, int] = {}  # per topic: messages the publisher sent we never got
        self.service_info: dict[str, Any] | None = None

    def wait_ready(self, timeout: float = 10.0) -> dict[str, Any]:
        """Block until the service has acknowledged our subscriptions; returns its info."""
        deadline = time.monotonic() + timeout
        while self.service_info is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000)):
                raise TimeoutError(f"no handshake from the publisher within {timeout} s")
            frames = self.socket.recv_multipart()
            if frames[0] == self._hello:
                self.service_info = msgpack.unpackb(frames[1])
                self.socket.setsockopt(zmq.UNSUBSCRIBE, self._hello)
            elif not frames[0].startswith(HELLO_PREFIX):
                self._early.append(self._count(_parse(frames)))
        return self.service_info

    def recv(self, timeout: float | None = None) -> Published | None:
        """The next message, or None after `timeout` seconds (None: wait forever)."""
        if self._early:
            return self._early.popleft()
        while True:
            if timeout is not None and not self.socket.poll(int(timeout * 1000)):
                return None
            frames = self.socket.recv_multipart()
            if not frames[0].startswith(HELLO_PREFIX):
                return self._count(_parse(frames))

    def _count(self, message: Published) -> Published:
        """Track `pub_seq` per topic: a gap is messages lost at our high-water mark."""
        seq = message.header.get("pub_seq")
        if isinstance(seq, int):
            last = self._last_seq.get(message.topic)
            if last is not None and seq > last + 1:
                self.dropped[message.topic] = self.dropped.get(message.topic, 0) + seq - last - 1
            self._last_seq[message.topic] = seq
        return message

    def __iter__(self) -> Iterator[Published]:
        while True:
            message = self.recv()
            assert message is not None
            yield message

    def close(self) -> None:
        self.socket.close()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(frames: list[bytes]) -> Published:
    topic = frames[0].decode()
    header = msgpack.unpackb(frames[1])
    data = None
    if len(frames) > 2:
        data = np.frombuffer(frames[2], dtype=np.dtype(header.get("dtype", "float32")))
        data = data.reshape(header["shape"])
    return Published(topic, header, data)
