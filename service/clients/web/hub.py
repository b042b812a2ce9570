"""The web viewer's ZeroMQ side: one thread subscribed to the publisher.

It does the handshake (retrying until a service answers), bins and encodes each slice once for
all browsers, and hands the result to the web server's event loop. The hand-over is bounded
(`HANDOFF_SLOTS` messages in flight): if the event loop falls behind, this thread waits, the
SUB socket's high-water mark fills, and the publisher drops slices for this viewer only, as
for any slow viewer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import zmq

from service.client import Published, Subscriber
from service.clients.web.broadcast import PREVIEW, WINDOWS_KEPT, Broadcaster, SliceFrame
from service.clients.web.frames import (
    bin_slice,
    display_bin,
    dumps,
    encode_frame,
    frame_header,
    store_bin,
)
from service.events import PreviewHeader, SliceHeader
from service.security import ClientKeys

log = logging.getLogger(__name__)

TOPICS = ("slice", "recon", "event")  # and PREVIEW when the viewer shows previews
HANDOFF_SLOTS = 256
_POLL_S = 0.5  # how often a waiting thread looks at its stop flag


class SliceHub:
    """Subscribes to `endpoint` in its own thread and feeds `broadcaster` on `loop`.

    `start()` and `stop()` are called from the thread that owns the hub (the server's lifespan);
    the broadcaster is only ever touched on `loop`.
    """

    def __init__(
        self,
        endpoint: str,
        broadcaster: Broadcaster,
        loop: asyncio.AbstractEventLoop,
        *,
        max_size: int,
        cache_bytes: int,
        curve: ClientKeys | None = None,
        previews: bool = False,
    ) -> None:
        """`previews`: subscribe to topic `preview` too (without, the publisher sends none)."""
        self.endpoint = endpoint
        self.topics = (*TOPICS, PREVIEW) if previews else TOPICS
        self.broadcaster = broadcaster
        self.loop = loop
        self.max_size = max_size
        self.cache_bytes = cache_bytes
        self.curve = curve
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._wake = f"inproc://tomocast-web-hub-{id(self)}"
        self._slots = threading.Semaphore(HANDOFF_SLOTS)
        self._thread = threading.Thread(target=self._run, name="web-hub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            wake = self._context.socket(zmq.PAIR)
            wake.setsockopt(zmq.SNDTIMEO, 1000)  # the thread binds its end as it starts
            wake.connect(self._wake)
            try:
                wake.send(b"stop")
            except zmq.Again:
                log.warning("web hub did not take the stop signal; waiting for it anyway")
            wake.close(linger=0)
            self._thread.join()
        self._context.term()

    def _run(self) -> None:
        wake = self._context.socket(zmq.PAIR)
        wake.bind(self._wake)
        try:
            with Subscriber(
                self.endpoint, self.topics, context=self._context, curve=self.curve
            ) as subscriber:
                info = self._handshake(subscriber)
                if info is None:
                    return
                self._hand_over(self.broadcaster.on_publisher, True, info)
                poller = zmq.Poller()
                poller.register(subscriber.socket, zmq.POLLIN)
                poller.register(wake, zmq.POLLIN)
                while not self._stop.is_set():
                    # Messages that arrived during the handshake wait inside the subscriber.
                    message = subscriber.recv(timeout=0)
                    if message is None:
                        poller.poll()
                        continue
                    self._forward(message)
        finally:
            wake.close(linger=0)

    def _handshake(self, subscriber: Subscriber) -> dict[str, Any] | None:
        """The service's info once it has seen our subscriptions; None when stopped first. A
        SUB socket re-sends its subscriptions on every (re)connect, so a service that starts
        after the viewer is found."""
        waiting_logged = False
        while not self._stop.is_set():
            try:
                info = subscriber.wait_ready(timeout=_POLL_S)
            except TimeoutError:
                if not waiting_logged:
                    log.warning("waiting for a service to publish on %s", self.endpoint)
                    waiting_logged = True
                continue
            log.info("subscribed to %s: %s", self.endpoint, info)
            return info
        return None

    def _forward(self, message: Published) -> None:
        if message.data is None:
            try:
                event = message.event()
            except ValueError as exc:
                log.warning("event not shown: %s", exc)
                return
            if event is not None:
                self._hand_over(self.broadcaster.on_event, event, message.header)
        elif message.topic in ("slice", "recon", PREVIEW):
            try:
                frame = self.encode(message, received=time.time())
            except (KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "scan_id=%r %s %r: not shown (%s)",
                    message.header.get("scan_id"),
                    message.topic,
                    message.header.get("index"),
                    exc,
                )
                return
            self._hand_over(self.broadcaster.on_frame, frame)

    def encode(self, message: Published, received: float) -> SliceFrame:
        """Bin and encode one published slice for the browsers (this thread's CPU work);
        `received` (unix seconds) is when it arrived here."""
        assert message.data is not None
        header, data = message.header, message.data
        typed: SliceHeader | PreviewHeader
        if message.topic == PREVIEW:
            typed = PreviewHeader.decode(header)
            end_to_end = None
        else:
            typed = message.slice_header()
            end_to_end = typed.end_to_end
        if data.ndim != 2:
            raise ValueError(f"slice shape {data.shape} is not (h, w)")
        rows = typed.rows
        window = typed.window if isinstance(typed, SliceHeader) else None
        live_bin = display_bin(data.shape, self.max_size)
        kept_rows = rows * WINDOWS_KEPT if window else rows  # the last windows share the cache
        kept_bin = store_bin(kept_rows, data.shape, 2, self.cache_bytes, at_least=live_bin)
        live_data = bin_slice(data, live_bin)
        live_header = frame_header(message.topic, header, live_data.shape, live_bin)
        live_header["t_viewer"] = received  # splits the browser's delivery time in two
        live = encode_frame(live_header, live_data)
        stored = live
        if kept_bin != live_bin and message.topic != PREVIEW:  # previews are not kept
            kept_data = bin_slice(data, kept_bin)
            stored = encode_frame(
                frame_header(message.topic, header, kept_data.shape, kept_bin), kept_data
            )
        return SliceFrame(
            topic=message.topic,
            scan_id=typed.scan_id,
            index=typed.index,
            rows=rows,
            live=live,
            stored=stored,
            meta=dumps({**live_header, "kind": "meta"}),
            end_to_end=end_to_end,
            continuous_scan=window.get("continuous_scan") if window else None,
            window_index=window["window_index"] if window else None,
            projections=(window["first_projection"], window["last_projection"]) if window else None,
        )

    def _hand_over(self, method: Any, *args: Any) -> None:
        while not self._slots.acquire(timeout=_POLL_S):
            if self._stop.is_set():
                return

        def call() -> None:
            self._slots.release()
            method(*args)

        self.loop.call_soon_threadsafe(call)
