"""Previews during a scan and the live centre, over real loopback sockets: DAQ -> service ->
viewer, and POST /scans/{scan_id}/center on the metrics port."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from service.client import Detector, Published, Subscriber
from service.events import PreviewHeader, ScanCompleted, ScanEnded
from service.sim.simulate import SimulatedScan, simulate_scan
from tests.support.helpers import in_thread
from workers.recon import recon

ROWS, COLS, ANGLES, CHUNK = 8, 64, 120, 10
CENTER = 31.5
PREVIEWED = (2, 4, 6)  # the middle row and those a quarter from each end, of 8
SETTINGS: dict[str, Any] = {
    "model": {"enabled": False},
    "worker": {"fbp_method": "direct"},
    "preview": {"rate_hz": 10.0},
}


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan(
        "pv-scan",
        rows=ROWS,
        cols=COLS,
        n_angles=ANGLES,
        photons=4000.0,
        n_dark=2,
        n_flat=3,
        seed=5,
        center=CENTER,
    )


def line_integrals(scan: SimulatedScan) -> np.ndarray:
    """Flat-field correction written independently of the service, in float64 numpy."""
    dark = scan.darks.astype(np.float64).mean(axis=0)
    flat = scan.flats.astype(np.float64).mean(axis=0)
    ratio = (scan.projections.astype(np.float64) - dark) / (flat - dark)
    return (-np.log(np.clip(ratio, 1e-6, None))).astype(np.float32)


def send_paced(
    detector: Detector, scan: SimulatedScan, scan_id: str, stop: int, first: int = 0, **start: Any
) -> None:
    """Projections [first, stop) in chunks of CHUNK, 20 ms apart (a detector's pace, not
    synchronisation); from 0: scan_start and the references first."""
    if first == 0:
        detector.start_scan(scan_id, ROWS, COLS, ANGLES, "uint16", n_dark=2, n_flat=3, **start)
        detector.send_frames("dark", scan_id, 0, scan.darks)
        detector.send_frames("flat", scan_id, 0, scan.flats)
    pace = threading.Event()
    for index in range(first, stop, CHUNK):
        detector.send_frames("projections", scan_id, index, scan.projections[index : index + CHUNK])
        pace.wait(0.02)


def receive(viewer: Subscriber, until: Any, timeout: float = 60.0) -> list[Published]:
    """Messages until `until(message)` holds (that one included)."""
    got: list[Published] = []
    deadline = time.monotonic() + timeout
    while True:
        message = viewer.recv(timeout=max(0.0, deadline - time.monotonic()))
        assert message is not None, "the service went quiet"
        got.append(message)
        if until(message):
            return got


def is_preview(message: Published, angles: int | None = None, center: float | None = None) -> bool:
    if message.topic != "preview":
        return False
    header = PreviewHeader.decode(message.header)
    return (angles is None or header.angles == angles) and (
        center is None or header.center == center
    )


def post_center(port: int, scan_id: str, body: bytes, method: str = "POST") -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/scans/{scan_id}/center", data=body, method=method
    )
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def final_slices(messages: list[Published]) -> dict[int, np.ndarray]:
    return {m.header["index"]: m.data for m in messages if m.topic == "slice"}  # type: ignore[misc]


def test_previews_grow_before_scan_end_and_the_last_is_the_final_slice(
    start_service: Any, scan: SimulatedScan
) -> None:
    service, endpoints = start_service(**SETTINGS)
    with (
        Subscriber(endpoints.publish, ("slice", "event", "preview")) as viewer,
        Subscriber(endpoints.publish, ("slice", "event")) as plain,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        plain.wait_ready()
        sender, result = in_thread(
            lambda: send_paced(detector, scan, "pv-scan", ANGLES, center=CENTER)
        )
        # every angle in: wait for the rows' complete previews before ending the scan
        before = receive(viewer, lambda m: is_preview(m, ANGLES) and m.header["index"] == 6)
        sender.join(30)
        assert result == [None], result
        detector.end_scan("pv-scan", ANGLES)
        after = receive(viewer, lambda m: isinstance(m.event(), ScanEnded))
        seen_plain = receive(plain, lambda m: isinstance(m.event(), ScanEnded))

    previews = [PreviewHeader.decode(m.header) for m in before if m.topic == "preview"]
    assert not any(m.topic == "slice" for m in before)
    assert {p.index for p in previews} == set(PREVIEWED)
    middle = [p for p in previews if p.index == ROWS // 2]
    assert len(middle) >= 2, "one preview only: nothing was shown while the scan arrived"
    assert [p.angles for p in middle] == sorted({p.angles for p in middle})  # growing
    assert middle[0].angles < ANGLES and middle[-1].fraction == 1.0
    assert all(p.center == CENTER and p.center_source == "declared" for p in previews)
    assert all(p.n_angles == ANGLES and p.rows == ROWS for p in previews)

    # a partial preview is the FBP of the angles received so far (they arrive in order)
    reference = line_integrals(scan)
    partial = next(m for m in before if is_preview(m) and m.header["angles"] < ANGLES)
    header = PreviewHeader.decode(partial.header)
    offline = recon(
        reference[: header.angles],
        scan.start.theta_array()[: header.angles],
        center=CENTER,
        device="cpu",
        method="direct",
    )[header.index]
    scale = float(np.abs(offline).max())
    np.testing.assert_allclose(partial.data, offline, rtol=0, atol=1e-4 * scale)

    # with every angle, the last preview of a row is that row's final slice
    final = final_slices(after)
    assert sorted(final) == list(range(ROWS))
    completed = after[-1].event()
    assert isinstance(completed, ScanCompleted) and completed.center == CENTER
    for message in before:
        if is_preview(message, ANGLES):
            row = message.header["index"]
            scale = float(np.abs(final[row]).max())
            np.testing.assert_allclose(message.data, final[row], rtol=0, atol=1e-5 * scale)
    assert not any(m.topic == "preview" for m in after), "a preview after the final slices"
    # a viewer that did not subscribe to previews sees what it always saw
    assert {m.topic for m in seen_plain} == {"slice", "event"}
    published = service.metrics.registry.get_sample_value("tomocast_previews_published_total")
    assert published is not None and published >= 2 * len(PREVIEWED)


def test_a_live_centre_reaches_the_previews_within_a_second_and_the_final_slices(
    start_service: Any, scan: SimulatedScan
) -> None:
    service, endpoints = start_service(**SETTINGS)
    port, moved = endpoints.metrics_port, CENTER + 1.5
    with (
        Subscriber(endpoints.publish, ("slice", "event", "preview")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        send_paced(detector, scan, "pv-live", ANGLES // 2, center=CENTER)
        receive(viewer, lambda m: is_preview(m, ANGLES // 2))
        for body, status in (
            (b'{"center": "31"}', 400),
            (b'{"center": NaN}', 400),
            (b'{"center": 65}', 400),
            (b"31.5", 400),
            (b"not json", 400),
        ):
            assert post_center(port, "pv-live", body)[0] == status, body
        assert post_center(port, "no-such-scan", b'{"center": 30}')[0] == 404
        assert post_center(port, "pv-live", b"", method="GET")[0] == 405

        t0 = time.monotonic()
        status, answer = post_center(port, "pv-live", json.dumps({"center": moved}).encode())
        assert status == 200 and answer == {
            "scan_id": "pv-live",
            "center": moved,
            "previous": CENTER,
        }
        rerendered = receive(viewer, lambda m: is_preview(m, center=moved), timeout=5.0)
        assert time.monotonic() - t0 <= 1.0
        header = PreviewHeader.decode(rerendered[-1].header)
        assert header.center_source == "operator" and header.angles == ANGLES // 2

        send_paced(detector, scan, "pv-live", ANGLES, first=ANGLES // 2)
        detector.end_scan("pv-live", ANGLES)
        after = receive(viewer, lambda m: isinstance(m.event(), ScanEnded))
        # the scan ended: its centre can no longer change
        assert post_center(port, "pv-live", b'{"center": 30}')[0] == 404

    completed = after[-1].event()
    assert isinstance(completed, ScanCompleted)
    assert completed.center == moved
    offline = recon(
        line_integrals(scan), scan.start.theta_array(), center=moved, device="cpu", method="direct"
    )
    final = final_slices(after)
    scale = float(np.abs(offline).max())
    for row in range(ROWS):
        np.testing.assert_allclose(final[row], offline[row], rtol=0, atol=1e-4 * scale)
    registry = service.metrics.registry
    assert registry.get_sample_value("tomocast_center_changes_total", {"outcome": "accepted"}) == 1
    assert registry.get_sample_value("tomocast_center_changes_total", {"outcome": "rejected"}) >= 4


def test_without_a_declared_centre_previews_use_the_middle_then_the_previous_scans(
    start_service: Any, scan: SimulatedScan
) -> None:
    """Until a scan's angles span [0, 180) its previews use cols/2, then the previous scan's
    centre; once they do (before scan_end) the centre estimated from them, which the final
    slices use too (issue 15: the centre as soon as enough projections are in)."""
    _, endpoints = start_service(**SETTINGS)
    half = ANGLES // 2
    with (
        Subscriber(endpoints.publish, ("event", "preview")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        centers, estimates, completions = [], [], []
        for scan_id in ("pv-a", "pv-b"):
            send_paced(detector, scan, scan_id, half)
            got = receive(viewer, lambda m: is_preview(m, half) and m.header["index"] == 6)
            centers.append(PreviewHeader.decode(got[-1].header))
            send_paced(detector, scan, scan_id, ANGLES, first=half)
            got = receive(viewer, lambda m: is_preview(m, ANGLES) and m.header["index"] == 6)
            estimates.append(PreviewHeader.decode(got[-1].header))
            detector.end_scan(scan_id, ANGLES)
            done = receive(viewer, lambda m: isinstance(m.event(), ScanEnded))
            completed = done[-1].event()
            assert isinstance(completed, ScanCompleted)
            assert completed.center_source == "estimated"
            completions.append(completed)
    assert (centers[0].center, centers[0].center_source) == (COLS / 2, "default")
    assert centers[1].center_source == "previous"
    assert math.isclose(centers[1].center, completions[0].center)
    for estimate, completed in zip(estimates, completions, strict=True):
        assert estimate.center_source == "estimated"
        assert abs(estimate.center - CENTER) <= 0.25  # issue 15's accuracy
        assert math.isclose(estimate.center, completed.center)  # not estimated again
