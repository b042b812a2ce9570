"""Make docs/viewer.png: demo data through the service into the web viewer, captured headless.

    .venv/bin/python tools/viewer_screenshot.py [--out docs/viewer.png]

Starts a service on free loopback ports (CPU, plain FBP published too), `tomocast view --web`
as its own process (as an operator runs it), and Debian's headless chromium (apt-get install
chromium chromium-driver); sends one simulated foam scan; waits until the page shows it
complete; moves the slider to the middle slice and saves a screenshot of the page.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from service.app import Service
from service.client import Detector
from service.config import load_settings
from service.sim.simulate import SimulatedScan, simulate_scan
from tests.support.headless import DEBIAN_PACKAGES, find_chromium, launch

WAIT_MS = 300_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/viewer.png"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--cols", type=int, default=160)
    parser.add_argument("--angles", type=int, default=180)
    parser.add_argument("--photons", type=float, default=300.0)
    args = parser.parse_args()
    executable = find_chromium()
    if executable is None:
        sys.exit(f"no chromium: apt-get install {DEBIAN_PACKAGES}")
    scan = simulate_scan(
        "foam-demo",
        rows=args.rows,
        cols=args.cols,
        n_angles=args.angles,
        photons=args.photons,
        seed=1,
    )
    service = Service(
        load_settings(
            None,
            {
                "ingest": {"endpoint": "tcp://127.0.0.1:*"},
                "publish": {"endpoint": "tcp://127.0.0.1:*", "recon": True},
                "metrics": {"port": 0},
                "worker": {"device": "cpu"},
            },
        )
    )
    endpoints = service.start()
    try:
        viewer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "view",
                "--connect",
                endpoints.publish,
                "--web",
                "--port",
                "0",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            url = _viewer_url(viewer)
            _capture(executable, url, scan, endpoints.ingest, args)
        finally:
            viewer.terminate()
            viewer.wait()
    finally:
        service.stop()
    print(f"wrote {args.out}")


def _viewer_url(viewer: subprocess.Popen[str]) -> str:
    assert viewer.stderr is not None
    for line in viewer.stderr:
        if match := re.search(r"web viewer on (\S+)", line):
            return match.group(1)
    sys.exit(f"tomocast view --web ended with {viewer.wait()}")


def _capture(
    executable: str, url: str, scan: SimulatedScan, ingest: str, args: argparse.Namespace
) -> None:
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = launch(playwright, executable, Path(profile), viewport=(1280, 900))
        page = context.new_page()
        page.goto(url)
        page.wait_for_function("document.body.dataset.publisher === 'connected'", timeout=WAIT_MS)
        with Detector(ingest) as detector:
            detector.send_scan(
                scan.start.scan_id, scan.projections, darks=scan.darks, flats=scan.flats, chunk=4
            )
        page.wait_for_function("document.body.dataset.status === 'completed'", timeout=WAIT_MS)
        middle = args.rows // 2
        page.locator("#slider").fill(str(middle))
        page.wait_for_function(
            f"""["recon", "slice"].every((topic) =>
            document.getElementById("canvas-" + topic).dataset.index === "{middle}")""",
            timeout=WAIT_MS,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        context.close()


if __name__ == "__main__":
    main()
