"""Reliability over real sockets and files: the archive, backpressure, nothing lost."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import zmq

from service.client import Detector, Published, Subscriber
from service.events import ScanCompleted, ScanEnded, ScanFailed
from service.protocol import FrameChunk, ScanEnd, ScanStart
from workers.fbp import FBP

ROWS, COLS, ANGLES = 6, 48, 40
rng = np.random.default_rng(11)
DARKS = rng.poisson(100, (2, ROWS, COLS)).astype(np.uint16)
FLATS = (rng.poisson(4000, (2, ROWS, COLS)) + 100).astype(np.uint16)
PROJECTIONS = (rng.poisson(2000, (ANGLES, ROWS, COLS)) + 100).astype(np.uint16)


def send_scan(detector: Detector, scan_id: str) -> None:
    detector.send_scan(scan_id, PROJECTIONS, darks=DARKS, flats=FLATS, chunk=8)


def until_completed(viewer: Subscriber, scans: int) -> list[Published]:
    messages: list[Published] = []
    done = 0
    while done < scans:
        message = viewer.recv(timeout=60.0)
        assert message is not None, "nothing published for 60 s"
        messages.append(message)
        if isinstance(message.event(), ScanEnded):
            done += 1
    return messages


def test_archive_holds_exactly_what_was_published(start_service: Any, tmp_path: Path) -> None:
    service, endpoints = start_service(
        archive={"directory": str(tmp_path), "recon": True}, publish={"recon": True}
    )
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        send_scan(detector, "arch-1")
        messages = until_completed(viewer, 1)
    assert service.stop()  # drains the archive
    published = {(m.topic, m.header["index"]): m.data for m in messages if m.topic != "event"}
    with h5py.File(tmp_path / "arch-1.h5") as f:
        assert f["exchange/received"][()].all()
        for topic, name in (("slice", "exchange/data"), ("recon", "exchange/recon")):
            stored = f[name][()]
            for index in range(ROWS):
                np.testing.assert_array_equal(stored[index], published[(topic, index)])
        np.testing.assert_allclose(f["exchange/theta"][()], np.arange(ANGLES) * 180 / ANGLES)
        attrs = f["process/tomocast"].attrs
        assert json.loads(attrs["model"])["name"] == service.denoiser.name
        assert json.loads(attrs["completed"])["slices"] == ROWS
    assert not list(tmp_path.glob("*.partial"))


def test_a_partial_file_left_by_a_crash_is_reported_and_never_overwritten(
    start_service: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    leftover = tmp_path / "again.h5.partial"
    leftover.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))  # a file cut short by SIGKILL
    service, endpoints = start_service(archive={"directory": str(tmp_path)})
    assert service.metrics.registry.get_sample_value("tomocast_archive_stale_partials") == 1
    assert f"{leftover}: a partial archive file left by an earlier run" in caplog.text
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        send_scan(detector, "again")
        messages = until_completed(viewer, 1)
    assert service.stop()
    assert isinstance(messages[-1].event(), ScanCompleted)
    assert leftover.read_bytes() == b"\x89HDF\r\n\x1a\n" + bytes(100)
    with h5py.File(tmp_path / "again.h5") as f:
        assert f["exchange/received"][()].all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.h5", "again.h5.partial"]


class GatedFBP:
    """The real FBP, held at a gate the test opens: a deliberately stalled worker."""

    def __init__(self) -> None:
        self.inner = FBP(torch.device("cpu"))
        self.gate = threading.Event()
        self.gate.set()  # open for the service's warm-up

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        self.gate.wait()
        return self.inner.reconstruct(sinograms, theta, center)


def test_a_stalled_worker_blocks_the_daq_and_nothing_is_lost(start_service: Any) -> None:
    fbp = GatedFBP()
    big = (rng.poisson(2000, (128, 16, 128)) + 100).astype(np.uint16)  # 4 MiB per scan
    flats = np.full((1, 16, 128), 4100, np.uint16)
    service, endpoints = start_service(
        reconstructor=fbp, ingest={"rcvhwm": 2, "max_live_scans": 2}, worker={"queue_scans": 1}
    )
    fbp.gate.clear()
    scans = [f"bp-{i}" for i in range(40)]
    messages = [
        m
        for scan_id in scans
        for m in (
            ScanStart(scan_id, 0, 16, 128, 128, "uint16", n_flat=1),
            FrameChunk.from_array("flat", scan_id, 1, 0, flats),
            *(
                FrameChunk.from_array("projections", scan_id, 2 + i // 16, i, big[i : i + 16])
                for i in range(0, 128, 16)
            ),
            ScanEnd(scan_id, 10, 128),
        )
    ]
    blocked_at = None
    with (
        Subscriber(endpoints.publish) as viewer,
        Detector(endpoints.ingest, sndhwm=2, send_timeout_s=2.0) as detector,
    ):
        viewer.wait_ready()
        for position, message in enumerate(messages):
            try:
                detector.send(message)
            except TimeoutError:
                blocked_at = position
                break
        assert blocked_at is not None, "40 scans went in while the worker was stalled"
        # While stalled, the service holds a bounded amount: the scans assembling, the one queued
        # and the one in the worker; the rest waits in the DAQ (ZeroMQ and TCP buffers).
        assert service.ingest.live_scans <= 2 and service.scans.qsize() <= 1
        fbp.gate.set()
        detector.socket.setsockopt(zmq.SNDTIMEO, -1)
        for message in messages[blocked_at:]:
            detector.send(message)
        published = until_completed(viewer, len(scans))
    ended = [e for m in published if isinstance(e := m.event(), ScanEnded)]
    assert {type(e) for e in ended} == {ScanCompleted}
    slices = {(m.header["scan_id"], m.header["index"]) for m in published if m.topic == "slice"}
    assert slices == {(s, i) for s in scans for i in range(16)}
    assert service.metrics.registry.get_sample_value("tomocast_projections_total") == 128 * len(
        scans
    )


def test_a_dead_viewer_loses_slices_alone_and_can_count_them(start_service: Any) -> None:
    rows, cols, scans = 64, 256, 3  # 48 MiB of slices: more than the HWM and socket buffers
    flats = np.full((1, rows, cols), 4100, np.uint16)
    projections = (rng.poisson(2000, (90, rows, cols)) + 100).astype(np.uint16)
    _, endpoints = start_service(publish={"sndhwm": 64}, worker={"batch_rows": 16})
    with (
        Subscriber(endpoints.publish, rcvhwm=1) as dead,
        Subscriber(endpoints.publish) as live,
        Detector(endpoints.ingest) as detector,
    ):
        dead.wait_ready()
        live.wait_ready()
        for i in range(scans):
            detector.send_scan(f"dv-{i}", projections, flats=flats, chunk=15)
        published = until_completed(live, scans)  # the pipeline never waited for `dead`
        # `dead` wakes up. A last scan, published after everything else, marks the end of what
        # it can ever receive; every loss before it shows as a gap in pub_seq.
        detector.send_scan("marker", projections[:, :4], flats=flats[:, :4], chunk=15)
        got = until_completed(dead, 1)
        while got[-1].header.get("scan_id") != "marker":
            got += until_completed(dead, 1)
    live_slices = [m for m in published if m.topic == "slice"]
    assert len(live_slices) == rows * scans and live.dropped == {}
    assert [m.header["pub_seq"] for m in live_slices] == list(range(rows * scans))
    dead_slices = [m for m in got if m.topic == "slice"]
    assert dead.dropped.get("slice", 0) > 0
    assert len(dead_slices) + dead.dropped["slice"] == rows * scans + 4


class FailsOnWidth(GatedFBP):
    """The real FBP, except it breaks on one detector width (a stand-in for a GPU fault)."""

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        if sinograms.shape[-1] == 40:
            raise RuntimeError("simulated device fault")
        return super().reconstruct(sinograms, theta, center)


def test_an_error_in_the_worker_costs_one_scan(start_service: Any) -> None:
    service, endpoints = start_service(reconstructor=FailsOnWidth())
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        detector.send_scan("breaks", PROJECTIONS[..., :40], flats=FLATS[..., :40])
        send_scan(detector, "after")
        messages = until_completed(viewer, 2)
    events = {e.scan_id: e for m in messages if isinstance(e := m.event(), ScanEnded)}
    assert isinstance(events["breaks"], ScanFailed)
    assert isinstance(events["after"], ScanCompleted)
    assert sorted(m.header["index"] for m in messages if m.topic == "slice") == list(range(ROWS))
    value = service.metrics.registry.get_sample_value
    assert value("tomocast_errors_total", {"stage": "worker"}) == 1
    assert value("tomocast_scans_total", {"outcome": "failed"}) == 1


def test_a_reused_scan_id_never_overwrites_an_archived_scan(
    start_service: Any, tmp_path: Path
) -> None:
    service, endpoints = start_service(archive={"directory": str(tmp_path)})
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        send_scan(detector, "same")
        until_completed(viewer, 1)
        detector.send_scan("same", PROJECTIONS[::-1].copy(), darks=DARKS, flats=FLATS, chunk=8)
        until_completed(viewer, 1)
    assert service.stop()
    with h5py.File(tmp_path / "same.h5") as first, h5py.File(tmp_path / "same.1.h5") as second:
        assert first["exchange/received"][()].all() and second["exchange/received"][()].all()
        assert not np.array_equal(first["exchange/data"][()], second["exchange/data"][()])
