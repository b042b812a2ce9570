"""The reconstruct loop's outputs (`service.sinks.SliceSink`): a conformance check for each
implementation (the publisher's channel over real sockets, the archive on real files), and the
loop itself against in-memory sinks, which it must treat alike whatever they are."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import zmq

from service.archive import Archive
from service.client import Subscriber
from service.config import PublishSettings, WorkerSettings
from service.events import ScanCompleted, ScanEnded, ScanFailed, ScanLatency
from service.metrics import Metrics
from service.protocol import ScanStart
from service.publish import Publisher
from service.reconstruct import Worker
from service.sinks import ScanDescription, SliceBatch, SliceSink, SliceTiming
from service.sinogram import CompletedScan
from tests.unit.service.test_reconstruct import ReusingReconstructor, WeighingDenoiser

ROWS, COLS, ANGLES = 5, 6, 4


def describe(scan_id: str) -> ScanDescription:
    return ScanDescription(
        scan_id=scan_id,
        rows=ROWS,
        cols=COLS,
        theta=np.linspace(0, np.pi, ANGLES, endpoint=False),
        center=COLS / 2,
        model="test-model",
        t_last_projection=1000.0,
        meta={"sample": "foam"},
    )


def batch(scan_id: str, topic: Any, first: int, stop: int) -> SliceBatch:
    slices = np.stack([np.full((COLS, COLS), i, np.float32) for i in range(first, stop)])
    if topic == "recon":
        slices = -slices
    denoise = 0.002 if topic == "slice" else None
    return SliceBatch(scan_id, topic, first, slices, SliceTiming(0.5, 0.001, denoise))


def completed(scan_id: str) -> ScanCompleted:
    return ScanCompleted(scan_id, ROWS, 0, 1, 2, "test-model", ScanLatency(0.25, 1.0, 2.0))


def feed(sink: SliceSink, scan_id: str, outcome: ScanEnded) -> None:
    """One scan as the loop hands it over: slices in two batches, rows out of order, the
    plain FBP beside them."""
    assert isinstance(sink, SliceSink)
    sink.begin(describe(scan_id))
    sink.write(batch(scan_id, "recon", 0, ROWS))
    sink.write(batch(scan_id, "slice", 3, ROWS))
    sink.write(batch(scan_id, "slice", 0, 3))
    sink.end(outcome)


def test_the_publish_channel_sends_each_slice_then_the_outcome() -> None:
    context = zmq.Context()
    metrics = Metrics()
    publisher = Publisher(
        PublishSettings(endpoint="tcp://127.0.0.1:*", sndhwm=10_000), context, metrics, {}
    )
    publisher.start()
    try:
        with Subscriber(publisher.endpoint, ("slice", "recon", "event"), context=context) as viewer:
            viewer.wait_ready()
            channel = publisher.channel()
            feed(channel, "done", completed("done"))
            channel.begin(describe("broken"))
            channel.end(ScanFailed("broken", "internal error"))
            channel.close()
            received = []
            while (message := viewer.recv(timeout=30)) is not None:
                received.append(message)
                if isinstance(message.event(), ScanFailed):
                    break
    finally:
        publisher.stop()
        assert publisher.join(30)
        context.term()
    slices = {(m.topic, m.slice_header().index): m for m in received if m.data is not None}
    assert sorted(slices) == sorted((t, i) for t in ("slice", "recon") for i in range(ROWS))
    for (topic, index), message in slices.items():
        header = message.slice_header()
        assert (header.scan_id, header.rows, header.model) == ("done", ROWS, "test-model")
        assert header.t_last_projection == 1000.0 and header.shape == (COLS, COLS)
        expected = {"wait": 0.5, "fbp": 0.001, **({"denoise": 0.002} if topic == "slice" else {})}
        assert {k: v for k, v in header.timing.items() if k != "end_to_end"} == expected
        assert header.end_to_end is not None
        np.testing.assert_array_equal(message.data, index if topic == "slice" else -index)
    events = [m.event() for m in received if m.data is None]
    assert events == [completed("done"), ScanFailed("broken", "internal error")]
    count = metrics.registry.get_sample_value
    assert count("tomocast_scans_total", {"outcome": "completed"}) == 1
    assert count("tomocast_scans_total", {"outcome": "failed"}) == 1


@pytest.mark.parametrize("keep_recon", [True, False])
def test_the_archive_keeps_completed_scans_and_drops_failed_ones(
    tmp_path: Path, keep_recon: bool
) -> None:
    archive = Archive(tmp_path, keep_recon, 4, Metrics(), {"name": "test-model"})
    archive.start()
    feed(archive, "done", completed("done"))
    feed(archive, "broken", ScanFailed("broken", "internal error"))
    archive.stop()
    assert archive.join(30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.h5"]
    with h5py.File(tmp_path / "done.h5") as f:
        data = f["exchange/data"][()]
        np.testing.assert_array_equal(data[:, 0, 0], np.arange(ROWS))
        assert f["exchange/received"][()].all()
        assert ("exchange/recon" in f) == keep_recon
        if keep_recon:
            np.testing.assert_array_equal(f["exchange/recon"][:, 0, 0], -np.arange(ROWS))
        np.testing.assert_allclose(f["exchange/theta"][()], np.arange(ANGLES) * 180 / ANGLES)
        attrs = f["process/tomocast"].attrs
        assert json.loads(attrs["completed"]) == completed("done").encode()
        assert json.loads(attrs["meta"]) == {"sample": "foam"} and attrs["center"] == COLS / 2


# ---- the loop against in-memory sinks -----------------------------------------------------------


class MemorySink:
    """Records what the loop hands over; copies nothing (the loop must not touch a batch
    after handing it over)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def begin(self, scan: ScanDescription) -> None:
        self.calls.append(("begin", scan))

    def write(self, batch: SliceBatch) -> None:
        self.calls.append(("write", batch))

    def end(self, outcome: ScanEnded) -> None:
        self.calls.append(("end", outcome))


