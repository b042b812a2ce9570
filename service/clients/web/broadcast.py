"""Fan-out to browsers: a bounded queue per browser, and the current scan kept for the slider.

Everything here is owned by the web server's event loop thread. The hub thread hands messages
over with `loop.call_soon_threadsafe`, so nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.clients.web.frames import dumps
from service.events import Event, ScanCompleted, ScanEnded, ScanStarted

log = logging.getLogger(__name__)

Message = bytes | str  # a binary frame or a JSON text message
PREVIEW = "preview"  # the topic of partial reconstructions during a scan (`view --web --previews`)


@dataclass(frozen=True)
class SliceFrame:
    """One published slice, encoded for the browsers by the hub thread. Immutable."""

    topic: str  # "slice" (denoised), "recon" (plain FBP) or "preview" (during the scan)
    scan_id: str
    index: int
    rows: int
    live: bytes  # binned to the display size
    stored: bytes  # binned to fit the scan cache (the same bytes when the bins agree)
    meta: str  # the frame's JSON header alone, for browsers that are not following
    end_to_end: float | None  # seconds, last projection -> published
    # a continuous scan's window (protocol v1.1): its scan_start's scan_id, the window's index
    # and the projections it spans (inclusive); None for the slices of other scans
    continuous_scan: str | None = None
    window_index: int | None = None
    projections: tuple[int, int] | None = None


class ClientQueue:
    """What waits to go to one browser. Owned by the event loop thread.

    Live slices are bounded by `max_bytes` (the backlog a link can clear in a moment, not a
    count, so the service's bursts of a batch of slices pass whole): a slice that would go over
    drops the oldest waiting ones, counted in `dropped`, so a slow browser loses slices for
    itself only and never holds up the others or the hub. The newest always gets in. Text
    messages (events, scan state) are rare and never dropped. A reply to a slider request
    replaces an unsent earlier one (only the latest position matters) and goes out before the
    live slices; a pong goes out first of all, so round trips measure the network.
    """

    def __init__(self, client_id: int, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        self.id = client_id
        self.max_bytes = max_bytes
        self.follow = True  # send live pixels; False: headers only (the user is on the slider)
        self.sent = 0
        self.dropped = 0
        self.connected_at = time.time()
        self._urgent: deque[Message] = deque()
        self._reply: list[Message] = []
        self._items: deque[tuple[bool, Message]] = deque()  # (droppable, message)
        self._droppable = 0  # how many of _items are droppable
        self._droppable_bytes = 0
        self._wakeup = asyncio.Event()

    def put(self, message: Message, *, droppable: bool) -> None:
        if droppable:
            while self._droppable and self._droppable_bytes + len(message) > self.max_bytes:
                self._drop_oldest()
            self._droppable += 1
            self._droppable_bytes += len(message)
        self._items.append((droppable, message))
        self._wakeup.set()

    def put_reply(self, messages: list[Message]) -> None:
        self._reply = list(messages)
        self._wakeup.set()

    def put_urgent(self, message: Message) -> None:
        self._urgent.append(message)
        self._wakeup.set()

    def pending(self) -> int:
        return len(self._urgent) + len(self._reply) + len(self._items)

    def waiting_bytes(self) -> int:
        """Bytes of live slices waiting (what the bound applies to)."""
        return self._droppable_bytes

    async def get(self) -> Message:
        while not self.pending():
            self._wakeup.clear()
            await self._wakeup.wait()
        self.sent += 1
        if self._urgent:
            return self._urgent.popleft()
        if self._reply:
            return self._reply.pop(0)
        droppable, message = self._items.popleft()
        if droppable:
            self._droppable -= 1
            self._droppable_bytes -= len(message)
        return message

    def _drop_oldest(self) -> None:
        for position, (droppable, message) in enumerate(self._items):
            if droppable:
                del self._items[position]
                self._droppable -= 1
                self._droppable_bytes -= len(message)
                self.dropped += 1
                return


@dataclass
class ScanStore:
    """The current scan: its state for browsers that join late, its frames for the slider.
    Owned by the event loop thread. Only one scan is kept; a new scan replaces it."""

    scan_id: str | None = None
    rows: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # the ScanStarted event, as published
    status: str = "idle"  # idle | running | completed | failed
    ended: dict[str, Any] | None = None  # the ScanCompleted / ScanFailed event
    frames: dict[tuple[str, int], bytes] = field(default_factory=dict)
    latency: dict[int, float] = field(default_factory=dict)  # index -> end to end (s), denoised
    latest: int | None = None  # index of the newest denoised slice

    def begin(self, scan_id: str, rows: int, info: dict[str, Any] | None = None) -> None:
        self.scan_id, self.rows, self.info = scan_id, rows, dict(info or {})
        self.status, self.ended, self.latest = "running", None, None
        self.frames, self.latency = {}, {}

    def wants(self, scan_id: str) -> bool:
        """Frames of the current scan are kept; a frame of another scan starts a new current
        scan only when the current one has ended (a viewer that joined mid-scan)."""
        return scan_id == self.scan_id or self.status != "running"

    def add(self, frame: SliceFrame) -> None:
        if frame.scan_id != self.scan_id:
            self.begin(frame.scan_id, frame.rows)
        self.frames[(frame.topic, frame.index)] = frame.stored
        if frame.topic == "slice":
            self.latest = frame.index
            if frame.end_to_end is not None:
                self.latency[frame.index] = frame.end_to_end

    def get(self, index: int) -> list[bytes]:
        return [
            self.frames[(topic, index)]
            for topic in ("recon", "slice")
            if (topic, index) in self.frames
        ]

    def state(self) -> dict[str, Any]:
        received: dict[str, list[int]] = {"slice": [], "recon": []}
        for topic, index in self.frames:
            received[topic].append(index)
        return {
            "scan_id": self.scan_id,
            "rows": self.rows,
            "status": self.status,
            "info": self.info,
            "ended": self.ended,
            "latest": self.latest,
            "received": {topic: sorted(indices) for topic, indices in received.items()},
            "latency": sorted(self.latency.items()),
        }


WINDOWS_KEPT = 64  # the last windows of a continuous scan kept for the time control


@dataclass
class WindowStore:
    """The windows of the current continuous scan, for the page's time control: every row of
    the last `kept` windows (older ones are dropped whole), so memory is bounded however long
    the sample turns. Owned by the event loop thread."""

    kept: int = WINDOWS_KEPT
    scan_id: str | None = None
    windows: dict[int, dict[tuple[str, int], bytes]] = field(default_factory=dict)
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # k -> projections
    latest: int | None = None

    def add(self, frame: SliceFrame) -> None:
        assert frame.window_index is not None
        if frame.continuous_scan != self.scan_id:
            self.scan_id, self.windows, self.spans, self.latest = (
                frame.continuous_scan,
                {},
                {},
                None,
            )
        k = frame.window_index
        if k not in self.windows:
            if self.windows and k < min(self.windows) and len(self.windows) >= self.kept:
                return  # older than all kept: it would be the one dropped
            self.windows[k] = {}
            while len(self.windows) > self.kept:
                oldest = min(self.windows)
                del self.windows[oldest]
                self.spans.pop(oldest, None)
        self.windows[k][(frame.topic, frame.index)] = frame.stored
        if frame.projections is not None:
            self.spans[k] = frame.projections
        self.latest = k if self.latest is None else max(self.latest, k)

    def get(self, k: int, index: int) -> list[bytes]:
        frames = self.windows.get(k, {})
        return [frames[(topic, index)] for topic in ("recon", "slice") if (topic, index) in frames]

    def newest(self) -> list[bytes]:
        """Every slice of the newest window (for a page that joins)."""
        if self.latest is None:
            return []
        frames = self.windows[self.latest]
        return [frames[key] for key in sorted(frames, key=lambda key: (key[1], key[0]))]

    def state(self) -> dict[str, Any]:
        return {
            "continuous_scan": self.scan_id,
            "kept": self.kept,
            "windows": sorted(self.windows),
            "spans": {str(k): list(span) for k, span in sorted(self.spans.items())},
        }


class Broadcaster:
    """Routes the hub's messages to every browser's queue and answers the browsers' requests.
    Owned by the event loop thread."""

    def __init__(self, endpoint: str, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.clients: dict[int, ClientQueue] = {}
        self.store = ScanStore()
        self.windows = WindowStore()
        self.publisher: dict[str, Any] = {"endpoint": endpoint, "connected": False, "info": None}
        self.frames_received = 0
        self._ids = itertools.count(1)

    def connect(self) -> ClientQueue:
        """A new browser: it gets the publisher's and the scan's state, then the newest slice."""
        client = ClientQueue(next(self._ids), self.max_bytes)
        self.clients[client.id] = client
        client.put(dumps({"kind": "publisher", **self.publisher}), droppable=False)
        client.put(
            dumps({"kind": "scan", **self.store.state(), "windows": self.windows.state()}),
            droppable=False,
        )
        if self.windows.scan_id is not None and self.windows.scan_id == self.store.scan_id:
            for frame in self.windows.newest():
                client.put(frame, droppable=True)
        elif self.store.latest is not None:
            for frame in self.store.get(self.store.latest):
                client.put(frame, droppable=True)
        log.info("browser %d connected (%d now)", client.id, len(self.clients))
        return client

    def disconnect(self, client: ClientQueue) -> None:
        self.clients.pop(client.id, None)
        log.info("browser %d left: %d sent, %d dropped", client.id, client.sent, client.dropped)

    def on_publisher(self, connected: bool, info: dict[str, Any] | None) -> None:
        self.publisher.update(connected=connected, info=info)
        self._to_all(dumps({"kind": "publisher", **self.publisher}))

    def on_event(self, event: Event, header: Mapping[str, Any] | None = None) -> None:
        """A scan event; `header` is the map it was published as (with `t_published`,
        `pub_seq`), which the browsers get, or else the event's own encoding."""
        published = dict(header if header is not None else event.encode())
        store = self.store
        if isinstance(event, ScanStarted):
            store.begin(event.scan_id, event.rows, published)
        elif isinstance(event, ScanEnded) and event.scan_id == store.scan_id:
            store.status = "completed" if isinstance(event, ScanCompleted) else "failed"
            store.ended = published
        self._to_all(dumps({"kind": "event", **published}))

    def on_frame(self, frame: SliceFrame) -> None:
        """A slice for the browsers; kept for the slider unless it is a preview (the final
        slices replace previews, and a page that joins late waits for them)."""
        self.frames_received += 1
        if frame.window_index is not None:
            if frame.topic != PREVIEW:
                self.windows.add(frame)  # a continuous scan's window: not a scan of its own
        elif frame.topic != PREVIEW and self.store.wants(frame.scan_id):
            self.store.add(frame)
        for client in self.clients.values():
            client.put(frame.live if client.follow else frame.meta, droppable=True)

    def handle(self, client: ClientQueue, request: dict[str, Any]) -> None:
        """A browser's request: {"get": index}, {"get": index, "window": k} (a continuous
        scan's window k), {"follow": bool} or {"ping": t}."""
        if "ping" in request:
            client.put_urgent(
                dumps({"kind": "pong", "client": request["ping"], "server": time.time()})
            )
        if "follow" in request:
            client.follow = bool(request["follow"])
        if "get" in request:
            index, k = request["get"], request.get("window")
            reply: list[Message] = []
            if isinstance(index, int) and isinstance(k, int):
                reply = list(self.windows.get(k, index))
            elif isinstance(index, int) and k is None:
                reply = list(self.store.get(index))
            if not reply:
                missing = {"kind": "missing", "scan_id": self.store.scan_id, "index": index}
                reply = [dumps(missing if k is None else {**missing, "window": k})]
            client.put_reply(reply)

    def status(self) -> dict[str, Any]:
        store = self.store
        return {
            "publisher": self.publisher,
            "frames_received": self.frames_received,
            "scan": {
                "scan_id": store.scan_id,
                "rows": store.rows,
                "status": store.status,
                "frames_kept": len(store.frames),
                "bytes_kept": sum(len(f) for f in store.frames.values()),
            },
            "windows": {
                **self.windows.state(),
                "bytes_kept": sum(
                    len(f) for w in self.windows.windows.values() for f in w.values()
                ),
            },
            "browsers": [
                {
                    "id": c.id,
                    "follow": c.follow,
                    "sent": c.sent,
                    "dropped": c.dropped,
                    "waiting": c.pending(),
                    "waiting_bytes": c.waiting_bytes(),
                }
                for c in self.clients.values()
            ],
        }

    def _to_all(self, message: str) -> None:
        for client in self.clients.values():
            client.put(message, droppable=False)
