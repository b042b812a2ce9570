"""Archive faults as an operator meets them, in a `tomocast serve` process: a disk that fills up
mid-scan (a file-size limit stands in for it), a `.partial` file left by a crash, an archive
directory that cannot be made."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import urllib.request
from pathlib import Path

import h5py
import numpy as np

from service.client import Detector, Subscriber
from service.events import ScanCompleted, ScanEnded
from tests.e2e.test_cli import TOMOCAST, Process
from tests.support.helpers import SERVE_LOOPBACK, tally, wait_for

rng = np.random.default_rng(3)
FILE_LIMIT = 256 << 10  # bytes: the "disk" holds a small scan's file, not a big one's


def small_scan(cols: int, rows: int = 4, angles: int = 24) -> tuple[np.ndarray, np.ndarray]:
    flats = np.full((1, rows, cols), 4100, np.uint16)
    projections = (rng.poisson(2000, (angles, rows, cols)) + 100).astype(np.uint16)
    return projections, flats


def limit_file_size() -> None:
    """In the child: files may not grow past FILE_LIMIT (writes fail with EFBIG, as on a full
    disk, instead of killing the process with SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


class LimitedProcess(Process):
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*TOMOCAST, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
            preexec_fn=limit_file_size,
        )
        self.lines: list[str] = []


def serve_args(archive: Path) -> list[str]:
    return [
        *SERVE_LOOPBACK,
        "--model.enabled",
        "false",
        "--archive.directory",
        str(archive),
    ]


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


def test_a_full_disk_abandons_one_scan_file_and_the_service_goes_on(tmp_path: Path) -> None:
    serve = LimitedProcess(*serve_args(tmp_path))
    try:
        match = serve.wait_for(
            r"ready: ingest (\S+), publish (\S+), metrics (http://\S+/metrics) on"
        )
        ingest, publish, metrics_url = match.group(1), match.group(2), match.group(3)
        big, big_flats = small_scan(cols=256, rows=8)  # 8 x 256 KiB of slices: over the limit
        small, small_flats = small_scan(cols=32)
        events: dict[str, ScanEnded] = {}
        with Subscriber(publish) as viewer, Detector(ingest) as detector:
            viewer.wait_ready()
            detector.send_scan("too-big", big, flats=big_flats)
            detector.send_scan("fits", small, flats=small_flats)
            while len(events) < 2:
                tally(viewer.recv(timeout=120.0), set(), events)
        # the archive thread runs behind the loop
        wait_for(
            "the archive to give up on the big scan",
            lambda: metric(metrics_url, 'tomocast_errors_total{stage="archive"}') == 1,
        )
        assert metric(metrics_url, 'tomocast_errors_total{stage="archive"}') == 1
        assert metric(metrics_url, "tomocast_archive_abandoned_total") == 1
        serve.proc.send_signal(signal.SIGTERM)
        code, _, stderr = serve.finish()
    finally:
        serve.close()
    assert code == 0, stderr  # not a segfault in libhdf5 at exit
    assert all(isinstance(e, ScanCompleted) for e in events.values())
    assert "scan_id=too-big archive" in stderr and "scan_id=fits archived to" in stderr
    assert not list(tmp_path.glob("too-big*")), list(tmp_path.iterdir())
    with h5py.File(tmp_path / "fits.h5") as f:
        assert f["exchange/received"][()].all()


def test_an_unusable_archive_directory_is_a_start_up_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "archive"
    not_a_directory.write_text("a file where the directory should be")
    serve = Process(*serve_args(not_a_directory / "scans"))
    try:
        code, _, stderr = serve.finish()
    finally:
        serve.close()
    assert code == 2, stderr
    assert "archive.directory=" in stderr and "Traceback" not in stderr
