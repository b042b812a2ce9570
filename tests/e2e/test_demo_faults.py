"""`tomocast demo` with a detector fault: the summary shows its repair (the centre found)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOMOCAST = [sys.executable, "-m", "service.cli"]


def test_demo_finds_an_off_centre_axis(tmp_path: Path) -> None:
    small = ["--rows", "4", "--cols", "96", "--angles", "120", "--photons", "10000"]
    done = subprocess.run(
        [*TOMOCAST, "demo", *small, "--center-offset", "5", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    found = re.search(
        r"rotation centre: ([\d.]+) px, estimated \(the simulated axis: 53.00\)", done.stdout
    )
    assert found, done.stdout
    assert abs(float(found.group(1)) - 53.0) <= 0.25
    assert "slices received: 4/4 denoised, 4/4 plain FBP" in done.stdout
    # the guard's verdicts are summed up from the slice headers
    assert re.search(
        r"no-harm guard: [0-4]/4 slices published denoised, consistency median", done.stdout
    ), done.stdout
