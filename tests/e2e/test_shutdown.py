"""SIGTERM mid-scan: complete scans are finished, published and archived; the scan still being
received fails with an event; the process exits 0."""

from __future__ import annotations

import signal
from pathlib import Path

import h5py
import numpy as np

from service.client import Detector, Subscriber
from service.events import Event, ScanCompleted, ScanEnded, ScanFailed, ScanStarted
from tests.e2e.test_cli import Process
from tests.support.helpers import SERVE_LOOPBACK, tally

ROWS, COLS, ANGLES = 8, 64, 60
rng = np.random.default_rng(5)
FLATS = (rng.poisson(4000, (2, ROWS, COLS)) + 100).astype(np.uint16)
PROJECTIONS = (rng.poisson(2000, (ANGLES, ROWS, COLS)) + 100).astype(np.uint16)


def test_sigterm_mid_scan_keeps_every_promise(tmp_path: Path) -> None:
    serve = Process(
        *SERVE_LOOPBACK,
        "--archive.directory",
        str(tmp_path),
    )
    try:
        match = serve.wait_for(r"ready: ingest (\S+), publish (\S+),")
        ingest, publish = match.group(1), match.group(2)
        with Subscriber(publish) as viewer, Detector(ingest) as detector:
            viewer.wait_ready()
            detector.send_scan("whole", PROJECTIONS, flats=FLATS)
            detector.start_scan("partial", ROWS, COLS, ANGLES, "uint16", n_flat=2)
            detector.send_frames("flat", "partial", 0, FLATS)
            detector.send_frames("projections", "partial", 0, PROJECTIONS[:20])
            slices: set[tuple[str, int]] = set()
            events: dict[str, ScanEnded] = {}

            def take() -> Event | None:
                message = viewer.recv(timeout=60.0)
                tally(message, slices, events)
                return message.event()

            # Messages are read in order: once 'partial' has started, 'whole' was fully read
            # (its slices may already be out: they are kept).
            while True:
                event = take()
                if isinstance(event, ScanStarted) and event.scan_id == "partial":
                    break
            serve.proc.send_signal(signal.SIGTERM)
            while len(events) < 2:
                take()
        code, _, stderr = serve.finish()
    finally:
        serve.close()
    assert code == 0, stderr
    assert isinstance(events["whole"], ScanCompleted)
    assert slices == {("whole", i) for i in range(ROWS)}
    partial = events["partial"]
    assert isinstance(partial, ScanFailed) and "stopping" in partial.reason
    with h5py.File(tmp_path / "whole.h5") as f:
        assert f["exchange/received"][()].all()
    assert not list(tmp_path.glob("*.partial"))
