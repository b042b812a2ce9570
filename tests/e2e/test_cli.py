"""The command line as an operator runs it: `serve`, `view`, `simulate`, `replay` as processes."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from service.sim.simulate import simulate_scan, write_dxchange
from tests.support.helpers import SERVE_LOOPBACK

TOMOCAST = [sys.executable, "-m", "service.cli"]


class Process:
    """A tomocast sub-process whose stderr is read line by line until a pattern shows up."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*TOMOCAST, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        assert self.proc.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not selector.select(deadline - time.monotonic()):
                break
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no {pattern!r} from tomocast; it said:\n{''.join(self.lines)}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, "".join(self.lines) + err


@pytest.fixture
def server() -> Iterator[tuple[Process, str, str]]:
    proc = Process(
        *SERVE_LOOPBACK,
    )
    match = proc.wait_for(r"ready: ingest (\S+), publish (\S+),")
    yield proc, match.group(1), match.group(2)
    proc.close()


def test_serve_simulate_view_write_every_slice(
    server: tuple[Process, str, str], tmp_path: Path
) -> None:
    serve, ingest, publish = server
    out = tmp_path / "slices.h5"
    view = Process(
        "view", "--connect", publish, "--out", str(out), "--scans", "1", "--timeout", "120"
    )
    view.wait_for("connected to")
    sim = subprocess.run(
        [
            *TOMOCAST,
            "simulate",
            "--connect",
            ingest,
            "--rows",
            "6",
            "--cols",
            "48",
            "--angles",
            "60",
            "--scan-id",
            "cli-sim",
            "--save-truth",
            str(tmp_path / "truth.h5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sim.returncode == 0, sim.stderr
    code, stdout, stderr = view.finish()
    assert code == 0, stderr
    assert "cli-sim" in stdout  # the per-scan summary
    with h5py.File(out) as f:
        assert f["cli-sim/data/data"].shape == (6, 48, 48)
        assert f["cli-sim/data/received"][()].all()
        assert np.isfinite(f["cli-sim/data/data"][()]).all()
    with h5py.File(tmp_path / "truth.h5") as f:
        assert f["truth/volume"].shape == (6, 48, 48)
    serve.proc.send_signal(signal.SIGTERM)
    code, _, stderr = serve.finish()
    assert code == 0, stderr


def test_replay_pushes_a_dxchange_file(server: tuple[Process, str, str], tmp_path: Path) -> None:
    _, ingest, publish = server
    scan = simulate_scan("dx", rows=4, cols=32, n_angles=40, photons=3000.0, seed=5)
    path = tmp_path / "scan.h5"
    write_dxchange(path, scan)
    out = tmp_path / "replayed.h5"
    view = Process(
        "view", "--connect", publish, "--out", str(out), "--scans", "1", "--timeout", "120"
    )
    view.wait_for("connected to")
    replay = subprocess.run(
        [*TOMOCAST, "replay", str(path), "--connect", ingest, "--scan-id", "dx-replay"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stderr
    code, _, stderr = view.finish()
    assert code == 0, stderr
    with h5py.File(out) as f:
        assert f["dx-replay/data/received"][()].all()
