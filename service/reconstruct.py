"""The worker: complete scans in, reconstructed and denoised slices out to the publisher.

Rows are reconstructed in batches of `batch_rows`. The denoiser needs `depth` adjacent slices per
output slice, so a row is denoised as soon as the rows `depth // 2` beyond it are reconstructed;
slices are published batch by batch, long before the whole scan is done. Only the reconstructed
rows a denoise batch still needs stay on the device: a window of `batch_rows + depth - 1`
slices (`RowWindow`), not the scan's whole (rows, cols, cols) volume (34 GB at 2048 x 2048).

On CUDA the batches move as a conveyor (`workers.transfer`): FBP and denoise of batch k+1 are
queued on a compute stream while batch k is copied to pinned host memory on a copy stream and
published; stage times come from CUDA events, so timing never synchronises the device. On the
CPU the same loop runs each batch to the end before the next.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from service.archive import Archive
from service.config import PublishSettings, WorkerSettings
from service.metrics import Metrics
from service.publish import PublishChannel, Publisher
from service.scan import CompletedScan
from workers.denoise import adjacent_stack
from workers.protocols import Denoiser, PreparableReconstructor, Reconstructor
from workers.transfer import Delivery, HostTransfer, Mark, host_transfer

log = logging.getLogger(__name__)


def theta_tensor(theta: np.ndarray) -> torch.Tensor:
    """A scan's angles as the worker hands them to the reconstructor: float32 on the CPU, where
    reconstructors read them to key and build their geometry (one on the device would be
    copied back, with a wait, every batch). `service.prepare` hands over the same values,
    since reconstructors cache geometry by them."""
    return torch.as_tensor(theta, dtype=torch.float32, device="cpu")


class RowWindow:
    """The reconstructed rows [`first`, `stop`) of a scan, in a (capacity, H, W) buffer on the
    device: each batch is written after the rows still needed, and rows no denoise batch needs
    any more are dropped from the front by sliding the kept ones down.

    Threading and ownership: the worker thread's; on CUDA only its compute stream touches the
    buffer (allocation included), so reuse needs no events. Views of it change when the next
    batch is written: hand `clone`s, never views, to anything that reads them later (the
    transfer's copy stream, the publisher's zero-copy sends, the archive's queue).
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self.first = 0
        self.stop = 0

    def begin(self, capacity: int, height: int, width: int, device: torch.device) -> None:
        """Empty, at row 0 of a scan; the buffer is kept from the last scan when it fits."""
        shape = (capacity, height, width)
        if (
            self._buffer is None
            or tuple(self._buffer.shape) != shape
            or self._buffer.device != device
        ):
            self._buffer = None  # the old one goes back to the allocator first
            self._buffer = torch.empty(shape, dtype=torch.float32, device=device)
        self.first = self.stop = 0

    def drop_before(self, row: int) -> None:
        """Rows before `row` are no longer needed."""
        assert self._buffer is not None
        row = min(max(row, self.first), self.stop)
        kept = self.stop - row
        if row > self.first and kept:
            # source and destination may overlap: copy through a temporary (a few rows)
            self._buffer[:kept] = self._buffer[row - self.first : self.stop - self.first].clone()
        self.first = row

    def append(self, rows: torch.Tensor) -> torch.Tensor:
        """Write `rows` (n, H, W) after the last row held; returns the window's view of them."""
        assert self._buffer is not None
        start, count = self.stop - self.first, rows.shape[0]
        if start + count > self._buffer.shape[0]:
            raise ValueError(
                f"{start} rows held + {count} new exceed the window's "
                f"{self._buffer.shape[0]}: drop rows first"
            )
        view = self._buffer[start : start + count]
        view.copy_(rows)
        self.stop += count
        return view

    @property
    def capacity(self) -> int:
        """Rows the buffer holds (0 before the first scan)."""
        return 0 if self._buffer is None else int(self._buffer.shape[0])

    def held(self) -> torch.Tensor:
        """The rows [`first`, `stop`) held, as one (stop - first, H, W) view."""
        assert self._buffer is not None
        return self._buffer[: self.stop - self.first]


class Worker:
    """Consumes `scans` on its own thread until it takes `None` from the queue.

    Owns the reconstructor and denoiser (and whatever device buffers they keep), the host
    transfer with its streams and pinned buffers (created on the worker's thread), and the
    `RowWindow` of reconstructed rows (kept from scan to scan of the same shape). The
    reconstructor is shared with one other thread only through its thread-safe `prepare`
    (`service.prepare`), which fills its geometry cache ahead of the scans; after each scan,
    completed or failed, the worker `release`s the scan's geometry: the cache may evict it.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        publish: PublishSettings,
        scans: queue.Queue[CompletedScan | None],
        reconstructor: Reconstructor,
        denoiser: Denoiser | None,
        publisher: Publisher,
        metrics: Metrics,
        archive: Archive | None = None,
    ) -> None:
        self.settings = settings
        self.publish_recon = publish.recon
        self.scans = scans
        self.reconstructor = reconstructor
        self.denoiser = denoiser
        self.publisher = publisher
        self.metrics = metrics
        self.archive = archive
        self.model_name = denoiser.name if denoiser is not None else "none"
        self._transfer: HostTransfer | None = None  # made on the worker thread, per device
        self._window = RowWindow()  # the reconstructed rows denoising still needs
        self._release = (
            reconstructor.release
            if isinstance(reconstructor, PreparableReconstructor)
            else lambda: None
        )
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self.busy = False  # processing a scan; read from other threads for metrics

    def start(self) -> None:
        self._thread.start()

    @property
    def window_rows(self) -> int:
        """Reconstructed rows the worker keeps on its device (batch_rows + 2 x the denoiser's
        halo), whatever the scan's rows: its device memory is this x cols^2 x 4 bytes."""
        return self._window.capacity

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Whether the thread has ended (or was never started) within `timeout` s."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        channel = self.publisher.channel()
        try:
            while (scan := self.scans.get()) is not None:
                self.metrics.queue_depth.labels("scans").set(self.scans.qsize())
                self.busy = True
                try:
                    self.process(scan, channel)
                except Exception:  # the one place a failed scan becomes a log line + counter
                    log.exception("scan_id=%s failed in the worker", scan.start.scan_id)
                    self.metrics.errors.labels("worker").inc()
                    self.metrics.scans.labels("failed").inc()
                    if self.archive is not None:
                        self.archive.abort(scan.start.scan_id)
                    channel.send_event(
                        {
                            "event": "scan_failed",
                            "scan_id": scan.start.scan_id,
                            "reason": "internal error in the worker (see the log)",
                        }
                    )
                finally:
                    self._release()
                    self.busy = False
        finally:
            channel.close()

    def process(self, scan: CompletedScan, channel: PublishChannel) -> None:
        device = self.reconstructor.device
        rows, cols = scan.start.rows, scan.start.cols
        batch = self.settings.batch_rows
        wait = time.time() - scan.t_last_projection
        self.metrics.stage_seconds.labels("wait").observe(wait)
        header = {
            "scan_id": scan.start.scan_id,
            "rows": rows,
            "model": self.model_name,
            "t_last_projection": scan.t_last_projection,
        }
        if self.archive is not None:
            self.archive.begin(
                scan.start.scan_id, rows, cols, scan.theta, scan.center, scan.start.meta
            )
        if self._transfer is None or self._transfer.device != device:
            self._transfer = host_transfer(device)
        transfer = self._transfer
        transfer.begin(batch, cols, cols)
        halo = self.denoiser.depth // 2 if self.denoiser is not None else 0
        denoised_to = 0
        fbp_batches: list[tuple[Mark, Mark, int]] = []
        times: dict[str, list[float]] = {"fbp": [], "denoise": []}
        window = self._window
        with transfer.compute():  # on CUDA the window is allocated and used on this stream only
            theta = theta_tensor(scan.theta)
            # a denoise batch [d0, d1) reads rows d0 - halo .. d1 - 1 + halo, and every batch is
            # denoised up to `halo` rows short of the last reconstructed: `batch` new rows plus
            # at most 2 * halo kept ones
            if self.denoiser is not None:  # without one, nothing reads reconstructed rows again
                window.begin(batch + 2 * halo, cols, cols, device)
            for r0 in range(0, rows, batch):
                r1 = min(rows, r0 + batch)
                fbp_start = transfer.mark()
                # float32 as the Reconstructor contract says (a no-op unless the scan is stored
                # in float16, ingest.sinogram_dtype)
                reconstructed = self.reconstructor.reconstruct(
                    scan.sinogram[r0:r1].float(), theta, scan.center
                )
                if self.denoiser is not None:
                    window.drop_before(denoised_to - halo)
                    reconstructed = window.append(reconstructed)
                fbp = (fbp_start, transfer.mark(), r1 - r0)
                fbp_batches.append(fbp)
                if self.publish_recon or self.denoiser is None:
                    # a copy: the window's rows (or the reconstructor's reusable buffer) are
                    # overwritten before the copy to the host has run (CUDA) or the slices have
                    # been sent (CPU: zero-copy)
                    transfer.submit(
                        reconstructed.clone(),
                        ("recon" if self.denoiser else "slice", r0, fbp, None),
                    )
                ready = rows if r1 == rows else r1 - halo
                while denoised_to < ready and self.denoiser is not None:
                    d0, d1 = denoised_to, min(ready, denoised_to + batch)
                    start = transfer.mark()
                    # rows past the window's ends are past the volume's (edge replication is
                    # right) or not needed: window.first <= d0 - halo unless it is row 0, and
                    # d1 - 1 + halo < r1 unless r1 == rows
                    denoised = self.denoiser.denoise(
                        adjacent_stack(
                            window.held(), d0 - window.first, d1 - window.first, self.denoiser.depth
                        )
                    )
                    transfer.submit(denoised, ("slice", d0, fbp, (start, transfer.mark(), d1 - d0)))
                    denoised_to = d1
                for delivery in transfer.ready():
                    self._deliver(channel, header, delivery, wait, times)
            for delivery in transfer.drain():
                self._deliver(channel, header, delivery, wait, times)
        times["fbp"] = [start.seconds_until(done) / count for start, done, count in fbp_batches]
        for stage, values in times.items():
            for value in values:
                self.metrics.stage_seconds.labels(stage).observe(value)
        tail = time.time() - scan.t_last_projection
        self.metrics.scan_tail_seconds.observe(tail)
        self.metrics.scans.labels("completed").inc()
        log.info(
            "scan_id=%s completed: %d slices, last projection -> last slice %.3f s",
            scan.start.scan_id,
            rows,
            tail,
        )
        completed = {
            "event": "scan_completed",
            "scan_id": scan.start.scan_id,
            "slices": rows,
            "missing_projections": scan.missing,
            "rejected_messages": scan.rejected,
            "clipped_pixels": scan.clipped,
            "model": self.model_name,
            "latency": {
                "tail_s": tail,
                "fbp_ms_per_slice": 1e3 * float(np.mean(times["fbp"])),
                "denoise_ms_per_slice": 1e3 * float(np.mean(times["denoise"]))
                if times["denoise"]
                else None,
            },
        }
        if self.archive is not None:
            self.archive.end(scan.start.scan_id, completed)
        channel.send_event(completed)

    def _deliver(
        self,
        channel: PublishChannel,
        header: dict[str, Any],
        delivery: Delivery,
        wait: float,
        times: dict[str, list[float]],
    ) -> None:
        """Publish (and archive) a batch that reached the host; its stage times are read now,
        when its device work is known to be done."""
        topic, first_index, (fbp_start, fbp_done, fbp_rows), denoise = delivery.tag
        timing = {"wait": wait, "fbp": fbp_start.seconds_until(fbp_done) / fbp_rows}
        if denoise is not None:
            start, done, count = denoise
            timing["denoise"] = start.seconds_until(done) / count
            times["denoise"].append(timing["denoise"])
        self._send(channel, topic, header, delivery.slices, first_index, timing)

    def _send(
        self,
        channel: PublishChannel,
        topic: str,
        header: dict[str, Any],
        host: np.ndarray,
        first_index: int,
        timing: dict[str, float],
    ) -> None:
        t0 = time.perf_counter()
        for i, data in enumerate(host):
            channel.send_slice(topic, {**header, "index": first_index + i, "timing": timing}, data)
        if self.archive is not None:
            self.archive.write(header["scan_id"], topic, first_index, host)
        per_slice = (time.perf_counter() - t0) / len(host)
        self.metrics.stage_seconds.labels("publish").observe(per_slice)
