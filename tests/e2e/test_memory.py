"""Host memory for the largest message, measured: a `tomocast serve` process's peak resident
memory (VmHWM) while it takes one big `projections` message, against docs/operations.md's
formula (the message, held by ZeroMQ, plus the scan's sinogram, plus 4 x STORE_BLOCK_BYTES of
temporaries)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from service.client import Detector
from service.sinogram import STORE_BLOCK_BYTES
from tests.e2e.test_cli import Process
from tests.support.helpers import SERVE_LOOPBACK, wait_for

pytestmark = pytest.mark.slow

ROWS, COLS, ANGLES = 256, 1024, 512  # float32: a 512 MiB message fills a 512 MiB sinogram


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


def projections_accepted(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^tomocast_projections_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_the_largest_message_costs_what_the_docs_say() -> None:
    message = np.random.default_rng(2).uniform(0, 1, (ANGLES, ROWS, COLS)).astype(np.float32)
    serve = Process(
        *SERVE_LOOPBACK,
        "--model.enabled",
        "false",
        "--worker.prepare_geometry",
        "false",
    )
    try:
        match = serve.wait_for(r"ready: ingest (\S+), publish \S+, metrics (http://\S+/metrics) on")
        ingest, metrics_url = match.group(1), match.group(2)
        before = peak_rss(serve.proc.pid)
        with Detector(ingest) as detector:
            detector.start_scan("big", ROWS, COLS, ANGLES, "float32", normalized=True)
            detector.send_frames("projections", "big", 0, message)
            wait_for(
                "the message to be stored",
                lambda: projections_accepted(metrics_url) == ANGLES,
                timeout=120,
            )
            peak = peak_rss(serve.proc.pid) - before
    finally:
        serve.close()
    sinogram = message.nbytes  # float32 line integrals, as sent
    # temporaries: a block's copy out of the message, its magnitudes and masks (workers.finite)
    formula = message.nbytes + sinogram + 4 * STORE_BLOCK_BYTES
    assert abs(peak - formula) <= 0.25 * formula, (peak / 2**20, formula / 2**20)
