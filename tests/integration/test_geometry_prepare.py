"""A scan's FBP geometry is built when the scan starts, not after its last projection: through a
real service over loopback TCP, with the real gridding reconstructor."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from service.app import Service
from service.client import Detector, Published, Subscriber
from service.events import ScanCompleted, ScanEnded, ScanFailed
from service.protocol import ScanStart
from tests.support.helpers import GatedGridding, wait_for
from workers.geometry_cache import geometry_key
from workers.gridding import GriddingFBP
from workers.rows import theta_tensor

ROWS, COLS, ANGLES = 4, 64, 96
rng = np.random.default_rng(17)
FLATS = np.full((1, ROWS, COLS), 4100, np.uint16)
PROJECTIONS = (rng.poisson(2000, (ANGLES, ROWS, COLS)) + 100).astype(np.uint16)


def metric(service: Service, name: str, labels: dict[str, str] | None = None) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, name
    return value


def until_ended(viewer: Subscriber) -> list[Published]:
    messages: list[Published] = []
    while True:
        message = viewer.recv(timeout=60.0)
        assert message is not None, "nothing published for 60 s"
        messages.append(message)
        if isinstance(message.event(), ScanEnded):
            return messages


def slices(messages: list[Published]) -> list[int]:
    return sorted(m.header["index"] for m in messages if m.topic == "slice")


def key(start: ScanStart) -> tuple[int, float, bytes]:
    """`start`'s geometry's key in the reconstructor's cache, angles as the worker hands them."""
    theta = theta_tensor(start.theta_array())
    return geometry_key(theta.to(torch.float64).numpy(), start.rotation_center(), start.cols)


def send_data(detector: Detector, scan_id: str) -> None:
    detector.send_frames("flat", scan_id, 0, FLATS)
    for first in range(0, ANGLES, 16):
        detector.send_frames("projections", scan_id, first, PROJECTIONS[first : first + 16])
    detector.end_scan(scan_id, ANGLES)


