"""Getting slice batches from the compute device to the host, overlapped with the next batch.

The worker's conveyor: reconstruct and denoise batch k+1 on a compute stream while batch k is
copied device -> host on a copy stream and published. `cuda_transfer` does that with pinned
staging buffers allocated once per scan geometry; `host_transfer` is the CPU's, where the
"copy" is a view and every batch is ready at once. Both have one interface, so the worker never
branches on the device.

Staging slots are reused, but the publisher sends zero-copy and the archive queues arrays, so
each batch is copied out of its slot into its own array when it is handed over (a host memory
copy, small against the device copy it lets overlap).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Batches in flight to the host: one being copied while one is published, and one spare so a
# slow publish does not stall the compute stream.
STAGING_SLOTS = 3


@dataclass
class Delivery:
    """A batch on the host: `slices` (n, H, W) float32, with what its sender attached."""

    slices: np.ndarray
    tag: Any


class Mark:
    """A point in the compute stream's time: a CUDA event, or perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self._event: torch.cuda.Event | None = None
        self._time = 0.0
        if device.type == "cuda":
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._time = time.perf_counter()

    def seconds_until(self, end: Mark) -> float:
        """Seconds from this mark to `end`; on CUDA waits for `end` (call it once the batch is
        delivered, when its events have long completed)."""
        if self._event is not None and end._event is not None:
            end._event.synchronize()
            elapsed_ms: float = self._event.elapsed_time(end._event)
            return elapsed_ms / 1e3
        return end._time - self._time


class HostTransfer:
    """The CPU transfer: `submit` delivers at once (the slices are already host memory).

    Threading: owned by the worker thread, like the subclasses.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._ready: deque[Delivery] = deque()

    def compute(self) -> contextlib.AbstractContextManager[Any]:
        """The context the batch's computation runs in (CUDA: the compute stream)."""
        return contextlib.nullcontext()

    def mark(self) -> Mark:
        return Mark(self.device)

    def begin(self, batch: int, height: int, width: int) -> None:
        """A scan whose batches are at most (batch, height, width) starts; whatever a failed
        scan left in flight is dropped."""
        self._ready.clear()

    def submit(self, slices: torch.Tensor, tag: Any) -> None:
        """Queue (n, H, W) float32 `slices` for the host; the caller must not change them."""
        self._ready.append(Delivery(slices.numpy(), tag))

    def ready(self) -> Iterator[Delivery]:
        """The batches already on the host, oldest first, without waiting."""
        while self._ready:
            yield self._ready.popleft()

    def drain(self) -> Iterator[Delivery]:
        """Every batch still in flight, waiting for each (the end of a scan)."""
        yield from self.ready()


class CudaTransfer(HostTransfer):
    """Non-blocking device -> host copies on their own stream into pinned staging slots.

    Compute runs on `compute()`'s stream; `submit` makes the copy stream wait for the compute
    done so far (an event, not a host sync), then copies into the next free slot. The tensor is
    kept referenced until its copy completes, so the caching allocator cannot hand its memory
    to the next batch early.
    """

    def __init__(self, device: torch.device, slots: int = STAGING_SLOTS) -> None:
        super().__init__(device)
        self._compute = torch.cuda.Stream(device=device)
        self._copy = torch.cuda.Stream(device=device)
        self._slots = slots
        self._staging: list[torch.Tensor] = []
        self._free: deque[int] = deque()
        self._in_flight: deque[tuple[int, int, torch.cuda.Event, torch.Tensor, Any]] = deque()

    def compute(self) -> contextlib.AbstractContextManager[Any]:
        # The sinogram came from the ingest thread's stream: order after it.
        self._compute.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._compute)

    def begin(self, batch: int, height: int, width: int) -> None:
        """Allocate the pinned slots, once per geometry (pinning is slow: page-locking)."""
        for _ in self.drain():  # a failed scan's leftovers
            pass
        shape = (batch, height, width)
        if self._staging and tuple(self._staging[0].shape) == shape:
            return
        self._staging = [
            torch.empty(shape, dtype=torch.float32, pin_memory=True) for _ in range(self._slots)
        ]
        self._free = deque(range(self._slots))

    def submit(self, slices: torch.Tensor, tag: Any) -> None:
        if not self._free:
            self._ready.append(self._wait_oldest())
        slot = self._free.popleft()
        count = slices.shape[0]
        self._copy.wait_stream(self._compute)
        with torch.cuda.stream(self._copy):
            self._staging[slot][:count].copy_(slices, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy)
        self._in_flight.append((slot, count, done, slices, tag))

    def ready(self) -> Iterator[Delivery]:
        while self._in_flight and self._in_flight[0][2].query():
            self._ready.append(self._wait_oldest())
        yield from super().ready()

    def drain(self) -> Iterator[Delivery]:
        while self._in_flight:
            self._ready.append(self._wait_oldest())
        yield from super().ready()

    def _wait_oldest(self) -> Delivery:
        slot, count, done, _, tag = self._in_flight.popleft()
        done.synchronize()
        slices = self._staging[slot][:count].numpy().copy()  # the slot is reused next
        self._free.append(slot)
        return Delivery(slices, tag)


def host_transfer(device: torch.device) -> HostTransfer:
    """The transfer for `device`: pinned and overlapped on CUDA, immediate on the CPU."""
    return CudaTransfer(device) if device.type == "cuda" else HostTransfer(device)
