"""Previews in the web viewer, in a real headless browser (`view --web --previews`): while a
scan arrives the denoised panel shows the preview of the middle row, marked as a preview with
its fraction of angles, and an XZ panel the vertical cut; at scan_end the panel switches to the
final slice. A web viewer started without --previews gets no preview at all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from websockets.sync.client import connect

from service.client import Detector, Published, Subscriber
from service.clients.web.server import WebSettings, WebViewer
from service.events import ScanCompleted
from service.sim.simulate import simulate_scan
from tests.e2e.test_web_viewer import WAIT_MS, _assert_matches, _read_until, _shown
from tests.e2e.test_web_viewer import browser as browser  # its fixture
from tests.integration.test_preview import CENTER, is_preview, receive, send_paced

ROWS, COLS, ANGLES = 8, 64, 120  # as tests.integration.test_preview's scan (send_paced)
HALF = ANGLES // 2
MIDDLE = ROWS // 2

pytestmark = pytest.mark.slow  # a browser and a service: about 9 s


def _wait_canvas(page: Any, topic: str, condition: str) -> None:
    """Wait until `condition` (JS, over `c`: the panel's canvas dataset) holds."""
    page.wait_for_function(
        f"""() => {{ const c = document.getElementById("canvas-{topic}").dataset;
        return {condition}; }}""",
        timeout=WAIT_MS,
    )


def _latest(messages: list[Published], plane: str, angles: int, index: int | None = None) -> Any:
    found = [
        m
        for m in messages
        if is_preview(m, angles)
        and m.header["plane"] == plane
        and (index is None or m.header["index"] == index)
    ]
    assert found, f"no {plane} preview with {angles} angles"
    return found[-1].data


def test_the_browser_shows_previews_live_then_the_final_slices(
    start_service: Callable[..., Any], browser: Any
) -> None:
    _, endpoints = start_service(
        model={"enabled": False},
        worker={"fbp_method": "direct"},
        preview={"rate_hz": 10.0, "rows": list(range(ROWS))},  # every row: the XZ cut too
    )
    scan = simulate_scan(
        "web-pv",
        rows=ROWS,
        cols=COLS,
        n_angles=ANGLES,
        photons=4000.0,
        n_dark=2,
        n_flat=3,
        seed=5,
        center=CENTER,
    )
    with (
        Subscriber(endpoints.publish, ("slice", "event", "preview")) as reference,
        WebViewer(WebSettings(connect=endpoints.publish, port=0, previews=True)) as viewer,
        WebViewer(WebSettings(connect=endpoints.publish, port=0)) as plain,
        connect(plain.url.replace("http://", "ws://") + "ws", max_size=None) as plain_socket,
        Detector(endpoints.ingest) as detector,
    ):
        reference.wait_ready()
        _read_until(plain_socket, "publisher", connected=True)  # its hub has subscribed
        page = browser.new_page()
        page.goto(viewer.url)
        page.wait_for_function("document.body.dataset.publisher === 'connected'", timeout=WAIT_MS)

        # half the angles, then the detector pauses: the page shows them as a preview
        send_paced(detector, scan, "web-pv", HALF, center=CENTER)
        _wait_canvas(page, "slice", f'c.preview === "true" && c.angles === "{HALF}"')
        _wait_canvas(page, "xz", f'c.preview === "true" && c.angles === "{HALF}"')
        published = receive(reference, lambda m: is_preview(m, HALF) and m.header["plane"] == "xz")
        shown = _shown(page, "slice")
        assert shown["index"] == MIDDLE  # following: the previewed row nearest the middle
        row = _latest(published, "xy", HALF, MIDDLE)
        _assert_matches(page, "slice", row, row)
        vertical = _latest(published, "xz", HALF)
        assert vertical.shape == (ROWS, COLS)
        _assert_matches(page, "xz", vertical, vertical)
        assert page.locator("#title-slice").inner_text() == "preview (plain FBP)"
        assert "preview · 50% of angles (60 / 120)" in page.locator("#caption-slice").inner_text()
        assert "preview 50% of angles" in page.locator("#scan-status").inner_text()
        assert page.evaluate("document.body.dataset.received") == "0"

        # the rest and scan_end: the final slices replace the preview
        send_paced(detector, scan, "web-pv", ANGLES, first=HALF)
        detector.end_scan("web-pv", ANGLES)
        after = receive(reference, lambda m: isinstance(m.event(), ScanCompleted))
        final = {m.header["index"]: m.data for m in after if m.topic == "slice"}
        order = [m.header["index"] for m in after if m.topic == "slice"]
        assert sorted(final) == list(range(ROWS))
        page.wait_for_function(
            f"""document.body.dataset.status === 'completed'
            && document.body.dataset.received === '{ROWS}'""",
            timeout=WAIT_MS,
        )
        _wait_canvas(page, "slice", f'c.preview === undefined && c.index === "{order[-1]}"')
        _assert_matches(page, "slice", final[order[-1]], final[order[-1]])
        assert page.locator("#title-slice").inner_text() == "denoised"
        assert "preview" not in page.locator("#caption-slice").inner_text()
        assert page.locator("#scan-status").inner_text() == "completed"

        # the viewer without --previews: the same scan, not one preview
        seen = _read_until(plain_socket, "event", event="scan_completed", scan_id="web-pv")
    frames = [m for m in seen if m["kind"] in ("frame", "meta")]
    assert {m["topic"] for m in frames} == {"slice"}
    assert sorted(m["index"] for m in frames) == list(range(ROWS))
