"""The web viewer's fan-out and wire format, without sockets: bounded per-browser queues that
drop the oldest slice for the slow browser only, the scan kept for the slider, and frames."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from service.clients.web.broadcast import Broadcaster, ClientQueue, SliceFrame
from service.clients.web.frames import (
    bin_slice,
    decode_frame,
    display_bin,
    dumps,
    encode_frame,
    frame_header,
    store_bin,
)
from service.events import ScanCompleted, ScanLatency, ScanStarted, decode_event


def _frame(index: int, scan_id: str = "s1", topic: str = "slice", rows: int = 64) -> SliceFrame:
    data = np.full((4, 4), index, np.float32)
    header = frame_header(topic, {"scan_id": scan_id, "index": index, "rows": rows}, (4, 4), 1)
    live = encode_frame(header, data)
    return SliceFrame(
        topic=topic,
        scan_id=scan_id,
        index=index,
        rows=rows,
        live=live,
        stored=live,
        meta=dumps({**header, "kind": "meta"}),
        end_to_end=0.01,
    )


# Room for exactly four of the frames above (their lengths differ by a few bytes).
FOUR_FRAMES = 4 * len(_frame(99).live) + len(_frame(99).live) // 2


def _drain(client: ClientQueue) -> list[bytes | str]:
    async def drain() -> list[bytes | str]:
        return [await client.get() for _ in range(client.pending())]

    return asyncio.run(drain())


def _indices(messages: list[bytes | str]) -> list[int]:
    return [decode_frame(m)[0]["index"] for m in messages if isinstance(m, bytes)]


def test_a_slow_browser_drops_its_oldest_slices_and_no_one_elses() -> None:
    hub = Broadcaster("tcp://127.0.0.1:1", max_bytes=FOUR_FRAMES)
    fast, slow = hub.connect(), hub.connect()
    _drain(fast)
    _drain(slow)
    received = []
    hub.on_event(ScanStarted("s1", 64, 4, 10))
    for index in range(20):
        hub.on_frame(_frame(index))
        received += _indices(_drain(fast))  # the fast browser keeps up
    hub.on_event(ScanCompleted("s1", 64, 0, 0, 0, "test", ScanLatency(1.0, 2.0, None)))
    received += _indices(_drain(fast))
    assert received == list(range(20)) and fast.dropped == 0
    backlog = _drain(slow)
    assert _indices(backlog) == [16, 17, 18, 19]  # the newest survive
    assert slow.dropped == 16
    events = [type(decode_event(json.loads(m))) for m in backlog if isinstance(m, str)]
    assert events == [ScanStarted, ScanCompleted]  # events are never dropped


def test_replies_replace_each_other_and_pongs_go_first() -> None:
    hub = Broadcaster("tcp://127.0.0.1:1", max_bytes=1 << 20)
    client = hub.connect()
    _drain(client)
    for index in range(3):
        hub.on_frame(_frame(index))
    hub.handle(client, {"get": 0})
    hub.handle(client, {"get": 1})  # the user moved on before the first reply left
    hub.handle(client, {"ping": 12.5})
    messages = _drain(client)
    assert json.loads(messages[0])["kind"] == "pong" and json.loads(messages[0])["client"] == 12.5
    assert _indices(messages) == [1, 0, 1, 2]  # the reply, then the live slices
    hub.handle(client, {"get": 63})
    assert json.loads(_drain(client)[0]) == {"kind": "missing", "scan_id": "s1", "index": 63}


def test_a_browser_not_following_gets_headers_without_pixels() -> None:
    hub = Broadcaster("tcp://127.0.0.1:1", max_bytes=1 << 20)
    client = hub.connect()
    _drain(client)
    hub.handle(client, {"follow": False})
    hub.on_frame(_frame(5))
    (message,) = _drain(client)
    assert isinstance(message, str) and json.loads(message)["kind"] == "meta"


def test_a_browser_that_joins_late_gets_the_scan_and_its_newest_slice() -> None:
    hub = Broadcaster("tcp://127.0.0.1:1", max_bytes=1 << 20)
    hub.on_publisher(True, {"model": "m"})
    hub.on_event(ScanStarted("s1", 64, 4, 10))
    for index in (0, 1, 2):
        hub.on_frame(_frame(index, topic="recon"))
        hub.on_frame(_frame(index))
    hub.on_frame(_frame(0, scan_id="other"))  # another scan while s1 runs: shown, not kept
    messages = _drain(hub.connect())
    publisher, scan = json.loads(messages[0]), json.loads(messages[1])
    assert publisher["connected"] and scan["scan_id"] == "s1" and scan["status"] == "running"
    assert scan["received"] == {"slice": [0, 1, 2], "recon": [0, 1, 2]}
    assert [decode_frame(m)[0]["topic"] for m in messages[2:] if isinstance(m, bytes)] == [
        "recon",
        "slice",
    ]
    assert _indices(messages[2:]) == [2, 2]


def test_frames_round_trip_bit_exact_and_json_has_no_nan() -> None:
    data = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    for key_length in range(4):  # every padding
        header = {
            "kind": "frame",
            "shape": [5, 7],
            "k": "x" * key_length,
            "timing": {"fbp": float("nan")},
        }
        decoded, pixels = decode_frame(encode_frame(header, data))
        np.testing.assert_array_equal(pixels, data)
        assert decoded["timing"]["fbp"] is None


def test_binning_fits_the_display_and_the_cache() -> None:
    assert display_bin((2048, 2048), 1024) == 2 and display_bin((1000, 1000), 1024) == 1
    image = np.arange(36, dtype=np.float32).reshape(6, 6)
    np.testing.assert_allclose(bin_slice(image, 2), image.reshape(3, 2, 3, 2).mean(axis=(1, 3)))
    assert bin_slice(image, 4).shape == (1, 1)  # the ragged edge is cropped
    budget = 64 << 20
    factor = store_bin(2048, (2048, 2048), 2, budget)
    assert 2048 * 2 * (2048 // factor) ** 2 * 4 <= budget
    assert 2048 * 2 * (2048 // (factor - 1)) ** 2 * 4 > budget
    assert store_bin(8, (64, 64), 2, budget, at_least=3) == 3
    with pytest.raises(ValueError):
        ClientQueue(1, 0)


def test_the_bound_is_in_bytes_so_a_burst_of_small_slices_passes_whole() -> None:
    client = ClientQueue(1, max_bytes=1 << 16)
    burst = [_frame(i).live for i in range(32)]  # two topics of a 16-row batch, small slices
    for message in burst:
        client.put(message, droppable=True)
    assert client.dropped == 0 and _drain(client) == burst
    huge = b"x" * (1 << 17)
    client.put(burst[0], droppable=True)
    client.put(huge, droppable=True)  # bigger than the bound: still shown, the rest go
    assert client.dropped == 1 and _drain(client) == [huge]


def test_previews_reach_the_browsers_but_not_the_slider_store() -> None:
    """Previews go to every browser; the scan kept for the slider holds final slices only, and
    a preview frame's header carries what the page marks it with."""
    hub = Broadcaster("tcp://127.0.0.1:1", max_bytes=1 << 20)
    browser = hub.connect()
    _drain(browser)
    preview = {
        "scan_id": "s1",
        "index": 4,
        "rows": 8,
        "plane": "xy",
        "angles": 60,
        "n_angles": 120,
        "fraction": 0.5,
        "center": 31.5,
        "center_source": "declared",
    }
    header = frame_header("preview", preview, (4, 4), 1)
    assert {k: header[k] for k in preview} == preview
    assert "fraction" not in frame_header("slice", preview, (4, 4), 1)  # slices: as before
    live = encode_frame(header, np.zeros((4, 4), np.float32))
    hub.on_frame(SliceFrame("preview", "s1", 4, 8, live, live, dumps(header), None))
    hub.on_frame(_frame(4, rows=8))
    sent = [decode_frame(m)[0] for m in _drain(browser) if isinstance(m, bytes)]
    assert [(h["topic"], h["index"]) for h in sent] == [("preview", 4), ("slice", 4)]
    assert list(hub.store.frames) == [("slice", 4)]