def test_the_geometry_is_built_before_the_data_arrive_and_not_again(
    start_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.prepare")
    service, endpoints = start_service(worker={"fbp_method": "gridding"}, model={"enabled": False})
    reconstructor = service.worker.reconstructor
    assert isinstance(reconstructor, GriddingFBP)
    builds = reconstructor.geometries.builds  # the service's warm-up built one
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        # scan_start and nothing else yet: the geometry must come from it alone
        start = detector.start_scan(
            "early", ROWS, COLS, ANGLES, "uint16", center=COLS / 2 + 0.5, n_flat=1
        )
        wait_for(
            "the geometry prepared at scan_start", lambda: key(start) in reconstructor.geometries
        )
        assert reconstructor.geometries.builds == builds + 1
        assert "scan_id=early seq=0 geometry prepared: 96 angles x 64 cols" in caplog.text
        send_data(detector, "early")
        messages = until_ended(viewer)
        # the next scan of the same geometry: found cached, nothing built at all
        detector.start_scan("again", ROWS, COLS, ANGLES, "uint16", center=COLS / 2 + 0.5, n_flat=1)
        send_data(detector, "again")
        again = until_ended(viewer)
    assert isinstance(messages[-1].event(), ScanCompleted)
    assert isinstance(again[-1].event(), ScanCompleted)
    assert slices(messages) == slices(again) == list(range(ROWS))
    assert reconstructor.geometries.builds == builds + 1  # the worker found it, built nothing
    assert metric(service, "tomocast_errors_total", {"stage": "prepare"}) == 0
    wait_for(
        "the second prepare to be counted",
        lambda: metric(service, "tomocast_geometry_prepares_total", {"outcome": "cached"}) == 1,
    )
    assert metric(service, "tomocast_geometry_prepares_total", {"outcome": "built"}) == 1


class FailsToPrepare(GriddingFBP):
    """The real gridding FBP whose ahead-of-time build always fails (a stand-in for running
    out of memory while the worker holds another scan's matrices)."""

    def prepare(self, theta: torch.Tensor, center: float, cols: int) -> bool:
        raise RuntimeError("simulated out of memory")


def test_a_failed_prepare_is_counted_and_the_worker_builds_as_before(start_service: Any) -> None:
    reconstructor = FailsToPrepare("cpu")
    service, endpoints = start_service(reconstructor=reconstructor, model={"enabled": False})
    builds = reconstructor.geometries.builds
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        # a declared centre: an estimated one is not prepared ahead (it comes from the data)
        detector.send_scan("unprepared", PROJECTIONS, flats=FLATS, chunk=16, center=COLS / 2)
        messages = until_ended(viewer)
        wait_for(
            "the failed prepare to be counted",
            lambda: metric(service, "tomocast_errors_total", {"stage": "prepare"}) == 1,
        )
    assert isinstance(messages[-1].event(), ScanCompleted)
    assert slices(messages) == list(range(ROWS))
    assert reconstructor.geometries.builds == builds + 1  # built by the worker instead
    assert metric(service, "tomocast_errors_total", {"stage": "worker"}) == 0
    assert metric(service, "tomocast_geometry_prepares_total", {"outcome": "failed"}) == 1


def test_prepare_can_be_turned_off(start_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.prepare")
    service, endpoints = start_service(
        worker={"fbp_method": "gridding", "prepare_geometry": False}, model={"enabled": False}
    )
    assert service.preparer is None
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        detector.send_scan("late", PROJECTIONS, flats=FLATS, chunk=16)
        messages = until_ended(viewer)
    assert slices(messages) == list(range(ROWS))
    assert "geometry prepared" not in caplog.text


FAILING_CENTER = COLS / 2 - 1.5


class FailsAfterFBP(GriddingFBP):
    """The real gridding FBP, except that a scan at `FAILING_CENTER` fails in the worker after
    its geometry was fetched (a stand-in for a device fault in the scan's first batch)."""

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        slices = super().reconstruct(sinograms, theta, center)
        if center == FAILING_CENTER:
            raise RuntimeError("simulated device fault")
        return slices


def test_prepared_geometries_evict_finished_ones_not_each_other(start_service: Any) -> None:
    """The gridding cache holds two geometries. Two scans start, both are prepared, then their
    data arrive: the warm-up's geometry, and that of the scan before (completed or failed),
    must make room for them rather than the first one's."""
    reconstructor = FailsAfterFBP("cpu")
    service, endpoints = start_service(reconstructor=reconstructor, model={"enabled": False})
    builds = reconstructor.geometries.builds  # the warm-up's
    pairs = (
        (COLS / 2 + 0.5, FAILING_CENTER),  # after the warm-up; the second fails ...
        (COLS / 2 + 1.5, COLS / 2 + 2.5),  # ... then after a failed scan ...
        (COLS / 2 + 3.5, COLS / 2 + 4.5),
    )  # ... and after a completed one
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        for centers in pairs:
            starts = [
                detector.start_scan(
                    f"at-{center}", ROWS, COLS, ANGLES, "uint16", center=center, n_flat=1
                )
                for center in centers
            ]
            wait_for(
                "both geometries prepared",
                lambda since=builds: reconstructor.geometries.builds == since + 2,
            )
            assert all(key(start) in reconstructor.geometries for start in starts)
            for start in starts:
                send_data(detector, start.scan_id)
            ended = [type(until_ended(viewer)[-1].event()) for _ in starts]
            assert ended == [
                ScanFailed if center == FAILING_CENTER else ScanCompleted for center in centers
            ]
            builds += 2
            assert reconstructor.geometries.builds == builds  # the worker built none
    assert metric(service, "tomocast_errors_total", {"stage": "worker"}) == 1


def test_a_scan_that_fails_before_its_turn_is_not_prepared(start_service: Any) -> None:
    busy, doomed, after = COLS / 2 + 0.5, COLS / 2 + 1.5, COLS / 2 + 2.5
    reconstructor = GatedGridding(held={busy})
    service, endpoints = start_service(reconstructor=reconstructor, model={"enabled": False})
    built = len(reconstructor.built)  # the warm-up's
    reconstructor.gate.clear()
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        detector.start_scan("busy", ROWS, COLS, ANGLES, "uint16", center=busy, n_flat=1)
        wait_for("the busy scan's build to start", lambda: busy in reconstructor.built)
        detector.start_scan("doomed", ROWS, COLS, ANGLES, "uint16", center=doomed, n_flat=1)
        detector.end_scan("doomed", 0)  # no flats, no projections: it fails now
        assert isinstance(until_ended(viewer)[-1].event(), ScanFailed)
        start = detector.start_scan("after", ROWS, COLS, ANGLES, "uint16", center=after, n_flat=1)
        reconstructor.gate.set()
        wait_for("the next scan's geometry", lambda: key(start) in reconstructor.geometries)
    assert reconstructor.built[built:] == [busy, after]
    assert metric(service, "tomocast_errors_total", {"stage": "prepare"}) == 0
    assert {
        outcome: metric(service, "tomocast_geometry_prepares_total", {"outcome": outcome})
        for outcome in ("built", "cancelled")
    } == {"built": 2, "cancelled": 1}
