"""A continuous scan (protocol v1.1) in the web viewer, in a real headless browser: its windows
are grouped under the continuous scan, the newest shown live at the chosen row and labelled
with its projections; the time control steps back to window 0, whose pixels are those the
service published for it; a normal scan afterwards shows as before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service.client import Detector, Subscriber
from service.clients.web.server import WebSettings, WebViewer
from service.sim.simulate import simulate_scan
from tests.e2e.test_web_viewer import WAIT_MS, _assert_matches, _collect
from tests.e2e.test_web_viewer import browser as browser  # its fixture
from tests.integration.test_continuous import EVERY, ROWS, WINDOW, _send_in_step

TURNS = 3
ROW = ROWS // 2  # the row a page shows first: the middle one

pytestmark = pytest.mark.slow  # a browser and a service: a few seconds


def _wait_slice(page: Any, condition: str) -> None:
    """Wait until `condition` (JS, over `c`: the denoised panel's canvas dataset) holds."""
    page.wait_for_function(
        f"""() => {{ const c = document.getElementById("canvas-slice").dataset;
        return {condition}; }}""",
        timeout=WAIT_MS,
    )


def test_the_browser_plays_a_continuous_scans_windows_then_shows_a_normal_scan(
    start_service: Callable[..., Any], browser: Any
) -> None:
    _, endpoints = start_service(
        model={"enabled": False}, preview={"enabled": False}, worker={"fbp_method": "direct"}
    )
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as reference,
        WebViewer(WebSettings(connect=endpoints.publish, port=0)) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        reference.wait_ready()
        page = browser.new_page()
        page.goto(viewer.url)
        page.wait_for_function("document.body.dataset.publisher === 'connected'", timeout=WAIT_MS)

        _, windows, _, _ = _send_in_step(detector, reference, "web-spin", TURNS)
        last = max(windows)
        assert sorted(windows) == list(range(last + 1)) and last >= 8
        page.wait_for_function("document.body.dataset.status === 'completed'", timeout=WAIT_MS)
        _wait_slice(page, f'c.window === "{last}" && c.index === "{ROW}"')
        _assert_matches(page, "slice", windows[last][ROW], windows[last][ROW])
        first = last * EVERY
        label = f"window {last} (projections {first}-{first + WINDOW - 1})"
        assert page.locator("#window-label").inner_text() == label
        assert page.locator("#scan-id").inner_text() == "web-spin"  # not web-spin.w<k>
        assert "continuous" in page.locator("#scan-count").inner_text()

        # a page that joins now gets the newest window, grouped under the continuous scan
        late = browser.new_page()
        late.goto(viewer.url)
        _wait_slice(late, f'c.window === "{last}" && c.index === "{ROW}"')
        _assert_matches(late, "slice", windows[last][ROW], windows[last][ROW])
        assert late.locator("#window-label").inner_text() == label
        late.close()
        page.bring_to_front()  # a background tab does not paint (requestAnimationFrame)

        # one step back with the button, then to the first window with the slider
        page.locator("#window-prev").click()
        _wait_slice(page, f'c.window === "{last - 1}"')
        _assert_matches(page, "slice", windows[last - 1][ROW], windows[last - 1][ROW])
        page.locator("#window-slider").focus()
        page.keyboard.press("Home")
        _wait_slice(page, 'c.window === "0"')
        assert page.evaluate("document.body.dataset.follow") == "false"
        _assert_matches(page, "slice", windows[0][ROW], windows[0][ROW])
        label = f"window 0 (projections 0-{WINDOW - 1})"
        assert page.locator("#window-label").inner_text() == label
        # another row of the same window: asked of the server
        page.locator("#slider").focus()
        page.keyboard.press("Home")
        _wait_slice(page, 'c.window === "0" && c.index === "0"')
        _assert_matches(page, "slice", windows[0][0], windows[0][0])

        # play: from the oldest kept window onwards, one window a step; pause stops it
        page.locator("#window-play").click()
        _wait_slice(page, 'Number(c.window) >= 2 && c.index === "0"')
        page.locator("#window-play").click()
        assert page.locator("#window-play").inner_text() == "play"
        # paused: the panel settles on the window the control is at, with its pixels
        _wait_slice(page, "c.window === document.body.dataset.window")
        k = int(page.evaluate("document.body.dataset.window"))
        assert 2 <= k <= last
        _assert_matches(page, "slice", windows[k][0], windows[k][0])

        # a normal scan afterwards: as before, and the time control goes away
        page.locator("#follow").check()
        scan = simulate_scan("web-plain", rows=4, cols=32, n_angles=40, photons=500, seed=3)
        detector.send_scan(
            scan.start.scan_id, scan.projections, darks=scan.darks, flats=scan.flats, chunk=10
        )
        published, order = _collect(reference)
        page.wait_for_function(
            """document.body.dataset.scan === 'web-plain'
            && document.body.dataset.status === 'completed'
            && document.body.dataset.received === '4'""",
            timeout=WAIT_MS,
        )
        _wait_slice(page, f'c.window === undefined && c.index === "{order[-1]}"')
        final = published[("slice", order[-1])]
        _assert_matches(page, "slice", final, final)
        assert page.locator("#window-row").is_hidden()
        assert "4 / 4 slices" in page.locator("#scan-count").inner_text()
