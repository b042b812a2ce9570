"""Continuous rotation (protocol v1.1) over real loopback sockets: one reconstruction per window,
each equal to an offline `workers.recon.recon` of the same projections and angles (denoiser off),
bounded memory over many turns, bad continuous headers rejected with their reasons, and a v1
scan beside it unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from service.client import Detector, Published, Subscriber
from service.events import ScanCompleted, ScanEnded, ScanFailed
from service.sim.continuous import send_continuous, turns_of_projections
from workers.recon import recon

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
ROWS, COLS, HALF_TURN, CHUNK = 2, 32, 24, 8
WINDOW, EVERY = HALF_TURN, 12  # a half-turn every quarter-turn


def _collect(viewer: Subscriber, scan_id: str) -> tuple[dict[int, dict[int, Any]], list[Any]]:
    """Window slices by window_index and row, and the window events, until `scan_id` ends."""
    windows: dict[int, dict[int, Any]] = {}
    headers: dict[int, dict[str, Any]] = {}
    events: list[Any] = []
    while True:
        message: Published | None = viewer.recv(timeout=60.0)
        assert message is not None, "the service went quiet"
        event = message.event()
        if event is not None:
            events.append(event)
            if event.scan_id == scan_id and isinstance(event, ScanEnded):
                return windows, [headers, events]
            continue
        header = message.header
        if message.topic == "slice" and header.get("continuous_scan") == scan_id:
            k = header["window_index"]
            windows.setdefault(k, {})[header["index"]] = message.data
            headers[k] = header


def _metric(service: Any, name: str) -> float:
    return float(service.metrics.registry.get_sample_value(name) or 0.0)


def _send_in_step(
    detector: Detector, viewer: Subscriber, scan_id: str, turns: int
) -> tuple[int, dict[int, dict[int, Any]], dict[int, dict[str, Any]], list[Any]]:
    """Send the scan chunk by chunk, and after each chunk receive the windows it completed
    (up to their `scan_completed`), so that the loop is never behind (nothing dropped)."""
    windows: dict[int, dict[int, Any]] = {}
    headers: dict[int, dict[str, Any]] = {}
    events: list[Any] = []
    detector.start_scan(
        scan_id,
        ROWS,
        COLS,
        HALF_TURN,
        "float32",
        normalized=True,
        continuous=True,
        window=WINDOW,
        every=EVERY,
        center=COLS / 2,
    )
    sent, waited = 0, 0
    for index, theta, frames in turns_of_projections(ROWS, COLS, HALF_TURN, turns, CHUNK):
        detector.send_frames("projections", scan_id, index, frames, theta=theta.tolist())
        sent = index + len(frames)
        due = (sent - WINDOW) // EVERY + 1 if sent >= WINDOW else 0
        while waited < due:
            message: Published | None = viewer.recv(timeout=60.0)
            assert message is not None, "the service went quiet"
            event = message.event()
            if event is not None:
                events.append(event)
                waited += isinstance(event, ScanEnded) and event.scan_id == f"{scan_id}.w{waited}"
            elif message.topic == "slice":
                k = message.header["window_index"]
                windows.setdefault(k, {})[message.header["index"]] = message.data
                headers[k] = message.header
    detector.end_scan(scan_id, sent)
    rest, (more, tail) = _collect(viewer, scan_id)
    assert not rest and not more
    return sent, windows, headers, events + tail


def test_three_turns_give_one_reconstruction_per_window_equal_to_offline_fbp(
    start_service: Any,
) -> None:
    service, endpoints = start_service(
        model={"enabled": False}, preview={"enabled": False}, worker={"fbp_method": "direct"}
    )
    turns = 3
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        sent, windows, headers, events = _send_in_step(detector, viewer, "spin", turns)
    expected = (sent - WINDOW) // EVERY + 1
    assert sorted(windows) == list(range(expected))
    end = events[-1]
    assert isinstance(end, ScanCompleted) and end.windows == expected
    completed = {e.scan_id for e in events if isinstance(e, ScanCompleted)}
    assert {f"spin.w{k}" for k in range(expected)} <= completed
    chunks = list(turns_of_projections(ROWS, COLS, HALF_TURN, turns, CHUNK))
    theta = np.concatenate([c[1] for c in chunks])
    frames = np.concatenate([c[2] for c in chunks])
    assert theta.max() > 5 * np.pi  # the angles ran on past pi and wrapped
    for k, rows in windows.items():
        first, last = k * EVERY, k * EVERY + WINDOW - 1
        assert (headers[k]["first_projection"], headers[k]["last_projection"]) == (first, last)
        offline = recon(
            frames[first : last + 1], theta[first : last + 1], device="cpu", method="direct"
        )
        scale = float(np.abs(offline).max())
        assert sorted(rows) == list(range(ROWS))
        for row in range(ROWS):
            np.testing.assert_allclose(rows[row], offline[row], rtol=0, atol=1e-4 * scale)
    # the sample changes: the first and last windows differ by far more than the tolerance
    assert np.abs(windows[0][0] - windows[expected - 1][0]).max() > 0.1 * scale
    assert _metric(service, "tomocast_continuous_windows_total") == expected
    assert _metric(service, "tomocast_continuous_windows_dropped_total") == 0


def test_memory_stays_flat_over_twenty_turns(start_service: Any) -> None:
    service, endpoints = start_service(
        model={"enabled": False}, preview={"enabled": False}, worker={"fbp_method": "direct"}
    )
    ring = ROWS * COLS * WINDOW * 4
    seen: list[float] = []

    def watch(_: int) -> None:
        seen.append(_metric(service, "tomocast_continuous_buffer_bytes"))

    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        send_continuous(
            detector,
            "long",
            ROWS,
            COLS,
            HALF_TURN,
            20,
            window=WINDOW,
            every=EVERY,
            chunk=CHUNK,
            progress=watch,
        )
        windows, (_, events) = _collect(viewer, "long")
    assert isinstance(events[-1], ScanCompleted)
    windows_total = _metric(service, "tomocast_continuous_windows_total")
    dropped = _metric(service, "tomocast_continuous_windows_dropped_total")
    assert windows_total == (20 * 2 * HALF_TURN - WINDOW) // EVERY + 1
    assert len(windows) == windows_total - dropped == events[-1].windows
    # the ring, plus at most MAX_PENDING_WINDOWS windows waiting: never more, however long
    assert max(seen) <= ring * 3
    assert _metric(service, "tomocast_continuous_buffer_bytes") == 0  # released at scan_end
    assert service.ingest.assembler is not None
    assert not service.ingest.assembler.continuous


def _start(**keys: Any) -> list[bytes]:
    header = {
        "v": 1,
        "type": "scan_start",
        "scan_id": "bad",
        "seq": 0,
        "rows": ROWS,
        "cols": COLS,
        "n_angles": HALF_TURN,
        "dtype": "float32",
        "normalized": True,
        **keys,
    }
    return [msgpack.packb(header)]


def _rejected(service: Any, reason: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "tomocast_rejected_messages_total", {"reason": reason}
    )
    return float(value or 0.0)


def test_bad_continuous_headers_are_rejected_and_a_v1_scan_still_works(
    start_service: Any,
) -> None:
    service, endpoints = start_service(
        model={"enabled": False},
        preview={"enabled": False},
        worker={"fbp_method": "direct"},
        ingest={"max_scan_bytes": ROWS * COLS * 4 * 1000},
    )
    bad = [
        ("bad_value", _start(continuous=True, window=1)),
        ("bad_value", _start(continuous=True, window=0)),
        ("bad_value", _start(continuous=True, every="often")),
        ("bad_value", _start(window=10)),  # window without continuous
        ("bad_value", _start(continuous="yes")),
        ("too_large", _start(continuous=True, window=1001)),  # the ring over max_scan_bytes
    ]
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        for _, frames in bad:
            detector.send_raw(frames)
        # a continuous scan's projections: theta of the wrong length, NaN theta, out of order
        detector.start_scan(
            "c", ROWS, COLS, HALF_TURN, "float32", normalized=True, continuous=True, window=WINDOW
        )
        one = np.zeros((2, ROWS, COLS), np.float32)
        detector.send_frames("projections", "c", 0, one, theta=[0.0])
        detector.send_frames("projections", "c", 0, one, theta=[0.0, float("nan")])
        detector.send_frames("projections", "c", 4, one)
        detector.send_frames("projections", "c", 2, one)  # behind the next expected index
        detector.end_scan("c", 2)
        # a v1 scan beside them, unchanged
        theta = np.arange(HALF_TURN) * np.pi / HALF_TURN
        data = np.stack([np.full((ROWS, COLS), 0.01 * i, np.float32) for i in range(HALF_TURN)])
        detector.send_scan("v1", data, normalized=True)
        slices: dict[int, Any] = {}
        events: list[Any] = []
        while True:
            message = viewer.recv(timeout=60.0)
            assert message is not None
            event = message.event()
            if event is not None:
                events.append(event)
                if event.scan_id == "v1" and isinstance(event, ScanEnded):
                    break
            elif message.header["scan_id"] == "v1":
                assert "window_index" not in message.header
                slices[message.header["index"]] = message.data
    assert _rejected(service, "bad_value") == 5 + 2
    assert _rejected(service, "too_large") == 1
    assert _rejected(service, "index_out_of_range") == 1
    ends = {e.scan_id: e for e in events if isinstance(e, (ScanCompleted, ScanFailed))}
    assert isinstance(ends["c"], ScanCompleted) and ends["c"].windows == 0
    assert isinstance(ends["v1"], ScanCompleted) and ends["v1"].windows is None
    offline = recon(data, theta, device="cpu", method="direct")
    scale = float(np.abs(offline).max())
    for row in range(ROWS):
        np.testing.assert_allclose(slices[row], offline[row], rtol=0, atol=1e-4 * scale)


def test_doc_continuous_sender_example_gets_one_reconstruction_per_window(
    start_service: Any, tmp_path: Path
) -> None:
    """The continuous sender in docs/protocol.md runs as written: 3 turns of 120 projections,
    a window of 60 every 30 -> 11 windows, each the disk of the example. The loop's queue holds
    them all (worker.queue_scans), so none is dropped however fast the script sends."""
    _, endpoints = start_service(
        model={"enabled": False},
        preview={"enabled": False},
        worker={"fbp_method": "direct", "queue_scans": 16},
    )
    section = DOC.read_text().split("## Continuous rotation (v1.1)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/protocol.md lost its continuous sender example"
    script = tmp_path / "continuous.py"
    script.write_text(match.group(1))
    with Subscriber(endpoints.publish, ("slice", "event")) as viewer:
        viewer.wait_ready()
        env = {**os.environ, "TOMOCAST_INGEST": endpoints.ingest, "SCAN_ID": "doc-spin"}
        done = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        windows, (_, events) = _collect(viewer, "doc-spin")
    assert isinstance(events[-1], ScanCompleted) and events[-1].windows == 11
    assert sorted(windows) == list(range(11))
    yy, xx = np.mgrid[:64, :64] - 31.5
    inside = xx**2 + yy**2 < 15**2
    for rows in windows.values():
        assert sorted(rows) == [0, 1, 2, 3]
        assert abs(float(rows[0][inside].mean()) - 0.02) < 0.002


def test_simulate_continuous_command_sends_turns_of_a_growing_inclusion(
    start_service: Any,
) -> None:
    """`tomocast simulate --continuous --turns 2 --angles 16 --every 8` (in-process parser)."""
    from service.cli import build_parser

    _, endpoints = start_service(
        model={"enabled": False},
        preview={"enabled": False},
        worker={"fbp_method": "direct", "queue_scans": 16},
    )
    args = build_parser().parse_args(
        [
            "simulate",
            "--connect",
            endpoints.ingest,
            "--continuous",
            "--turns",
            "2",
            "--angles",
            "16",
            "--every",
            "8",
            "--rows",
            "2",
            "--cols",
            "32",
            "--scan-id",
            "cli",
        ]
    )
    with Subscriber(endpoints.publish, ("slice", "event")) as viewer:
        viewer.wait_ready()
        assert args.func(args) == 0
        windows, (_, events) = _collect(viewer, "cli")
    # 64 projections, window 16 (a half-turn), every 8: 7 windows
    assert isinstance(events[-1], ScanCompleted) and events[-1].windows == 7
    assert sorted(windows) == list(range(7))
    # a pixel 4 px right of the inclusion's seed: the disc (0.02) in turn 0, the grown
    # inclusion (0.05) in turn 1 (window 6 spans projections 48..63: all of turn 1)
    grown = windows[6][0][16, 23] - windows[0][0][16, 23]
    assert 0.015 < grown < 0.045, grown


def test_windows_are_denoised_when_a_model_is_on(start_service: Any) -> None:
    """The same engine as any scan: with the shipped model each window's slices are denoised."""
    _, endpoints = start_service(
        preview={"enabled": False}, worker={"fbp_method": "direct", "queue_scans": 16}
    )
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        send_continuous(detector, "den", ROWS, COLS, HALF_TURN, 1, center=COLS / 2)
        windows, (headers, events) = _collect(viewer, "den")
    assert isinstance(events[-1], ScanCompleted) and events[-1].windows == 2  # a half-turn each
    assert sorted(windows) == [0, 1]
    for header in headers.values():
        assert header["model"] != "none" and "denoised" in header
        assert all(np.isfinite(s).all() for s in windows[header["window_index"]].values())
