"""The web viewer's store of a continuous scan's windows (protocol v1.1), without sockets:
windows are grouped under their continuous scan (the slider's scan store never sees them), the
last `kept` windows are kept whole, a browser asks for (window, row), and a page that joins
gets the newest window."""

from __future__ import annotations

import json

import numpy as np

from service.clients.web.broadcast import Broadcaster, SliceFrame, WindowStore
from service.clients.web.frames import decode_frame, dumps, encode_frame, frame_header
from service.events import ScanStarted
from tests.unit.service.test_web_broadcast import _drain, _frame

ROWS, EVERY, WINDOW = 3, 12, 24


def _window(k: int, index: int, scan_id: str = "spin") -> SliceFrame:
    data = np.full((4, 4), 100 * k + index, np.float32)
    first = k * EVERY
    published = {
        "scan_id": f"{scan_id}.w{k}",
        "index": index,
        "rows": ROWS,
        "window_index": k,
        "first_projection": first,
        "last_projection": first + WINDOW - 1,
        "continuous_scan": scan_id,
    }
    header = frame_header("slice", published, (4, 4), 1)
    live = encode_frame(header, data)
    return SliceFrame(
        topic="slice",
        scan_id=f"{scan_id}.w{k}",
        index=index,
        rows=ROWS,
        live=live,
        stored=live,
        meta=dumps({**header, "kind": "meta"}),
        end_to_end=0.01,
        continuous_scan=scan_id,
        window_index=k,
        projections=(first, first + WINDOW - 1),
    )


def _reply(hub: Broadcaster, request: dict[str, int]) -> list[bytes | str]:
    client = hub.connect()
    _drain(client)
    hub.handle(client, {"get": request["index"], "window": request["window"]})
    return _drain(client)


def test_the_last_windows_are_kept_whole_and_served_by_window_and_row() -> None:
    hub = Broadcaster("tcp://127.0.0.1:1", max_bytes=1 << 20)
    hub.windows = WindowStore(kept=4)
    hub.on_event(ScanStarted("spin", ROWS, 4, 24))
    for k in range(7):
        for index in range(ROWS):
            hub.on_frame(_window(k, index))
    assert hub.store.frames == {}  # not scans of their own: the slider's store is untouched
    assert hub.store.scan_id == "spin"
    assert sorted(hub.windows.windows) == [3, 4, 5, 6]  # the oldest dropped whole
    assert all(len(frames) == ROWS for frames in hub.windows.windows.values())
    assert hub.windows.spans[3] == (36, 59)
    hub.on_frame(_window(1, 0))  # a late old window does not push a newer one out
    assert sorted(hub.windows.windows) == [3, 4, 5, 6]

    (message,) = _reply(hub, {"window": 4, "index": 2})
    assert isinstance(message, bytes)
    header, data = decode_frame(message)
    assert (header["window_index"], header["index"], header["first_projection"]) == (4, 2, 48)
    assert header["continuous_scan"] == "spin"
    assert (data == 402).all()
    (missing,) = _reply(hub, {"window": 0, "index": 2})
    assert isinstance(missing, str)
    assert json.loads(missing) == {"kind": "missing", "scan_id": "spin", "index": 2, "window": 0}
    status = hub.status()["windows"]
    assert status["windows"] == [3, 4, 5, 6] and status["kept"] == 4
    assert status["bytes_kept"] == 4 * ROWS * len(_window(0, 0).stored)


def test_a_page_that_joins_gets_the_windows_and_the_newest_window() -> None:
    hub = Broadcaster("tcp://127.0.0.1:1", max_bytes=1 << 20)
    hub.on_event(ScanStarted("spin", ROWS, 4, 24))
    for k in range(3):
        for index in range(ROWS):
            hub.on_frame(_window(k, index))
    messages = _drain(hub.connect())
    scan = next(json.loads(m) for m in messages if isinstance(m, str) and '"scan"' in m)
    assert scan["windows"]["windows"] == [0, 1, 2]
    assert scan["windows"]["spans"]["2"] == [24, 47]
    frames = [decode_frame(m)[0] for m in messages if isinstance(m, bytes)]
    assert [(h["window_index"], h["index"]) for h in frames] == [(2, i) for i in range(ROWS)]

    # a normal scan afterwards: kept for the slider as before, its frames have no window keys
    hub.on_event(ScanStarted("plain", 2, 4, 24))
    hub.on_frame(_frame(0, "plain", rows=2))
    assert sorted(hub.store.frames) == [("slice", 0)]
    later = _drain(hub.connect())
    (frame,) = [decode_frame(m)[0] for m in later if isinstance(m, bytes)]
    assert frame["scan_id"] == "plain" and "window_index" not in frame
