"""The web viewer in a real headless browser: simulate -> serve -> `view --web` -> page.

Needs Debian's `chromium` and Playwright (a test dependency; it drives the system browser and
downloads nothing). Without chromium the test is skipped, unless TOMOCAST_REQUIRE_SYSTEM_TOOLS=1
(CI), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
import zmq
from websockets.sync.client import ClientConnection, connect

from service.client import Detector, Subscriber
from service.clients.web.frames import decode_frame
from service.clients.web.server import WebSettings, WebViewer
from service.clients.writers import robust_window, to_uint8
from service.config import load_settings
from service.events import ScanCompleted, ScanFailed, ScanLatency, SliceHeader
from service.metrics import Metrics
from service.publish import Publisher
from service.sim.simulate import simulate_scan
from tests.support.headless import DEBIAN_PACKAGES, find_chromium, launch

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
STATIC = Path(__file__).resolve().parents[2] / "service" / "clients" / "web" / "static"
ROWS, COLS, ANGLES = 8, 64, 90
WAIT_MS = 60_000

pytestmark = pytest.mark.slow


def _missing(what: str) -> NoReturn:
    if os.environ.get("TOMOCAST_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(f"{what} (TOMOCAST_REQUIRE_SYSTEM_TOOLS=1)")
    pytest.skip(what)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless system Chromium with a fresh profile (a Playwright BrowserContext)."""
    executable = find_chromium()
    if executable is None:
        _missing(f"no chromium: apt-get install {DEBIAN_PACKAGES}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        context = launch(playwright, executable, tmp_path / "chromium-profile")
        yield context
        context.close()


def _collect(subscriber: Subscriber) -> tuple[dict[tuple[str, int], np.ndarray], list[int]]:
    """Everything published for one scan: slices by (topic, index), and the denoised slices'
    indices in publication order."""
    published: dict[tuple[str, int], np.ndarray] = {}
    order: list[int] = []
    while True:
        message = subscriber.recv(timeout=120)
        assert message is not None, "the service published nothing for 120 s"
        if message.topic == "event":
            event = message.event()
            assert not isinstance(event, ScanFailed), event
            if isinstance(event, ScanCompleted):
                return published, order
            continue
        assert message.data is not None
        published[(message.topic, message.header["index"])] = message.data.copy()
        if message.topic == "slice":
            order.append(message.header["index"])


def _shown(page: Any, topic: str) -> dict[str, Any]:
    """The pixels of a panel's canvas (its backing store: one pixel per slice pixel)."""
    return page.evaluate(
        """(id) => {
        const canvas = document.getElementById(id);
        const image = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
        return {width: canvas.width, height: canvas.height, rgba: Array.from(image.data),
                index: Number(canvas.dataset.index), low: Number(canvas.dataset.low),
                high: Number(canvas.dataset.high)};
    }""",
        f"canvas-{topic}",
    )


def _wait_shown(page: Any, index: int) -> None:
    page.wait_for_function(
        """(index) => ["recon", "slice"].every(
        (topic) => document.getElementById("canvas-" + topic).dataset.index === String(index))""",
        arg=index,
        timeout=WAIT_MS,
    )


def _colormap(name: str) -> np.ndarray:
    """A colour map as the page ships it: (256, 3) uint8."""
    table = (STATIC / "colormaps.js").read_text()
    match = re.search(rf'{name}: "([0-9a-f]+)"', table)
    assert match is not None, f"no {name} in colormaps.js"
    return np.frombuffer(bytes.fromhex(match.group(1)), np.uint8).reshape(256, 3)


def _assert_matches(
    page: Any,
    topic: str,
    data: np.ndarray,
    window_from: np.ndarray | None,
    window: tuple[float, float] | None = None,
    colormap: str = "gray",
) -> None:
    """The panel shows `data` windowed to the 0.5/99.5 percentiles of `window_from` (the
    denoised slice: both panels share its window by default), or to `window`, in `colormap`."""
    shown = _shown(page, topic)
    assert (shown["height"], shown["width"]) == data.shape
    if window is None:
        assert window_from is not None
        window = robust_window(window_from)
    low, high = window
    np.testing.assert_allclose([shown["low"], shown["high"]], [low, high], rtol=1e-5, atol=1e-7)
    rgb = np.asarray(shown["rgba"], dtype=np.int16).reshape(*data.shape, 4)[..., :3]
    lut = (
        np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        if colormap == "gray"
        else _colormap(colormap)
    )
    levels = to_uint8(data, low, high)
    # Rounding ties may land one level apart (Math.round vs numpy's round-half-even).
    exact = (rgb == lut[levels]).all(axis=-1)
    near = (
        exact
        | (rgb == lut[np.clip(levels.astype(int) - 1, 0, 255)]).all(axis=-1)
        | (rgb == lut[np.clip(levels.astype(int) + 1, 0, 255)]).all(axis=-1)
    )
    assert near.all(), f"{topic}: {(~near).sum()} pixels off the expected colours"
    assert exact.mean() > 0.99


def test_browser_shows_published_slices_and_the_slider_moves_through_the_scan(
    start_service: Callable[..., Any], browser: Any
) -> None:
    _, endpoints = start_service(publish={"recon": True})
    scan = simulate_scan("web-e2e", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=500, seed=3)
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as reference,
        WebViewer(WebSettings(connect=endpoints.publish, port=0)) as viewer,
    ):
        reference.wait_ready()
        pages = [browser.new_page(), browser.new_page()]  # two screens at once
        for page in pages:
            page.goto(viewer.url)
            # The viewer's hub has done its handshake: nothing published from now is missed.
            page.wait_for_function(
                "document.body.dataset.publisher === 'connected'", timeout=WAIT_MS
            )
        with Detector(endpoints.ingest) as detector:
            detector.send_scan(
                scan.start.scan_id, scan.projections, darks=scan.darks, flats=scan.flats, chunk=10
            )
        published, order = _collect(reference)
        assert len(order) == ROWS

        for page in pages:
            page.bring_to_front()  # a background tab does not paint (requestAnimationFrame)
            page.wait_for_function(
                f"""document.body.dataset.status === 'completed'
                && document.body.dataset.received === '{ROWS}'""",
                timeout=WAIT_MS,
            )
            latest = order[-1]  # following: the newest denoised slice
            _wait_shown(page, latest)
            _assert_matches(
                page, "slice", published[("slice", latest)], published[("slice", latest)]
            )
            _assert_matches(
                page, "recon", published[("recon", latest)], published[("slice", latest)]
            )

        page = pages[0]
        page.locator("#slider").focus()
        page.keyboard.press("Home")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        _wait_shown(page, 2)
        assert page.evaluate("document.body.dataset.follow") == "false"
        _assert_matches(page, "slice", published[("slice", 2)], published[("slice", 2)])
        _assert_matches(page, "recon", published[("recon", 2)], published[("slice", 2)])
        assert "8 / 8 slices" in page.locator("#scan-count").inner_text()

        # Manual contrast window and a colour map: redrawn here, without asking the server.
        page.locator("#colormap").select_option("viridis")
        page.locator('input[name="window"][value="manual"]').check()
        page.locator("#w-low").fill("0")
        page.locator("#w-high").fill("0.02")
        page.wait_for_function(
            """["recon", "slice"].every((topic) => {
            const canvas = document.getElementById("canvas-" + topic);
            return canvas.dataset.colormap === "viridis" && canvas.dataset.high === "0.02"; })""",
            timeout=WAIT_MS,
        )
        for topic in ("slice", "recon"):
            _assert_matches(
                page, topic, published[(topic, 2)], None, window=(0.0, 0.02), colormap="viridis"
            )
        assert page.locator("#latency-slice").inner_text().startswith("pipeline ")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_viewer.png"), full_page=True)
        assert page.evaluate("document.getElementById('dropped-count').textContent") == "0"


