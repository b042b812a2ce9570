"""A scan's FBP geometry is built when the scan starts, not after its last projection: through a
real service over loopback TCP, with the real gridding reconstructor."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from service.client import Detector, Published, Subscriber
from service.pipeline import Service
from service.worker import theta_tensor
from tests.unit.test_geometry_cache import wait_for
from workers.geometry_cache import geometry_key
from workers.gridding import GriddingFBP

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
        if message.topic == "event" and message.header["event"] in ("scan_completed",
                                                                    "scan_failed"):
            return messages


def slices(messages: list[Published]) -> list[int]:
    return sorted(m.header["index"] for m in messages if m.topic == "slice")


def test_the_geometry_is_built_before_the_data_arrive_and_not_again(
        start_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.prepare")
    service, endpoints = start_service(worker={"fbp_method": "gridding"},
                                       model={"enabled": False})
    reconstructor = service.worker.reconstructor
    assert isinstance(reconstructor, GriddingFBP)
    builds = reconstructor.geometries.builds  # the service's warm-up built one
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        # scan_start and nothing else yet: the geometry must come from it alone
        start = detector.start_scan("early", ROWS, COLS, ANGLES, "uint16",
                                    center=COLS / 2 + 0.5, n_flat=1)
        theta = theta_tensor(start.theta_array(), torch.device("cpu"))  # as the worker will
        key = geometry_key(theta.to(torch.float64).numpy(), start.rotation_center(), COLS)
        wait_for("the geometry prepared at scan_start", lambda: key in reconstructor.geometries)
        assert reconstructor.geometries.builds == builds + 1
        assert "scan_id=early seq=0 geometry prepared: 96 angles x 64 cols" in caplog.text
        detector.send_frames("flat", "early", 0, FLATS)
        for first in range(0, ANGLES, 16):
            detector.send_frames("projections", "early", first, PROJECTIONS[first:first + 16])
        detector.end_scan("early", ANGLES)
        messages = until_ended(viewer)
    assert messages[-1].header["event"] == "scan_completed"
    assert slices(messages) == list(range(ROWS))
    assert reconstructor.geometries.builds == builds + 1  # the worker found it, built nothing
    assert metric(service, "tomocast_errors_total", {"stage": "prepare"}) == 0


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
        detector.send_scan("unprepared", PROJECTIONS, flats=FLATS, chunk=16)
        messages = until_ended(viewer)
        wait_for("the failed prepare to be counted", lambda: metric(
            service, "tomocast_errors_total", {"stage": "prepare"}) == 1)
    assert messages[-1].header["event"] == "scan_completed"
    assert slices(messages) == list(range(ROWS))
    assert reconstructor.geometries.builds == builds + 1  # built by the worker instead
    assert metric(service, "tomocast_errors_total", {"stage": "worker"}) == 0


def test_prepare_can_be_turned_off(start_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.prepare")
    service, endpoints = start_service(worker={"fbp_method": "gridding",
                                               "prepare_geometry": False},
                                       model={"enabled": False})
    assert service.preparer is None
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        detector.send_scan("late", PROJECTIONS, flats=FLATS, chunk=16)
        messages = until_ended(viewer)
    assert slices(messages) == list(range(ROWS))
    assert "geometry prepared" not in caplog.text
