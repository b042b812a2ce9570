"""`Service.stop` in-process: it does not wait for a geometry build nobody will use, it still
finishes the complete scans it promised to, and it stops a service whose start failed."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.app import Service
from service.client import Detector, Subscriber
from service.config import load_settings
from service.events import ScanCompleted, ScanEnded, ScanFailed
from tests.support.helpers import GatedGridding, tally, wait_for
from workers.fbp import FBP
from workers.gridding import GriddingFBP

ROWS, COLS, ANGLES = 4, 64, 96
rng = np.random.default_rng(23)
FLATS = np.full((1, ROWS, COLS), 4100, np.uint16)
PROJECTIONS = (rng.poisson(2000, (ANGLES, ROWS, COLS)) + 100).astype(np.uint16)
DRAIN_TIMEOUT_S = 60.0


def test_stop_leaves_behind_a_geometry_build_for_a_scan_that_fails(start_service: Any) -> None:
    partial_center = COLS / 2 + 1.5
    reconstructor = GatedGridding(held={partial_center})  # the partial scan's build: seconds
    service, endpoints = start_service(
        reconstructor=reconstructor,
        model={"enabled": False},
        worker={"drain_timeout_s": DRAIN_TIMEOUT_S},
    )
    reconstructor.gate.clear()
    slices: set[tuple[str, int]] = set()
    events: dict[str, ScanEnded] = {}
    try:
        with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
            viewer.wait_ready()
            detector.send_scan("whole", PROJECTIONS, flats=FLATS, chunk=16)
            detector.start_scan(
                "partial", ROWS, COLS, ANGLES, "uint16", center=partial_center, n_flat=1
            )
            detector.send_frames("flat", "partial", 0, FLATS)
            # the ingest reads in order: 'whole' is complete and handed to the worker by now
            wait_for(
                "the partial scan's build to start", lambda: partial_center in reconstructor.built
            )
            t0 = time.monotonic()
            drained = service.stop()
            stopped_in = time.monotonic() - t0
            assert service.preparer is not None and not service.preparer.join(0)  # left behind
            while len(events) < 2:  # what stop published is in the viewer's buffers
                tally(viewer.recv(timeout=60.0), slices, events)
    finally:
        reconstructor.gate.set()
    assert drained and stopped_in < DRAIN_TIMEOUT_S / 4, stopped_in
    assert isinstance(events["whole"], ScanCompleted)
    assert slices == {("whole", i) for i in range(ROWS)}
    partial = events["partial"]
    assert isinstance(partial, ScanFailed) and "stopping" in partial.reason
    assert service.preparer.join(60)  # the build it left ends on its own


class FailsToWarmUp(GriddingFBP):
    """A reconstructor that fails the service's warm-up (a stand-in for a broken device)."""

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        raise RuntimeError("simulated device fault at warm-up")


def test_stop_after_a_failed_start_stops_what_was_started() -> None:
    settings = load_settings(
        None,
        {
            "ingest": {"endpoint": "tcp://127.0.0.1:*"},
            "publish": {"endpoint": "tcp://127.0.0.1:*"},
            "metrics": {"port": 0},
            "worker": {"device": "cpu"},
            "model": {"enabled": False},
        },
    )
    service = Service(settings, FailsToWarmUp("cpu"))
    with pytest.raises(RuntimeError, match="warm-up"):
        service.start()
    # built but never started
    assert service.ingest is not None and service.worker is not None
    assert service.preparer is not None
    t0 = time.monotonic()
    assert service.stop()
    assert time.monotonic() - t0 < 10


class HeldFBP:
    """The real FBP on the CPU, held at `gate` for a scan's batches (not the service's
    warm-up): a worker stuck on a device. `entered` is set once a scan's batch waits there."""

    def __init__(self) -> None:
        self.inner = FBP(torch.device("cpu"))
        self.gate = threading.Event()
        self.entered = threading.Event()

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        if sinograms.shape[0] == ROWS:
            self.entered.set()
            assert self.gate.wait(60)
        return self.inner.reconstruct(sinograms, theta, center)


def test_a_drain_timeout_ends_every_scan_left_with_an_event(
    start_service: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = HeldFBP()
    service, endpoints = start_service(
        reconstructor=held,
        model={"enabled": False},
        worker={"drain_timeout_s": 1.0, "queue_scans": 1},
        archive={"directory": str(tmp_path)},
    )
    events: dict[str, ScanEnded] = {}
    try:
        with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
            viewer.wait_ready()
            detector.send_scan("in-worker", PROJECTIONS, flats=FLATS, chunk=32)
            assert held.entered.wait(60)
            detector.send_scan("queued", PROJECTIONS, flats=FLATS, chunk=32)
            wait_for("the second scan to be queued", lambda: service.scans.qsize() == 1)
            assert not service.stop()  # the drain timed out
            while len(events) < 2:
                tally(viewer.recv(timeout=60.0), set(), events)
    finally:
        held.gate.set()
    assert service.worker is not None and service.worker.join(60)  # abandoned: it ends
    wait_for("the service's sockets to be closed", lambda: service.context.closed)
    for scan_id in ("in-worker", "queued"):
        ended = events[scan_id]
        assert isinstance(ended, ScanFailed) and ended.reason.startswith("drain timeout")
        assert f"scan_id={scan_id} failed: drain timeout" in caplog.text
    assert service.archive is not None and service.archive.join(0)
    assert not list(tmp_path.iterdir())  # the loop's partial archive file was removed
