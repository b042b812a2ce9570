"""The prepare thread's queue: the ingest hands it scan starts and never waits for it."""

from __future__ import annotations

import logging

import pytest

from service.metrics import Metrics
from service.prepare import GeometryPreparer
from service.protocol import ScanStart
from tests.support.helpers import GatedGridding, in_thread, wait_for

ROWS, COLS, ANGLES = 4, 64, 96


def scan_start(scan_id: str, center: float) -> ScanStart:
    return ScanStart(scan_id, 0, ROWS, COLS, ANGLES, "uint16", center=center, n_flat=1)


def test_a_start_finding_the_queue_full_is_dropped_and_submit_never_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service.prepare")
    reconstructor = GatedGridding()
    reconstructor.gate.clear()  # every build waits for the test
    metrics = Metrics()
    preparer = GeometryPreparer(reconstructor, metrics, pending=1)
    preparer.start()
    building, queued, dropped = (scan_start(f"scan-{i}", COLS / 2 + i) for i in range(3))
    try:
        preparer.submit(building)
        wait_for("the first build to start", lambda: reconstructor.built == [COLS / 2])
        preparer.submit(queued)  # the one place in the queue
        submitter, result = in_thread(lambda: preparer.submit(dropped))
        submitter.join(10)  # a bounded look: a blocking submit would still be waiting
        assert not submitter.is_alive() and result == [None], "submit waited for the thread"
        assert (
            "scan_id=scan-2 seq=0 geometry not prepared: 1 scans' geometries pending" in caplog.text
        )
        assert (
            metrics.registry.get_sample_value(
                "tomocast_geometry_prepares_total", {"outcome": "dropped"}
            )
            == 1
        )
        reconstructor.gate.set()
        wait_for("the queued scan's geometry", lambda: reconstructor.geometries.builds == 2)
    finally:
        reconstructor.gate.set()
        preparer.stop()
        assert preparer.join(60)
    assert reconstructor.built == [COLS / 2, COLS / 2 + 1]
    preparer.submit(scan_start("late", COLS / 2 + 3))  # after stop: dropped, never blocks
