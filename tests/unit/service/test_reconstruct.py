"""The worker's row bookkeeping: it keeps only a window of reconstructed rows on the device, and
what it publishes is what the whole volume would give, for any batch size against the
denoiser's depth. Slices go through a real `PublishChannel` (inproc, zero-copy sends), so a
batch handed over as a view of the window would show up overwritten; on CUDA through the
conveyor (`CudaTransfer`), whose copies to the host run on their own stream."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import torch
import zmq

from service.config import PublishSettings, WorkerSettings
from service.metrics import Metrics
from service.protocol import ScanStart
from service.publish import PublishChannel
from service.reconstruct import Worker
from service.sinogram import CompletedScan
from workers.denoise import adjacent_stack
from workers.rows import RowWindow

# slices over pyzmq's copy threshold (64 KiB), so sends really are zero-copy
COLS, ANGLES = 132, 5


class ReusingReconstructor:
    """A stand-in FBP that, as the protocol allows, returns views of one reused buffer: slice
    r is row r's sinogram summed over angles, spread over the slice's rows with a ramp."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._out = torch.empty(0, device=device)

    @property
    def device(self) -> torch.device:
        return self._device

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        batch, _, cols = sinograms.shape
        if self._out.shape[0] < batch:
            self._out = torch.empty((batch, cols, cols), device=self._device)
        ramp = torch.arange(1, cols + 1, dtype=torch.float32, device=self._device)[:, None]
        torch.mul(sinograms.float().sum(1)[:, None, :], ramp, out=self._out[:batch])
        return self._out[:batch]


class WeighingDenoiser:
    """Each output slice a sum of its `depth` neighbours with weights 1, 2, 4, ...: a neighbour
    taken from the wrong row changes it."""

    def __init__(self, depth: int, device: torch.device) -> None:
        self._depth, self._device = depth, device
        self.scales: list[float] = []  # each factor scale_for measured
        self.used: list[float | None] = []  # the factor each denoise call was given

    @property
    def name(self) -> str:
        return "weighing"

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def device(self) -> torch.device:
        return self._device

    def scale_for(self, slices: torch.Tensor) -> float:
        self.scales.append(float(slices.abs().max()) or 1.0)
        return self.scales[-1]

    def denoise(self, stack: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        self.used.append(scale)
        out = torch.zeros_like(stack[:, 0])
        for k in range(self._depth):
            out += 2.0**k * stack[:, k]
        return out


def expected(sinogram: torch.Tensor, depth: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(recon, denoised) of the whole volume at once, on the sinogram's device."""
    device = sinogram.device
    volume = (
        ReusingReconstructor(device).reconstruct(sinogram, torch.zeros(ANGLES), COLS / 2).clone()
    )
    if depth is None:
        return volume.cpu().numpy(), None
    denoised = WeighingDenoiser(depth, device).denoise(
        adjacent_stack(volume, 0, len(volume), depth)
    )
    return volume.cpu().numpy(), denoised.cpu().numpy()


@pytest.fixture
def inproc() -> Iterator[tuple[zmq.Context, zmq.Socket]]:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind("inproc://test-worker")
    yield context, pull
    pull.close(linger=0)
    context.term()


def run_scan(
    inproc: tuple[zmq.Context, zmq.Socket],
    rows: int,
    batch: int,
    depth: int | None,
    publish_recon: bool,
    device: torch.device,
) -> tuple[dict[str, dict[int, np.ndarray]], torch.Tensor]:
    """One scan through `Worker.process`; what it published, by topic and index."""
    context, pull = inproc
    metrics = Metrics()
    sinogram = torch.from_numpy(
        np.random.default_rng(rows * batch).random((rows, ANGLES, COLS), dtype=np.float32)
    ).to(device)
    start = ScanStart("s", 0, rows, COLS, ANGLES, "float32")
    scan = CompletedScan(
        start, sinogram, np.linspace(0, np.pi, ANGLES, endpoint=False), COLS / 2, 0, 0, 0, 0.0, 0.0
    )
    channel = PublishChannel(context, "inproc://test-worker", metrics)
    worker = Worker(
        WorkerSettings(device="cpu", batch_rows=batch),
        PublishSettings(recon=publish_recon),
        queue.Queue(),
        ReusingReconstructor(device),
        None if depth is None else WeighingDenoiser(depth, device),
        [channel],
        metrics,
    )
    worker.process(scan)
    channel.close()
    # the point of the window: a few rows on the device, never the whole volume (none at all
    # without a denoiser: nothing reads a reconstructed row twice)
    assert worker.window_rows == (0 if depth is None else batch + 2 * (depth // 2))
    published: dict[str, dict[int, np.ndarray]] = {}
    while pull.poll(0):  # read only now: every batch has long been overwritten in the window
        topic, header, *data = pull.recv_multipart()
        if topic == b"event":
            continue
        index = msgpack.unpackb(header)["index"]
        assert index not in published.setdefault(topic.decode(), {})
        published[topic.decode()][index] = np.frombuffer(data[0], np.float32).reshape(COLS, COLS)
    return published, sinogram


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("rows", "batch", "depth"),
    [(10, 3, 3), (7, 1, 5), (9, 2, 7), (5, 8, 3), (12, 4, 1), (1, 1, 3), (11, 3, 9)],
)
def test_window_publishes_what_the_whole_volume_gives(
    inproc: tuple[zmq.Context, zmq.Socket], rows: int, batch: int, depth: int, device: str
) -> None:
    published, sinogram = run_scan(inproc, rows, batch, depth, True, torch.device(device))
    recon, denoised = expected(sinogram, depth)
    assert denoised is not None
    assert sorted(published) == ["recon", "slice"]
    assert sorted(published["slice"]) == sorted(published["recon"]) == list(range(rows))
    for index in range(rows):
        # equal but for the order of a device's sums: a wrong or overwritten row is far off
        np.testing.assert_allclose(published["recon"][index], recon[index], rtol=1e-6)
        np.testing.assert_allclose(published["slice"][index], denoised[index], rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_without_a_denoiser_the_slices_are_the_reconstruction(
    inproc: tuple[zmq.Context, zmq.Socket], device: str
) -> None:
    published, sinogram = run_scan(inproc, 7, 3, None, False, torch.device(device))
    recon, _ = expected(sinogram, None)
    assert sorted(published) == ["slice"] and sorted(published["slice"]) == list(range(7))
    for index in range(7):
        np.testing.assert_allclose(published["slice"][index], recon[index], rtol=1e-6)


def test_row_window_slides_and_refuses_to_overflow() -> None:
    window = RowWindow()
    window.begin(4, 1, 1, torch.device("cpu"))
    window.append(torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1))
    window.drop_before(1)  # kept rows overlap where they move to
    assert (window.first, window.stop) == (1, 3)
    window.append(torch.tensor([3.0, 4.0]).view(2, 1, 1))
    assert window.held().flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    window.drop_before(-2)  # before the first row held: nothing to drop
    assert window.first == 1
    with pytest.raises(ValueError, match="exceed the window's 4"):
        window.append(torch.zeros(1, 1, 1))
    window.drop_before(10)  # past the last row held: all dropped
    assert (window.first, window.stop, len(window.held())) == (5, 5, 0)
