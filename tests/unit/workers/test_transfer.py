"""Device -> host transfer of slice batches: order, values, timing marks; CUDA overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.transfer import CudaTransfer, HostTransfer, Mark, host_transfer


def _batches(device: torch.device) -> list[torch.Tensor]:
    return [torch.full((n, 8, 8), float(i), device=device) for i, n in enumerate((4, 4, 4, 2))]


def test_cpu_delivers_every_batch_at_once_in_order() -> None:
    transfer = host_transfer(torch.device("cpu"))
    assert type(transfer) is HostTransfer
    transfer.begin(4, 8, 8)
    got = []
    with transfer.compute():
        for i, batch in enumerate(_batches(transfer.device)):
            transfer.submit(batch, i)
            got += [(d.tag, d.slices) for d in transfer.ready()]
    assert [tag for tag, _ in got] == [0, 1, 2, 3]
    assert [slices.shape[0] for _, slices in got] == [4, 4, 4, 2]
    assert all((slices == tag).all() for tag, slices in got)
    assert list(transfer.drain()) == []


def test_marks_measure_cpu_time() -> None:
    start = Mark(torch.device("cpu"))
    sum(range(100_000))
    assert start.seconds_until(Mark(torch.device("cpu"))) > 0


@pytest.mark.gpu
def test_cuda_copies_arrive_in_order_with_their_values() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    transfer = host_transfer(device)
    assert isinstance(transfer, CudaTransfer)
    transfer.begin(4, 8, 8)
    got = []
    with transfer.compute():
        for round_ in range(3):  # more batches than staging slots: slots are reused
            for i, batch in enumerate(_batches(device)):
                transfer.submit(batch * (round_ + 1), (round_, i))
                got += list(transfer.ready())
        got += list(transfer.drain())
    assert [d.tag for d in got] == [(r, i) for r in range(3) for i in range(4)]
    for delivery in got:
        round_, i = delivery.tag
        assert isinstance(delivery.slices, np.ndarray) and delivery.slices.base is None
        assert (delivery.slices == i * (round_ + 1)).all()


@pytest.mark.gpu
def test_cuda_marks_time_the_compute_stream() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    transfer = host_transfer(device)
    with transfer.compute():
        start = transfer.mark()
        a = torch.rand(2048, 2048, device=device)
        for _ in range(10):
            a = a @ a / 2048
        done = transfer.mark()
    assert start.seconds_until(done) > 0
