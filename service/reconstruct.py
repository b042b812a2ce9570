"""The reconstruct loop: complete scans in, reconstructed and denoised slices out to the sinks.

Rows are reconstructed in batches of `batch_rows`. The denoiser needs `depth` adjacent slices per
output slice, so a row is denoised as soon as the rows `depth // 2` beyond it are reconstructed;
slices are handed to the sinks batch by batch, long before the whole scan is done. Only the
reconstructed rows a denoise batch still needs stay on the device: a window of
`batch_rows + depth - 1` slices (`workers.rows.RowWindow`), not the scan's whole
(rows, cols, cols) volume.

On CUDA the batches move as a conveyor (`workers.transfer`): FBP and denoise of batch k+1 are
queued on a compute stream while batch k is copied to pinned host memory on a copy stream and
handed over; stage times come from CUDA events, so timing never synchronises the device. On the
CPU the same loop runs each batch to the end before the next.

What becomes of the slices is the sinks' business (`service.sinks.SliceSink`): the loop calls
`begin`, `write` per batch and `end` with the scan's outcome on each, in the order `Service`
listed them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from service.config import GuardSettings, PublishSettings, WorkerSettings
from service.continuous import ContinuousEnded
from service.events import ScanCompleted, ScanEnded, ScanFailed, ScanLatency
from service.guard import Pending, ScanGuard, record
from service.incremental import Incremental, Partial
from service.metrics import Metrics
from service.preprocess import ScanPreprocessor, preprocessing_fields
from service.sinks import ScanDescription, SliceBatch, SliceSink, SliceTiming, Topic
from service.sinogram import CompletedScan
from service.stage import StageThread
from workers.denoise import adjacent_stack
from workers.finite import zero_non_finite_
from workers.protocols import Denoiser, PreparableReconstructor, Reconstructor
from workers.rows import RowWindow, theta_tensor
from workers.transfer import Delivery, HostTransfer, Mark, host_transfer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Span:
    """Device work on `rows` rows, between two marks of the compute stream."""

    start: Mark
    done: Mark
    rows: int

    def per_row(self) -> float:
        """Seconds a row; on CUDA waits for `done` (read it once the batch is delivered)."""
        return self.start.seconds_until(self.done) / self.rows


@dataclass(frozen=True)
class BatchTag:
    """What travels with a batch through the transfer: where its rows go and what they cost
    (the FBP batch they came from and, for denoised slices, their denoise batch)."""

    topic: Topic
    first: int
    fbp: Span
    denoise: Span | None = None
    guard: Span | None = None  # the no-harm guard's check of denoised slices
    verdict: Pending | None = None  # its verdict, read once the batch is delivered


@dataclass
class _Run:
    """One scan's progress through the loop."""

    scan_id: str
    wait: float  # seconds the scan was queued before the loop took it
    halo: int  # rows each side a denoised row reads (depth // 2; 0 without a denoiser)
    denoised_to: int = 0  # rows [0, denoised_to) are denoised
    fbp: list[Span] = field(default_factory=list)
    denoise_s: list[float] = field(default_factory=list)  # per slice, as batches are delivered
    # NaN/inf pixels replaced by 0, added up on the device (read once, at the scan's end)
    non_finite: torch.Tensor | int = 0
    scale: float | None = None  # the denoiser's intensity factor, one for the whole scan
    guard: ScanGuard | None = None  # the no-harm guard (with a denoiser, guard.enabled)
    guard_s: list[float] = field(default_factory=list)  # per slice, as batches are delivered
    fallbacks: int = 0  # denoised slices the guard replaced by FBP
    # rows whose NaN/inf pixels this run counts ([first, stop), a work unit's own: its halo rows
    # are its neighbours' to count); None: every row
    owned: tuple[int, int] | None = None

    def zero_non_finite(self, values: torch.Tensor, first: int) -> None:
        """Replace NaN/inf in `values` (rows first, first + 1, ...) by 0; count the owned rows'."""
        if self.owned is None:
            self.non_finite = self.non_finite + zero_non_finite_(values)
            return
        a, b = (min(len(values), max(0, edge - first)) for edge in self.owned)
        if a < b:
            self.non_finite = self.non_finite + zero_non_finite_(values[a:b])
        zero_non_finite_(values)

    partial: Partial | None = None  # rows folded in as the scan arrived (service.incremental)


