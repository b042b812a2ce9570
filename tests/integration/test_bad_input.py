"""The bad-input matrix over real sockets: each bad message is sent in the middle of a good scan;
it is rejected and counted once under its reason, and every slice of the good scan arrives."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from service.client import Detector, Subscriber
from service.events import Event, ScanCompleted, ScanEnded, ScanFailed
from service.ingest import REJECT_LOG_PER_S
from service.protocol import FrameChunk
from tests.support.helpers import wait_for

ROWS, COLS, ANGLES = 4, 32, 24
rng = np.random.default_rng(7)
DARKS = rng.poisson(100, (2, ROWS, COLS)).astype(np.uint16)
FLATS = (rng.poisson(4000, (2, ROWS, COLS)) + 100).astype(np.uint16)
PROJECTIONS = (rng.poisson(2000, (ANGLES, ROWS, COLS)) + 100).astype(np.uint16)


def raw(**header: Any) -> bytes:
    return msgpack.packb({"v": 1, "scan_id": "good", "seq": 999, **header})


def start_other(detector: Detector, scan_id: str = "other", **keys: Any) -> None:
    detector.start_scan(
        scan_id, ROWS, COLS, ANGLES, keys.pop("dtype", "uint16"), **{"n_flat": 1, **keys}
    )


Injection = Callable[[Detector], None]
CASES: dict[str, tuple[str, Injection]] = {
    "not msgpack": ("not_msgpack", lambda d: d.send_raw([b"\xc1\xc1\xc1"])),
    "wrong v": ("bad_version", lambda d: d.send_raw([raw(v=2, type="scan_end", count=0)])),
    "unknown type": ("unknown_type", lambda d: d.send_raw([raw(type="reset")])),
    "missing key": ("missing_key", lambda d: d.send_raw([raw(type="scan_end")])),
    "mistyped key": ("bad_value", lambda d: d.send_raw([raw(type="scan_end", count="all")])),
    "payload size": (
        "payload_size",
        lambda d: d.send_raw(
            [
                raw(type="projections", seq=d.next_seq("good"), index=20, count=2),
                PROJECTIONS[20].tobytes(),
            ]
        ),
    ),
    "unsupported dtype": (
        "bad_value",
        lambda d: d.send_raw(
            [
                raw(
                    type="scan_start",
                    scan_id="f64",
                    seq=0,
                    rows=1,
                    cols=1,
                    n_angles=1,
                    dtype="float64",
                )
            ]
        ),
    ),
    "NaN in float payload": (
        "non_finite",
        lambda d: (
            start_other(d, "floats", dtype="float32", normalized=True, n_flat=0),
            d.send(
                FrameChunk.from_array(
                    "projections",
                    "floats",
                    d.next_seq("floats"),
                    0,
                    np.full((1, ROWS, COLS), np.nan, np.float32),
                )
            ),
        ),
    ),
    "index out of range": (
        "index_out_of_range",
        lambda d: d.send_frames("projections", "good", ANGLES - 1, PROJECTIONS[:2]),
    ),
    "duplicate chunk": (
        "duplicate",
        lambda d: d.send_frames("projections", "good", 0, PROJECTIONS[:4]),
    ),
    "projections before scan_start": (
        "unknown_scan",
        lambda d: d.send_frames("projections", "never-started", 0, PROJECTIONS[:1]),
    ),
    "second scan_start": (
        "scan_exists",
        lambda d: d.send_raw(
            [
                raw(
                    type="scan_start",
                    seq=d.next_seq("good"),
                    rows=ROWS,
                    cols=COLS,
                    n_angles=ANGLES,
                    dtype="uint16",
                    n_flat=1,
                )
            ]
        ),
    ),
    "no darks or flats": ("no_flats", lambda d: start_other(d, "flatless", n_flat=0)),
    "declared size above limits": (
        "too_large",
        lambda d: d.send_raw(
            [
                raw(
                    type="scan_start",
                    scan_id="huge",
                    seq=0,
                    rows=4096,
                    cols=4096,
                    n_angles=16384,
                    dtype="uint16",
                    n_flat=1,
                )
            ]
        ),
    ),
}


def start_with_daq(start_service: Any, mode: str, **ingest: Any) -> tuple[Any, Any, Detector]:
    """A service and its DAQ: in `bind` mode the DAQ connects to the service's ingest, in
    `connect` mode the DAQ binds first and the service connects to it."""
    if mode == "bind":
        service, endpoints = start_service(ingest=ingest)
        return service, endpoints, Detector(endpoints.ingest)
    daq = Detector("tcp://127.0.0.1:*", bind=True, linger_s=5.0)
    service, endpoints = start_service(ingest={**ingest, "endpoint": daq.endpoint, "mode": mode})
    return service, endpoints, daq


@pytest.mark.parametrize(
    ("case", "mode"),
    # ingest.mode = "connect" (a DAQ that binds) passes the same matrix as bind mode
    [(case, mode) for mode in ("bind", "connect") for case in CASES],
)
def test_bad_message_costs_only_itself(start_service: Any, case: str, mode: str) -> None:
    reason, inject = CASES[case]
    service, endpoints, daq = start_with_daq(start_service, mode, max_scan_bytes=1 << 30)
    counter = service.metrics.registry.get_sample_value
    before = counter("tomocast_rejected_messages_total", {"reason": reason})
    with Subscriber(endpoints.publish) as viewer, daq as detector:
        viewer.wait_ready()
        detector.start_scan("good", ROWS, COLS, ANGLES, "uint16", n_dark=2, n_flat=2)
        detector.send_frames("dark", "good", 0, DARKS)
        detector.send_frames("flat", "good", 0, FLATS)
        detector.send_frames("projections", "good", 0, PROJECTIONS[:12])
        inject(detector)
        detector.send_frames("projections", "good", 12, PROJECTIONS[12:])
        detector.end_scan("good", ANGLES)
        indices = []
        while True:
            message = viewer.recv(timeout=60.0)
            assert message is not None, "the good scan did not complete"
            if message.header.get("scan_id") != "good":
                continue
            if message.topic == "slice":
                indices.append(message.header["index"])
            elif isinstance(ended := message.event(), ScanEnded):
                break
    assert isinstance(ended, ScanCompleted)
    assert ended.missing_projections == 0
    assert sorted(indices) == list(range(ROWS))
    assert counter("tomocast_rejected_messages_total", {"reason": reason}) == before + 1


def test_a_scan_that_never_ends_times_out_and_is_released(start_service: Any) -> None:
    service, endpoints = start_service(ingest={"scan_timeout_s": 0.5})
    with (
        Subscriber(endpoints.publish, ("event",)) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        start_other(detector, "abandoned")
        detector.send_frames("flat", "abandoned", 0, FLATS[:1])
        detector.send_frames("projections", "abandoned", 0, PROJECTIONS[:5])
        events: list[Event | None] = []
        while not events or not isinstance(events[-1], ScanFailed):
            message = viewer.recv(timeout=30.0)
            assert message is not None, "the abandoned scan was never timed out"
            events.append(message.event())
    assert isinstance(events[-1], ScanFailed) and "no message for" in events[-1].reason
    assert service.metrics.registry.get_sample_value("tomocast_scans_in_flight") == 0
    assert (
        service.metrics.registry.get_sample_value("tomocast_scans_total", {"outcome": "failed"})
        == 1
    )


def test_silent_scans_are_evicted_to_let_a_new_scan_in(start_service: Any) -> None:
    idle_evict_s = 2.0
    service, endpoints = start_service(ingest={"max_live_scans": 2, "idle_evict_s": idle_evict_s})
    counter = service.metrics.registry.get_sample_value
    assembler = service.ingest.assembler
    assert assembler is not None
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        start_other(detector, "squat-1")  # started, then silent: a client that went away
        start_other(detector, "squat-2")
        wait_for("both scans to be live", lambda: assembler.live_scans == 2)
        start_other(detector, "too-soon")  # they are not idle long enough yet: no room
        wait_for(
            "the early scan_start to be refused",
            lambda: counter("tomocast_rejected_messages_total", {"reason": "too_many_scans"}),
        )
        wait_for(
            "the silent scans to be idle for ingest.idle_evict_s",
            lambda: all(
                time.monotonic() - scan.t_last_message >= idle_evict_s
                for scan in list(assembler.scans.values())
            ),
        )
        detector.send_scan("daq", PROJECTIONS, darks=DARKS, flats=FLATS)
        ended: dict[str, ScanEnded] = {}
        slices = 0
        while "daq" not in ended:
            message = viewer.recv(timeout=60.0)
            assert message is not None, "the DAQ's scan did not complete"
            if message.topic == "slice":
                slices += 1
            elif isinstance(event := message.event(), ScanEnded):
                ended[event.scan_id] = event
    assert isinstance(ended["daq"], ScanCompleted) and slices == ROWS
    evicted = ended["squat-1"]  # idle longest: the one evicted, and only it
    assert isinstance(evicted, ScanFailed) and evicted.reason.startswith("evicted")
    assert "squat-2" not in ended and assembler.live_scans == 1
    assert counter("tomocast_scans_evicted_total") == 1
    assert counter("tomocast_rejected_messages_total", {"reason": "too_many_scans"}) == 1


def test_a_flood_of_bad_messages_is_counted_but_not_logged_line_by_line(
    start_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    flood = 500
    service, endpoints = start_service()
    counter = service.metrics.registry.get_sample_value
    t0 = time.monotonic()
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        for _ in range(flood):
            detector.send_raw([b"\xc1\xc1\xc1"])
        detector.send_scan("good", PROJECTIONS, darks=DARKS, flats=FLATS)
        while True:
            message = viewer.recv(timeout=60.0)
            assert message is not None, "the good scan did not complete"
            if isinstance(message.event(), ScanEnded):
                break
    seconds = time.monotonic() - t0
    assert service.stop()
    assert counter("tomocast_rejected_messages_total", {"reason": "not_msgpack"}) == flood
    logged = [r.getMessage() for r in caplog.records if "not a msgpack" in r.getMessage()]
    assert len(logged) <= REJECT_LOG_PER_S * (int(seconds) + 2)
    summaries = [
        int(m.group(1))
        for r in caplog.records
        if (
            m := re.match(
                r"suppressed (\d+) more rejected messages \(reason not_msgpack\)", r.getMessage()
            )
        )
    ]
    assert summaries and len(logged) + sum(summaries) == flood