class FailingAt(ReusingReconstructor):
    """Raises for the scan whose rotation centre is `center`."""

    def __init__(self, center: float) -> None:
        super().__init__(torch.device("cpu"))
        self.center = center

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        if center == self.center:
            raise RuntimeError("a reconstructor bug")
        return super().reconstruct(sinograms, theta, center)


def scan(scan_id: str, center: float = COLS / 2) -> CompletedScan:
    start = ScanStart(scan_id, 0, ROWS, COLS, ANGLES, "float32", center=center, meta={"k": 1})
    sinogram = torch.rand((ROWS, ANGLES, COLS))
    theta = np.linspace(0, np.pi, ANGLES, endpoint=False)
    return CompletedScan(start, sinogram, theta, center, 1, 2, 3, 0.0, 500.0)


def run_loop(sinks: list[MemorySink], scans: list[CompletedScan], **options: Any) -> Metrics:
    """`scans` through the loop's own thread, as the service runs it."""
    metrics = Metrics()
    inbox: queue.Queue[CompletedScan | None] = queue.Queue()
    worker = Worker(
        WorkerSettings(device="cpu", batch_rows=2),
        PublishSettings(recon=True),
        inbox,
        options.get("reconstructor", ReusingReconstructor(torch.device("cpu"))),
        options.get("denoiser", WeighingDenoiser(3, torch.device("cpu"))),
        list(sinks),
        metrics,
    )
    worker.start()
    for item in [*scans, None]:
        inbox.put(item)
    assert worker.join(60) and not worker.alive
    return metrics


def test_the_loop_hands_every_scan_to_every_sink_alike() -> None:
    sinks = [MemorySink(), MemorySink()]
    run_loop(sinks, [scan("a"), scan("b")])
    first, second = sinks[0].calls, sinks[1].calls
    assert len(first) == len(second)
    assert all(a[0] == b[0] and a[1] is b[1] for a, b in zip(first, second, strict=True))
    calls = sinks[0].calls
    for scan_id in ("a", "b"):
        mine = [(kind, item) for kind, item in calls if item.scan_id == scan_id]
        (kind, description), *writes, (last, outcome) = mine
        assert kind == "begin" and last == "end"
        assert (description.rows, description.cols, description.meta) == (ROWS, COLS, {"k": 1})
        assert isinstance(outcome, ScanCompleted) and outcome.slices == ROWS
        assert (outcome.missing_projections, outcome.clipped_pixels) == (1, 2)
        assert outcome.rejected_messages == 3
        assert {kind for kind, _ in writes} == {"write"}
        for topic in ("slice", "recon"):
            rows = [i for _, b in writes if b.topic == topic for i in range(b.first, b.stop)]
            assert sorted(rows) == list(range(ROWS))
        for _, b in writes:
            assert b.slices.shape == (b.stop - b.first, COLS, COLS)
            assert (b.timing.denoise is not None) == (b.topic == "slice")


def test_one_intensity_factor_per_scan_reaches_every_denoise_call_and_slice() -> None:
    sink, denoiser = MemorySink(), WeighingDenoiser(3, torch.device("cpu"))
    run_loop([sink], [scan("a"), scan("b")], denoiser=denoiser)
    assert len(denoiser.scales) == 2  # measured once per scan, on its first rows
    calls_per_scan = len(denoiser.used) // 2
    assert denoiser.used == [denoiser.scales[0]] * calls_per_scan + [denoiser.scales[1]] * (
        len(denoiser.used) - calls_per_scan
    )
    for scan_id, factor in zip(("a", "b"), denoiser.scales, strict=True):
        batches = [b for k, b in sink.calls if k == "write" and b.scan_id == scan_id]
        assert {b.scale for b in batches if b.topic == "slice"} == {factor}
        assert {b.scale for b in batches if b.topic == "recon"} == {None}


def test_a_scan_that_fails_in_the_loop_ends_failed_and_the_next_completes() -> None:
    sink = MemorySink()
    metrics = run_loop(
        [sink], [scan("bad", center=1.5), scan("good")], reconstructor=FailingAt(1.5)
    )
    ends = [(item.scan_id, type(item)) for kind, item in sink.calls if kind == "end"]
    assert ends == [("bad", ScanFailed), ("good", ScanCompleted)]
    failed = next(item for kind, item in sink.calls if kind == "end")
    assert "internal error" in failed.reason
    assert not [b for kind, b in sink.calls if kind == "write" and b.scan_id == "bad"]
    assert metrics.registry.get_sample_value("tomocast_errors_total", {"stage": "worker"}) == 1