@dataclass
class RowsDone:
    """What the conveyor did over a scan's rows: seconds per row of each FBP and denoise
    batch, NaN/inf pixels zeroed, the denoiser's scale (None without one)."""

    fbp_s: list[float]
    denoise_s: list[float]
    non_finite: int
    scale: float | None
    guard_s: list[float] = field(default_factory=list)  # the no-harm guard's, per slice
    fallbacks: int = 0  # denoised slices the guard published as FBP


class RowSpread(Protocol):
    """Reconstructs and denoises a scan's rows elsewhere (several devices, Ray actors:
    `service.cluster`), handing each batch to `write` in row order, from the loop's thread."""

    def reconstruct(
        self, scan: CompletedScan, write: Callable[[SliceBatch], None], abandoned: threading.Event
    ) -> RowsDone: ...


class ModelSwap(Protocol):
    """Another denoiser may take over between scans, never inside one (`service.adapt`,
    model.adapt): the loop holds `scan()` for each scan and runs the denoiser it yields, and
    hands each completed scan (after [preprocess], as reconstructed) to `completed`."""

    def scan(self) -> AbstractContextManager[Denoiser]: ...

    def completed(self, scan: CompletedScan) -> None: ...


class Worker(StageThread):
    """The reconstruct loop: consumes `scans` on its own thread until it takes `None` from the
    queue (the end of stream, put there by the ingest as it stops).

    Owns the reconstructor and denoiser (and whatever device buffers they keep), the host
    transfer with its streams and pinned buffers (created on the loop's thread), and the
    `RowWindow` of reconstructed rows (kept from scan to scan of the same shape). The
    reconstructor is shared with one other thread only through its thread-safe `prepare`
    (`service.prepare`), which fills its geometry cache ahead of the scans; after each scan,
    completed or failed, the loop `release`s the scan's geometry: the cache may evict it.
    The sinks are called from the loop's thread only.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        publish: PublishSettings,
        scans: queue.Queue[CompletedScan | ContinuousEnded | None],
        reconstructor: Reconstructor,
        denoiser: Denoiser | None,
        sinks: list[SliceSink],
        metrics: Metrics,
        guard: GuardSettings | None = None,
        preprocessor: ScanPreprocessor | None = None,
        spread: RowSpread | None = None,
        models: ModelSwap | None = None,
        incremental: Incremental | None = None,
    ) -> None:
        """`spread`: the scan's rows go there rather than through this loop's own conveyor.
        `models`: where the denoiser of each scan comes from (None: `denoiser`, always).
        `incremental`: where scans' FBP done while they arrived is taken from."""
        self.incremental = incremental
        super().__init__("worker", metrics)
        self.models = models
        self.preprocessor = preprocessor  # the whole-scan steps before FBP ([preprocess])
        self.spread = spread
        self.settings = settings
        # plain FBP slices are handed over beside the denoised ones (topic "recon")
        self.publish_recon = publish.recon
        self.scans = scans
        self.reconstructor = reconstructor
        self.denoiser = denoiser
        self.sinks = list(sinks)
        self.model_name = denoiser.name if denoiser is not None else "none"
        # the no-harm guard checks denoised slices only (None: off)
        self.guard = guard if guard is not None and guard.enabled else None
        self._transfer: HostTransfer | None = None  # made on the loop's thread, per device
        self._window = RowWindow()  # the reconstructed rows denoising still needs
        self._release = (
            reconstructor.release
            if isinstance(reconstructor, PreparableReconstructor)
            else lambda: None
        )
        self.busy = False  # processing a scan; read from other threads for metrics
        self._current: str | None = None  # the scan_id being processed
        # set by `abandon` (from the owner's thread): the sinks hear nothing more from the loop
        self._abandoned = threading.Event()

    @property
    def window_rows(self) -> int:
        """Reconstructed rows the loop keeps on its device (batch_rows + 2 x the denoiser's
        halo), whatever the scan's rows: its device memory is this x cols^2 x 4 bytes."""
        return self._window.capacity

    def abandon(self) -> list[str]:
        """Give up what the loop has not finished (the drain timeout ran out): from now on no
        sink hears from the loop, which ends after the batch it is in. Returns the scan_ids
        lost, the one in the loop first, then those taken off its queue; the caller ends them
        for the sinks. Called from the owner's thread."""
        self._abandoned.set()
        lost = [self._current] if self._current is not None else []
        while True:
            try:
                scan = self.scans.get_nowait()
            except queue.Empty:
                return lost
            if isinstance(scan, ContinuousEnded):
                lost.append(scan.event.scan_id)
            elif scan is not None:
                lost.append(scan.start.scan_id)

    def _run(self) -> None:
        while not self._abandoned.is_set() and (scan := self.scans.get()) is not None:
            if isinstance(scan, ContinuousEnded):  # after its windows' slices
                self._end(scan.event)
                continue
            self.metrics.queue_depth.labels("scans").set(self.scans.qsize())
            self.busy = True
            self._current = scan.start.scan_id
            try:
                if not self.guarded(f"scan_id={scan.start.scan_id}", self.process, scan):
                    self._end(
                        ScanFailed(scan.start.scan_id, "internal error in the worker (see the log)")
                    )
            finally:
                if self.incremental is not None:  # a scan that failed before taking it
                    self.incremental.forget(scan.start.scan_id)
                self._release()
                self._current = None
                self.busy = False

    def process(self, scan: CompletedScan) -> None:
        """Reconstruct, denoise and hand over one scan, then its `ScanCompleted`, with one
        denoiser from start to end (`models` may swap it in between scans only)."""
        with self._model_for_scan():
            self._process(scan)

    @contextmanager
    def _model_for_scan(self) -> Iterator[None]:
        if self.models is None:
            yield
            return
        with self.models.scan() as denoiser:
            self.denoiser, self.model_name = denoiser, denoiser.name
            yield

    def _process(self, scan: CompletedScan) -> None:
        wait = time.time() - scan.t_last_projection
        self.metrics.stage_seconds.labels("wait").observe(wait)
        if self.preprocessor is not None:  # stripes, the centre, half-acquisition stitching
            scan = self.preprocessor.apply(scan)
        description = self._describe(scan)
        for sink in self.sinks:
            sink.begin(description)
        halo = self.denoiser.depth // 2 if self.denoiser is not None else 0
        run = _Run(scan.start.scan_id, wait, halo)
        if self.incremental is not None and self.spread is None:
            run.partial = self.incremental.take(scan)
        if self.spread is None:
            self._reconstruct(scan, run)
            fbp_s = [span.per_row() for span in run.fbp]
        else:
            done = self.spread.reconstruct(scan, self.write_batch, self._abandoned)
            fbp_s, run.denoise_s, run.non_finite, run.scale = (
                done.fbp_s,
                done.denoise_s,
                done.non_finite,
                done.scale,
            )
            run.guard_s, run.fallbacks = done.guard_s, done.fallbacks
            if self.guard is not None and self.denoiser is not None:
                run.guard = ScanGuard(self.guard, scan, theta_tensor(scan.theta), scan.center)
        for stage, values in (("fbp", fbp_s), ("denoise", run.denoise_s), ("guard", run.guard_s)):
            for value in values:
                self.metrics.stage_seconds.labels(stage).observe(value)
        tail = time.time() - scan.t_last_projection
        self.metrics.scan_tail_seconds.observe(tail)
        log.info(
            "scan_id=%s completed: %d slices, last projection -> last slice %.3f s",
            scan.start.scan_id,
            scan.start.rows,
            tail,
        )
        if run.guard is not None:
            log.info(
                "scan_id=%s no-harm guard: %d of %d slices published as plain FBP",
                scan.start.scan_id,
                run.fallbacks,
                scan.start.rows,
            )
        self._end(self._completed(scan, tail, fbp_s, run))
        if self.models is not None:  # what adaptation learns from (service.adapt)
            self.models.completed(scan)

    def _describe(self, scan: CompletedScan) -> ScanDescription:
        return ScanDescription(
            scan_id=scan.start.scan_id,
            rows=scan.start.rows,
            cols=scan.start.cols,
            theta=scan.theta,
            center=scan.center,
            model=self.model_name,
            t_last_projection=scan.t_last_projection,
            meta=scan.start.meta,
            **preprocessing_fields(scan),
            window=scan.window,
        )

    def _completed(
        self, scan: CompletedScan, tail: float, fbp_s: list[float], run: _Run
    ) -> ScanCompleted:
        denoise_s = run.denoise_s
        non_finite = int(run.non_finite)
        if non_finite:
            self.metrics.non_finite_pixels.inc(non_finite)
            log.warning(
                "scan_id=%s %d reconstructed or denoised pixels were NaN or infinite: "
                "published as 0",
                scan.start.scan_id,
                non_finite,
            )
        return ScanCompleted(
            scan.start.scan_id,
            slices=scan.start.rows,
            missing_projections=scan.missing,
            rejected_messages=scan.rejected,
            clipped_pixels=scan.clipped,
            model=self.model_name,
            latency=ScanLatency(
                tail_s=tail,
                fbp_ms_per_slice=1e3 * float(np.mean(fbp_s)),
                denoise_ms_per_slice=1e3 * float(np.mean(denoise_s)) if denoise_s else None,
            ),
            non_finite_pixels=non_finite,
            center=scan.center,
            **preprocessing_fields(scan),
            zinger_pixels=scan.preprocessing.zinger_pixels if scan.preprocessing else 0,
        )

    def _end(self, outcome: ScanEnded) -> None:
        if self._abandoned.is_set():  # the owner ended the scan for the sinks
            return
        for sink in self.sinks:
            sink.end(outcome)

    def reconstruct_rows(
        self,
        scan: CompletedScan,
        scale: float | None = None,
        owned: tuple[int, int] | None = None,
    ) -> RowsDone:
        """The conveyor alone: every row of `scan` through FBP and the denoiser (with the scan's
        `scale` when given, else measured as `process` does), each batch to the sinks; no
        `begin`/`end`, no metrics. What a device of `service.cluster` runs on its rows; NaN/inf
        pixels are counted only in rows [`owned`) when given (a unit's own, not its halo)."""
        halo = self.denoiser.depth // 2 if self.denoiser is not None else 0
        run = _Run(scan.start.scan_id, 0.0, halo, scale=scale, owned=owned)
        self._reconstruct(scan, run)
        fbp_s = [span.per_row() for span in run.fbp]
        done = RowsDone(fbp_s, run.denoise_s, int(run.non_finite), run.scale)
        done.guard_s, done.fallbacks = run.guard_s, run.fallbacks
        return done

    # ---- the conveyor --------------------------------------------------------------------

    def _reconstruct(self, scan: CompletedScan, run: _Run) -> None:
        """Every row through FBP (and the denoiser), every batch delivered to the sinks."""
        device = self.reconstructor.device
        rows, cols, batch = scan.start.rows, scan.start.cols, self.settings.batch_rows
        if self._transfer is None or self._transfer.device != device:
            self._transfer = host_transfer(device)
        transfer = self._transfer
        transfer.begin(batch, cols, cols)
        # inference mode: the reconstructor's and denoiser's outputs are inference tensors, which
        # the non-finite check updates in place
        with transfer.compute(), torch.inference_mode():
            # on CUDA the window is allocated and used on the compute stream only
            theta = theta_tensor(scan.theta)
            if self.denoiser is not None and self.guard is not None:
                run.guard = ScanGuard(self.guard, scan, theta, scan.center)
            # a denoise batch [d0, d1) reads rows d0 - halo .. d1 - 1 + halo, and every batch is
            # denoised up to `halo` rows short of the last reconstructed: `batch` new rows plus
            # at most 2 * halo kept ones
            if self.denoiser is not None:  # without one, nothing reads reconstructed rows again
                self._window.begin(batch + 2 * run.halo, cols, cols, device)
            for r0 in range(0, rows, batch):
                if self._abandoned.is_set():
                    return
                r1 = min(rows, r0 + batch)
                fbp = self._fbp(scan, theta, r0, r1, transfer, run)
                self._denoise(rows if r1 == rows else r1 - run.halo, fbp, transfer, run)
                self._deliver(transfer.ready(), run)
            self._deliver(transfer.drain(), run)

    def _fbp(
        self,
        scan: CompletedScan,
        theta: torch.Tensor,
        r0: int,
        r1: int,
        transfer: HostTransfer,
        run: _Run,
    ) -> Span:
        """Reconstruct rows [r0, r1); into the window when a denoiser will read them."""
        start = transfer.mark()
        # float32 as the Reconstructor contract says (a no-op unless the scan is stored in
        # float16, ingest.sinogram_dtype)
        reconstructed = self._fbp_rows(scan, theta, r0, r1, run.partial)
        # before the window: a denoiser never reads NaN (an int8 or fp16 engine would turn it
        # into finite, plausible pixels), and no sink ever gets it
        run.zero_non_finite(reconstructed, r0)
        if self.denoiser is not None:
            self._window.drop_before(run.denoised_to - run.halo)
            reconstructed = self._window.append(reconstructed)
        fbp = Span(start, transfer.mark(), r1 - r0)
        run.fbp.append(fbp)
        if self.publish_recon or self.denoiser is None:
            # a copy: the window's rows (or the reconstructor's reusable buffer) are
            # overwritten before the copy to the host has run (CUDA) or the slices have been
            # sent (CPU: zero-copy)
            topic: Topic = "recon" if self.denoiser is not None else "slice"
            transfer.submit(reconstructed.clone(), BatchTag(topic, r0, fbp))
        return fbp

    def _fbp_rows(
        self, scan: CompletedScan, theta: torch.Tensor, r0: int, r1: int, partial: Partial | None
    ) -> torch.Tensor:
        """Rows [r0, r1): those folded in while the scan arrived finished from the
        accumulators (service.incremental), the others by the reconstructor."""
        done = 0 if partial is None else min(r1, max(r0, partial.rows))
        parts = [partial.slices(r0, done)] if partial is not None and done > r0 else []
        if done < r1:
            rest = max(r0, done)
            parts.append(
                self.reconstructor.reconstruct(scan.sinogram[rest:r1].float(), theta, scan.center)
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _denoise(self, ready: int, fbp: Span, transfer: HostTransfer, run: _Run) -> None:
        """Denoise the rows up to `ready`, in batches of at most `batch_rows`."""
        denoiser, window = self.denoiser, self._window
        while denoiser is not None and run.denoised_to < ready:
            d0, d1 = run.denoised_to, min(ready, run.denoised_to + self.settings.batch_rows)
            start = transfer.mark()
            # rows past the window's ends are past the volume's (edge replication is right) or
            # not needed: window.first <= d0 - halo unless it is row 0, and
            # d1 - 1 + halo < r1 unless r1 == rows
            if run.scale is None:  # from the first rows reconstructed, kept for the whole scan
                run.scale = denoiser.scale_for(window.held())
            denoised = denoiser.denoise(
                adjacent_stack(window.held(), d0 - window.first, d1 - window.first, denoiser.depth),
                scale=run.scale,
            )
            run.zero_non_finite(denoised, d0)
            denoise = Span(start, transfer.mark(), d1 - d0)
            guard, verdict = None, None
            if run.guard is not None:  # the FBP of rows [d0, d1) replaces what the data refute
                reconstructed = window.held()[d0 - window.first : d1 - window.first]
                denoised, verdict = run.guard.check(d0, denoised, reconstructed)
                guard = Span(denoise.done, transfer.mark(), d1 - d0)
            transfer.submit(denoised, BatchTag("slice", d0, fbp, denoise, guard, verdict))
            run.denoised_to = d1

    def _deliver(self, deliveries: Iterable[Delivery], run: _Run) -> None:
        """Hand batches that reached the host to every sink; their stage times are read now,
        when their device work is known to be done."""
        for delivery in deliveries:
            tag: BatchTag = delivery.tag
            denoise = tag.denoise.per_row() if tag.denoise is not None else None
            if denoise is not None:
                run.denoise_s.append(denoise)
            guard = tag.guard.per_row() if tag.guard is not None else None
            if guard is not None:
                run.guard_s.append(guard)
            timing = SliceTiming(run.wait, tag.fbp.per_row(), denoise, guard)
            scale = run.scale if tag.denoise is not None else None
            denoised, consistency = None, None
            if tag.verdict is not None:
                verdict = tag.verdict.result()
                denoised, consistency = verdict.denoised, verdict.consistency
                run.fallbacks += record(self.metrics, verdict)
            elif tag.denoise is not None:  # guard off: every slice is the network's
                denoised = np.ones(len(delivery.slices), dtype=bool)
            batch = SliceBatch(
                run.scan_id,
                tag.topic,
                tag.first,
                delivery.slices,
                timing,
                scale,
                denoised,
                consistency,
            )
            if self._abandoned.is_set():
                return
            self.write_batch(batch)

    def write_batch(self, batch: SliceBatch) -> None:
        """Hand one batch to every sink (the loop's thread only)."""
        if self._abandoned.is_set():
            return
        t0 = time.perf_counter()
        for sink in self.sinks:
            sink.write(batch)
        per_slice = (time.perf_counter() - t0) / len(batch.slices)
        self.metrics.stage_seconds.labels("publish").observe(per_slice)