def _read_until(browser: ClientConnection, kind: str, **fields: Any) -> list[dict[str, Any]]:
    """What a WebSocket client gets up to and including a message of `kind` with `fields`;
    frames as their headers."""
    seen = []
    while True:
        message = browser.recv(timeout=60)
        seen.append(decode_frame(message)[0] if isinstance(message, bytes) else json.loads(message))
        if seen[-1]["kind"] == kind and all(seen[-1].get(k) == v for k, v in fields.items()):
            return seen


def test_a_slow_browser_loses_slices_for_itself_only() -> None:
    """The service's real publisher, the web viewer, and two WebSocket clients: one reads
    everything, one reads nothing. Only the second loses slices, oldest first, counted."""
    context = zmq.Context()
    settings = load_settings(None, {"publish": {"endpoint": "tcp://127.0.0.1:*"}})
    publisher = Publisher(
        settings.publish, context, Metrics(), {"service": "tomocast", "model": "test"}
    )
    publisher.start()
    channel = publisher.channel()
    slices, queue_bytes = 48, 1 << 20  # four slices
    data = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)  # 256 KiB
    try:
        web = WebSettings(connect=publisher.endpoint, port=0, client_queue_bytes=queue_bytes)
        with WebViewer(web) as viewer:
            url = viewer.url.replace("http://", "ws://") + "ws"
            # A small receive buffer, so the slow browser's socket soon stops taking slices; it
            # never reads, so it would not see the server's answer to its close either.
            slow_socket = socket.socket()
            slow_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
            address = urllib.parse.urlsplit(viewer.url)
            slow_socket.connect((address.hostname, address.port))
            with (
                connect(url, max_size=None) as fast,
                connect(url, max_size=None, sock=slow_socket, close_timeout=0) as slow,
            ):
                _read_until(fast, "publisher", connected=True)  # the hub has subscribed
                _read_until(slow, "scan")  # registered; from now on it reads nothing
                got = []
                for index in range(slices):  # in step with the fast browser: it keeps up
                    channel.send_slice(
                        "slice", SliceHeader("fanout", slices, "test", time.time(), index, {}), data
                    )
                    got += _read_until(fast, "frame", index=index)
                done = ScanCompleted("fanout", slices, 0, 0, 0, "test", ScanLatency(0.0, 0.0, None))
                channel.send_event(done)
                got += _read_until(fast, "event", event=done.type)
                with urllib.request.urlopen(viewer.url + "api/status", timeout=30) as reply:
                    status = json.load(reply)
                assert [h["index"] for h in got if h["kind"] == "frame"] == list(range(slices))
                fast_state, slow_state = sorted(status["browsers"], key=lambda b: b["id"])
                assert fast_state["dropped"] == 0
                # What the socket buffers hold is not dropped; the rest beyond the queue is.
                assert slow_state["dropped"] > 0
                assert slow_state["waiting_bytes"] <= queue_bytes
                assert status["scan"]["frames_kept"] == slices  # the slider still has them all
    finally:
        channel.close()
        publisher.stop()
        assert publisher.join(30)
        context.term()
