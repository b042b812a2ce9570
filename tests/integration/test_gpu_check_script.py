"""tools/gpu_check.sh, the one command for a GPU machine, runs end to end (QUICK=1 on the CPU:
the script's own mechanics, not its figures) and leaves one parseable JSON document per bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_on_the_cpu(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "QUICK": "1",
        "STEP_TIMEOUT": "300",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["environment", "recon", "denoise", "pipeline"]
    assert all(line.split()[2] == "0" for line in summary), summary
    broken = {**env, "PYTHON": str(tmp_path / "no-python")}
    failing = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), str(tmp_path / "b")],
        cwd=REPO,
        env=broken,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert failing.returncode == 1  # a failed step fails the script, after running the rest
    for what in ("recon", "denoise", "pipeline"):
        document = json.loads((tmp_path / f"{what}.json").read_text())
        assert document["command"].startswith(f"tomocast bench {what} ")
        assert document["machine"]["device"] == "cpu"
