"""Incremental reconstruction over real loopback sockets: a scan's blocks of angles are folded
in while it arrives, and its final slices equal the service's own end-of-scan slices of the same
data and an offline `workers.recon.recon` (denoiser off)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.client import Detector, Published, Subscriber
from service.events import PreviewHeader, ScanCompleted, ScanEnded
from service.sim.simulate import SimulatedScan, simulate_scan
from tests.integration.test_preview import is_preview, line_integrals, receive, send_paced
from tests.support.helpers import in_thread, wait_for
from workers.gridding import GriddingFBP
from workers.recon import recon

ROWS, COLS, ANGLES, CHUNK, BLOCK = 8, 64, 120, 10, 16
CENTER = 31.5
BLOCKS = -(-ANGLES // BLOCK)


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan(
        "inc", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=4000.0, n_dark=2, n_flat=3, seed=7
    )


def _until_end(viewer: Subscriber, scan_id: str) -> tuple[dict[int, np.ndarray], ScanEnded]:
    slices: dict[int, np.ndarray] = {}
    while True:
        message: Published | None = viewer.recv(timeout=60.0)
        assert message is not None, "the service went quiet"
        event = message.event()
        if event is not None and event.scan_id == scan_id and isinstance(event, ScanEnded):
            return slices, event
        if message.topic == "slice" and message.header["scan_id"] == scan_id:
            slices[message.header["index"]] = message.data  # type: ignore[assignment]


def _blocks(service: Any, where: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "tomocast_incremental_blocks_total", {"where": where}
    )
    return float(value or 0.0)


def _scans(service: Any, path: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "tomocast_incremental_scans_total", {"path": path}
    )
    return float(value or 0.0)


@pytest.mark.parametrize(
    ("method", "rows_kept"),
    [("direct", ROWS), ("gridding", ROWS), ("gridding", 4), ("direct", 3)],
)
def test_incremental_slices_equal_the_end_of_scan_path_and_offline_recon(
    start_service: Any, scan: SimulatedScan, method: str, rows_kept: int
) -> None:
    grid = GriddingFBP().grid_size(COLS) if method == "gridding" else COLS
    service, endpoints = start_service(
        model={"enabled": False},
        preview={"enabled": False},
        worker={"fbp_method": method, "batch_rows": 3},
        incremental={"enabled": True, "block_angles": BLOCK, "max_bytes": 4 * grid**2 * rows_kept},
    )
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        # scan A: references first, then the projections; blocks fold in as they arrive
        detector.start_scan("a", ROWS, COLS, ANGLES, "uint16", n_dark=2, n_flat=3, center=CENTER)
        detector.send_frames("dark", "a", 0, scan.darks)
        detector.send_frames("flat", "a", 0, scan.flats)
        for index in range(0, ANGLES, CHUNK):
            detector.send_frames("projections", "a", index, scan.projections[index : index + CHUNK])
        # every block was folded in before the scan ended: nothing is left for scan_end
        wait_for("blocks folded in on arrival", lambda: _blocks(service, "arrival") == BLOCKS)
        detector.end_scan("a", ANGLES)
        incremental, completed = _until_end(viewer, "a")
        # scan B, the same data: projections before the references, so the end-of-scan path
        detector.start_scan("b", ROWS, COLS, ANGLES, "uint16", n_dark=2, n_flat=3, center=CENTER)
        detector.send_frames("projections", "b", 0, scan.projections)
        detector.send_frames("dark", "b", 0, scan.darks)
        detector.send_frames("flat", "b", 0, scan.flats)
        detector.end_scan("b", ANGLES)
        end_of_scan, completed_b = _until_end(viewer, "b")

    assert isinstance(completed, ScanCompleted) and isinstance(completed_b, ScanCompleted)
    assert sorted(incremental) == sorted(end_of_scan) == list(range(ROWS))
    assert _scans(service, "incremental") == 1 and _scans(service, "end_of_scan") == 1
    assert _blocks(service, "scan_end") == 0
    offline = recon(
        line_integrals(scan), scan.start.theta_array(), center=CENTER, device="cpu", method=method
    )
    scale = float(np.abs(offline).max())
    for row in range(ROWS):
        np.testing.assert_allclose(incremental[row], end_of_scan[row], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(incremental[row], offline[row], rtol=0, atol=1e-4 * scale)


def test_a_burst_leaves_the_remainder_to_scan_end_with_the_same_slices(
    start_service: Any, scan: SimulatedScan
) -> None:
    """A scan sent in one go completes before the incremental thread catches up: the loop
    folds in what is left, and the slices are still the offline FBP's."""
    service, endpoints = start_service(
        model={"enabled": False},
        preview={"enabled": False},
        worker={"fbp_method": "direct"},
        incremental={"enabled": True, "block_angles": 8},
    )
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan(
            "burst", scan.projections, darks=scan.darks, flats=scan.flats, center=CENTER
        )
        slices, completed = _until_end(viewer, "burst")
    assert isinstance(completed, ScanCompleted)
    assert _scans(service, "incremental") == 1
    assert _blocks(service, "arrival") + _blocks(service, "scan_end") == -(-ANGLES // 8)
    offline = recon(
        line_integrals(scan), scan.start.theta_array(), center=CENTER, device="cpu", method="direct"
    )
    scale = float(np.abs(offline).max())
    for row in range(ROWS):
        np.testing.assert_allclose(slices[row], offline[row], rtol=0, atol=1e-4 * scale)


def test_scans_whose_centre_is_estimated_or_that_miss_projections_take_the_end_of_scan_path(
    start_service: Any, scan: SimulatedScan
) -> None:
    service, endpoints = start_service(
        model={"enabled": False},
        preview={"enabled": False},
        worker={"fbp_method": "direct"},
        incremental={"enabled": True, "block_angles": BLOCK},
    )
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        # no centre declared, preprocess.center = auto: estimated at the end, so not incremental
        detector.send_scan("auto", scan.projections, darks=scan.darks, flats=scan.flats)
        slices, completed = _until_end(viewer, "auto")
        assert isinstance(completed, ScanCompleted) and len(slices) == ROWS
        assert _scans(service, "end_of_scan") == 1 and _scans(service, "incremental") == 0
        # a projection never sent: the angle weights are not the folded-in ones
        detector.start_scan("gap", ROWS, COLS, ANGLES, "uint16", n_dark=2, n_flat=3, center=CENTER)
        detector.send_frames("dark", "gap", 0, scan.darks)
        detector.send_frames("flat", "gap", 0, scan.flats)
        detector.send_frames("projections", "gap", 0, scan.projections[: ANGLES - 1])
        detector.end_scan("gap", ANGLES - 1)
        slices, completed = _until_end(viewer, "gap")
    assert isinstance(completed, ScanCompleted) and completed.missing_projections == 1
    assert _scans(service, "end_of_scan") == 2 and _scans(service, "incremental") == 0
    kept = line_integrals(scan)[: ANGLES - 1]
    offline = recon(
        kept, scan.start.theta_array()[: ANGLES - 1], center=CENTER, device="cpu", method="direct"
    )
    scale = float(np.abs(offline).max())
    for row in range(ROWS):
        np.testing.assert_allclose(slices[row], offline[row], rtol=0, atol=1e-4 * scale)
    held = service.metrics.registry.get_sample_value("tomocast_incremental_bytes")
    assert held == 0  # every scan's accumulators were given back


def test_previews_of_an_incremental_scan_come_from_its_accumulators(
    start_service: Any, scan: SimulatedScan
) -> None:
    """Previews read the angles folded in so far: a partial one is the FBP of those angles
    (they arrive in order), one with every block is the row's final slice."""
    _, endpoints = start_service(
        model={"enabled": False},
        preview={"rate_hz": 20.0},
        worker={"fbp_method": "direct"},
        incremental={"enabled": True, "block_angles": BLOCK},
    )
    with (
        Subscriber(endpoints.publish, ("slice", "event", "preview")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        sender, result = in_thread(lambda: send_paced(detector, scan, "pv", ANGLES, center=CENTER))
        before = receive(viewer, lambda m: is_preview(m, ANGLES) and m.header["index"] == 6)
        sender.join(30)
        assert result == [None], result
        detector.end_scan("pv", ANGLES)
        final, completed = _until_end(viewer, "pv")
    assert isinstance(completed, ScanCompleted)
    previews = [m for m in before if m.topic == "preview" and m.header["plane"] == "xy"]
    # from the accumulators: only whole blocks (or every angle) are ever shown
    assert all(m.header["angles"] % BLOCK == 0 or m.header["angles"] == ANGLES for m in previews)
    reference = line_integrals(scan)
    partial = [m for m in previews if m.header["angles"] <= ANGLES // 2]
    assert partial, "no preview while the scan arrived"
    header = PreviewHeader.decode(partial[0].header)
    offline = recon(
        reference[: header.angles],
        scan.start.theta_array()[: header.angles],
        center=CENTER,
        device="cpu",
        method="direct",
    )[header.index]
    scale = float(np.abs(offline).max())
    np.testing.assert_allclose(partial[0].data, offline, rtol=0, atol=1e-4 * scale)
    for message in previews:
        if message.header["angles"] == ANGLES:
            row = message.header["index"]
            scale = float(np.abs(final[row]).max())
            np.testing.assert_allclose(message.data, final[row], rtol=0, atol=1e-5 * scale)
