"""`ingest.mode = "connect"`: the DAQ binds and the service connects, with the same validation,
the same complete scans, and a reconnect when the DAQ restarts."""

from __future__ import annotations

from typing import Any

import pytest

from service.client import Detector, Subscriber
from service.events import ScanCompleted
from service.sim.simulate import SimulatedScan, simulate_scan
from tests.integration.test_pipeline import collect, rejected

ROWS, COLS, ANGLES = 4, 32, 40


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan("c-scan", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=2000.0, seed=7)


def send(detector: Detector, scan: SimulatedScan, scan_id: str) -> None:
    detector.send_scan(scan_id, scan.projections, darks=scan.darks, flats=scan.flats, chunk=9)


def test_a_binding_daq_is_reached_validated_and_reconnected(
    start_service: Any, scan: SimulatedScan
) -> None:
    daq = Detector("tcp://127.0.0.1:*", bind=True, linger_s=5.0)
    endpoint = daq.endpoint
    service, endpoints = start_service(
        ingest={"endpoint": endpoint, "mode": "connect"}, model={"enabled": False}
    )
    assert endpoints.ingest == endpoint
    with Subscriber(endpoints.publish, ("slice", "event")) as viewer:
        viewer.wait_ready()
        daq.socket.send_multipart([b"\xc1 not msgpack"])  # rejected, counted, nothing else
        send(daq, scan, "first")
        messages, events = collect(viewer)
        assert isinstance(events[-1], ScanCompleted) and events[-1].scan_id == "first"
        assert sorted(m.header["index"] for m in messages) == list(range(ROWS))
        assert rejected(service, "not_msgpack") == 1
        daq.close()  # the DAQ restarts on the same address; the service reconnects
        daq = Detector(endpoint, bind=True, linger_s=5.0)
        send(daq, scan, "second")
        messages, events = collect(viewer)
        daq.close()
    assert isinstance(events[-1], ScanCompleted) and events[-1].scan_id == "second"
    assert sorted(m.header["index"] for m in messages) == list(range(ROWS))
