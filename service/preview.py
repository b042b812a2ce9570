"""Previews: partial reconstructions of a few rows while a scan's projections arrive.

    [ingest thread] PreviewTap --snapshot (bounded queue, drop oldest)--> [preview thread]
        Previewer: direct FBP of the snapshot's rows --> PublishChannel, topic `preview`

The tap runs on the ingest thread: at most `preview.rate_hz` times a second per scan (and once
more when the last projection arrives) it copies the previewed rows of the projections received
so far, flat-field corrected, out of the scan's sinogram: a snapshot, a few rows x angles x
cols. Snapshots are cumulative, so when the preview thread lags and its queue
(`preview.queue_items`) is full the oldest waiting one is dropped (counted,
`tomocast_previews_dropped_total{reason="queue_full"}`): the next holds all its angles. The
ingest never waits for the preview thread, and the preview thread has its own reconstructor,
so the reconstruct loop never waits either.

A preview is the plain direct FBP (`workers.fbp.FBP`, the worker's filter and mask) of the
angles received (computed at every angle of the scan, those missing zero and the others
reweighted, so the geometry is built once per scan and centre, not per snapshot), about the
scan's live centre (`service.live`): declared, configured, the previous scan's of the same
width, or cols/2, until an operator sets one. No denoiser, no
whole-scan preprocessing (stripes, stitching). With every angle and the same centre, a row's
last preview is the same FBP as its final slice when the worker's FBP method is "direct" too.
Once the reconstruct loop has begun a scan's final slices, its previews still waiting are
dropped (`reason="final_begun"`): viewers get no preview after the final slices began. While a
complete scan is on its way through the loop (from its hand-over to its end event), previews
wait (the latest snapshot of each scan is kept) and a render under way stops between rows:
previews use the compute the loop leaves idle, never its own.

When every row of a scan is live (`preview.rows` names them all, or the scan's incremental
accumulators hold them all and their slices fit in `VERTICAL_MAX_BYTES`), each render also
publishes the vertical cut through the rows' slices at their middle slice row (header
`plane: "xz"`, `index` that slice row, shape rows x N): with every angle, the same cut of the
final slices.

The tap also keeps `service.live.LiveScans` in step with the scans (opened at scan_start,
closed at the end), and applies an operator's centre to the completed scan.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from service.config import PreviewSettings, WorkerSettings
from service.events import PreviewHeader, ScanEnded
from service.incremental import Incremental
from service.live import LiveScans
from service.metrics import Metrics
from service.preprocess import estimated_early
from service.protocol import ScanStart
from service.publish import PublishChannel, Publisher
from service.sinks import ScanDescription, SliceBatch
from service.sinogram import MIN_ANGLES, CompletedScan, ScanBuffer
from service.stage import StageThread
from workers.fbp import FBP
from workers.filters import angle_weights
from workers.finite import zero_non_finite_
from workers.rows import theta_tensor

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often an idle preview thread looks at the stop flag
BUSY_POLL_S = 0.05  # how often it looks whether the reconstruct loop is done, to render
ENDED_KEPT = 64  # scan_ids whose previews are over, remembered to drop late snapshots
# The XZ preview from the incremental accumulators finishes every row's slice at once: only
# for scans whose slices fit in this (48 rows of 512 x 512 take 48 MiB)
VERTICAL_MAX_BYTES = 64 << 20


def preview_rows(settings: PreviewSettings, rows: int) -> tuple[int, ...]:
    """The detector rows previewed in a scan of `rows`: those configured that exist, or the
    middle and the rows a quarter from each end."""
    if settings.rows:
        return tuple(row for row in settings.rows if row < rows)
    return tuple(sorted({rows // 4, rows // 2, (3 * rows) // 4}))


@dataclass(frozen=True)
class Snapshot:
    """The previewed rows of a scan's projections received so far: `sinograms` (k, A, cols)
    float32, an own copy, at `theta` (A,): every angle of the scan, those not received yet
    zero and those received weighted so that the FBP at `theta` is that of the `angles`
    received alone (so one geometry serves all of a scan's previews); the centre as it was
    when taken (the preview thread asks `LiveScans` for a newer one while the scan is live)."""

    scan_id: str
    rows: int
    row_index: tuple[int, ...]
    sinograms: torch.Tensor
    theta: np.ndarray
    angles: int
    n_angles: int
    t_last_projection: float
    center: float
    center_source: str


@dataclass(frozen=True)
class Rerender:
    """Render scan `scan_id`'s latest snapshot again (its centre changed)."""

    scan_id: str


@dataclass
class _Due:
    """The tap's bookkeeping of one scan."""

    row_index: tuple[int, ...]
    t_snapshot: float = float("-inf")  # monotonic
    angles: int = 0  # in the last snapshot


class Previewer(StageThread):
    """Renders and publishes previews on its own thread (`preview`).

    `submit` and `rerender` are called from other threads (the ingest's tap, the HTTP
    threads through `LiveScans`) and never block. The preview thread owns its reconstructor
    and publish channel, and keeps the latest snapshot of each scan (re-rendered when its
    centre changes). It is also a `SliceSink` of the reconstruct loop (`begin`, `write`,
    `end`, on the loop's thread, cheap): `begin` ends a scan's previews and teaches
    `LiveScans` the centre it is reconstructed about.
    """

    def __init__(
        self,
        settings: PreviewSettings,
        worker: WorkerSettings,
        device: torch.device,
        publisher: Publisher,
        live: LiveScans,
        metrics: Metrics,
        incremental: Incremental | None = None,
    ) -> None:
        """`incremental`: previews of its scans are read from their accumulators."""
        super().__init__("preview", metrics)
        self.incremental = incremental
        self.settings = settings
        self.publisher = publisher
        self.live = live
        self.fbp = FBP(device, filter_name=worker.filter_name, circle_mask=worker.circle_mask)
        self._queue: queue.Queue[Snapshot | Rerender] = queue.Queue(settings.queue_items)
        self._put = threading.Lock()  # producers: the ingest and HTTP threads
        self._ended: OrderedDict[str, None] = OrderedDict()  # under `_put`
        self._latest: dict[str, Snapshot] = {}  # the preview thread's
        self._vertical_at: dict[str, float] = {}  # the preview thread's: monotonic, last XZ
        # complete scans handed to the reconstruct loop and not ended there (under `_put`):
        # while there are any, previews wait (they would take compute from the loop, from
        # the scan's preprocessing on), and a render stops between rows
        self._finals: set[str] = set()  # scans handed to the loop and not ended yet
        live.on_change(self.rerender)
        if incremental is not None:  # a block folded in: the scan's preview has more angles
            incremental.on_fold(self.rerender)

    # ---- producers (any thread) -------------------------------------------------------------

    def submit(self, item: Snapshot | Rerender) -> None:
        """Queue `item`; when the queue is full the oldest item waiting is dropped for it."""
        with self._put:
            while True:
                try:
                    self._queue.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        continue
                    self.metrics.previews_dropped.labels("queue_full").inc()

    def rerender(self, scan_id: str) -> None:
        self.submit(Rerender(scan_id))

    def ended(self, scan_id: str) -> bool:
        with self._put:
            return scan_id in self._ended

    def end_previews(self, scan_id: str) -> None:
        """No more previews of `scan_id` (its final slices began, or it failed)."""
        with self._put:
            self._ended[scan_id] = None
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)

    # ---- SliceSink (the reconstruct loop's thread) -----------------------------------------

    def begin(self, scan: ScanDescription) -> None:
        self.end_previews(scan.scan_id)
        self.live.learn(scan.cols, scan.center)

    def write(self, batch: SliceBatch) -> None:
        pass

    def end(self, outcome: ScanEnded) -> None:
        self.end_previews(outcome.scan_id)  # also a scan that failed before `begin`
        with self._put:  # only scans counted in: a continuous scan's windows never were
            self._finals.discard(outcome.scan_id)

    def final_queued(self, scan_id: str) -> None:
        """A complete scan goes to the reconstruct loop (the ingest thread, as it hands it
        over): previews wait until the loop has ended it."""
        with self._put:
            self._finals.add(scan_id)

    @property
    def loop_busy(self) -> bool:
        with self._put:
            return bool(self._finals)

    # ---- the preview thread -----------------------------------------------------------------

    def _run(self) -> None:
        channel = self.publisher.channel()
        pending: set[str] = set()  # scans whose latest snapshot waits to be rendered
        try:
            while not self.stopping:
                self._forget_ended(pending)
                busy = self.loop_busy
                try:
                    if pending and not busy:
                        item = self._queue.get_nowait()
                    else:
                        item = self._queue.get(timeout=BUSY_POLL_S if pending else POLL_S)
                except queue.Empty:
                    if pending and not busy:
                        # the oldest data first: its viewers have waited longest
                        scan_id = min(pending, key=lambda s: self._latest[s].t_last_projection)
                        pending.discard(scan_id)
                        snapshot = self._latest[scan_id]
                        what = f"a preview of scan_id={scan_id}"
                        self.guarded(what, self._render, snapshot, channel, pending)
                    continue
                self.guarded(f"a preview of scan_id={item.scan_id}", self._take, item, pending)
        finally:
            channel.close()

    def _forget_ended(self, pending: set[str]) -> None:
        """Drop the latest snapshots of scans whose previews are over (completed, failed)."""
        for scan_id in [s for s in self._latest if self.ended(s)]:
            del self._latest[scan_id]
            self._vertical_at.pop(scan_id, None)
            if scan_id in pending:
                pending.discard(scan_id)
                self.metrics.previews_dropped.labels("final_begun").inc()

    def _take(self, item: Snapshot | Rerender, pending: set[str]) -> None:
        """File a queued item: the scan's latest snapshot, to be rendered (again)."""
        if self.ended(item.scan_id):
            if isinstance(item, Snapshot):
                self.metrics.previews_dropped.labels("final_begun").inc()
            return
        if isinstance(item, Snapshot):
            self._latest[item.scan_id] = item
        if item.scan_id in self._latest:
            pending.add(item.scan_id)

    def _render(self, snapshot: Snapshot, channel: PublishChannel, pending: set[str]) -> None:
        """Reconstruct and publish the snapshot's rows one at a time; stopped between rows
        when the reconstruct loop begins a scan (back to `pending` for when it is done) or
        this scan's final slices began (dropped)."""
        live = self.live.get(snapshot.scan_id)
        center, source = (
            (live.center, live.source)
            if live is not None
            else (snapshot.center, snapshot.center_source)
        )
        header = PreviewHeader(
            snapshot.scan_id,
            snapshot.rows,
            0,
            snapshot.angles,
            snapshot.n_angles,
            center,
            source,
            snapshot.t_last_projection,
        )
        if self._render_folded(snapshot, header, channel):
            return
        theta = theta_tensor(snapshot.theta)
        rendered: dict[int, np.ndarray] = {}
        try:
            for i, row in enumerate(snapshot.row_index):
                if self.ended(snapshot.scan_id):
                    return
                if self.loop_busy:
                    pending.add(snapshot.scan_id)
                    return
                with torch.inference_mode():
                    data = self.fbp.reconstruct(snapshot.sinograms[i : i + 1], theta, center)
                    zero_non_finite_(data)
                    host = data[0].cpu().numpy()
                self._send(channel, replace(header, index=row), host, snapshot)
                rendered[row] = host
        finally:
            self.fbp.release()
        if sorted(rendered) == list(range(snapshot.rows)):  # every row is previewed
            self._send_vertical(channel, header, np.stack([rendered[r] for r in sorted(rendered)]))

    def _send(
        self, channel: PublishChannel, header: PreviewHeader, data: np.ndarray, snapshot: Snapshot
    ) -> None:
        published = channel.send_preview(header, data)
        self.metrics.previews.inc()
        # per preview message: a render cut short by the loop still counts what it sent
        self.metrics.preview_latency.observe(max(0.0, published - snapshot.t_last_projection))

    def _send_vertical(
        self, channel: PublishChannel, header: PreviewHeader, slices: np.ndarray
    ) -> None:
        """The XZ preview: every row's slice (rows, N, N) cut at its middle slice row."""
        middle = slices.shape[1] // 2
        cut = np.ascontiguousarray(slices[:, middle, :])
        channel.send_preview(replace(header, index=middle, plane="xz"), cut)
        self.metrics.previews.inc()

    def _render_folded(
        self, snapshot: Snapshot, header: PreviewHeader, channel: PublishChannel
    ) -> bool:
        """Publish the snapshot's rows from the scan's incremental accumulators (the angles
        folded in so far), if it has them about this centre: no FBP to run here."""
        if self.incremental is None or self.ended(snapshot.scan_id):
            return False
        folded = self.incremental.preview(snapshot.scan_id, snapshot.row_index, header.center)
        if folded is None:
            return False
        slices, angles = folded
        if angles == 0:  # nothing folded in yet: the first block folded in re-renders
            return True
        zero_non_finite_(slices)
        host = slices.cpu().numpy()
        for i, row in enumerate(snapshot.row_index):
            self._send(channel, replace(header, index=row, angles=angles), host[i], snapshot)
        # every block folded in re-renders: the XZ cut (every row's slice finished, the cost of
        # a final FBP's end for gridding) at most rate_hz times a second, and with every angle
        n = snapshot.sinograms.shape[-1]  # the slices are cols x cols
        now = time.monotonic()
        last = self._vertical_at.get(snapshot.scan_id, -math.inf)
        due = now - last >= 1.0 / self.settings.rate_hz or angles == header.n_angles
        if snapshot.rows * n * n * 4 > VERTICAL_MAX_BYTES or not due:
            return True
        every_row = tuple(range(snapshot.rows))
        every = self.incremental.preview(snapshot.scan_id, every_row, header.center)
        if every is not None and every[1] > 0:  # every row in the accumulators
            self._vertical_at[snapshot.scan_id] = now
            zero_non_finite_(every[0])
            self._send_vertical(channel, replace(header, angles=every[1]), every[0].cpu().numpy())
        return True


class PreviewTap:
    """The ingest thread's side: keeps `LiveScans` in step with the scans and takes the
    snapshots the `previewer` renders (None: previews off, the live centre still works).
    Owned by the ingest thread; each call costs at most one snapshot's copy, and an error in
    one costs that snapshot (logged and counted under stage `preview`), never the message."""

    def __init__(
        self,
        settings: PreviewSettings,
        live: LiveScans,
        previewer: Previewer | None,
        early_center: Callable[[ScanBuffer], tuple[bool, float | None]] | None = None,
    ) -> None:
        self.settings = settings
        self.live = live
        self.previewer = previewer
        self.period = 1.0 / settings.rate_hz
        self._due: dict[str, _Due] = {}
        # scans whose centre may be estimated as their projections arrive
        # (`ScanPreprocessor.early_center`), until it is
        self.early_center = early_center
        self._centering: set[str] = set()

    def started(self, start: ScanStart) -> None:
        live = self.live.open(start)
        if self.early_center is not None and live.source in ("default", "previous"):
            self._centering.add(start.scan_id)
        rows = preview_rows(self.settings, start.rows)
        if self.previewer is not None and rows:
            self._due[start.scan_id] = _Due(rows)

    def frames(self, scan: ScanBuffer) -> None:
        """Projections (or the references that make raw ones usable) arrived: a snapshot when
        one is due; the scan's centre once its first half-turn is in."""
        if scan.start.scan_id in self._centering and self.early_center is not None:
            tried, center = self.early_center(scan)
            if tried:
                self._centering.discard(scan.start.scan_id)
            if center is not None:
                self.live.estimated(scan.start.scan_id, center)
        due = self._due.get(scan.start.scan_id)
        if due is None or self.previewer is None:
            return
        usable = scan.received & ~scan.raw
        angles = int(usable.sum())
        if angles < MIN_ANGLES or angles <= due.angles:
            return
        now = time.monotonic()
        if angles < scan.start.n_angles and now - due.t_snapshot < self.period:
            return
        self.previewer.guarded(
            f"a preview snapshot of scan_id={scan.start.scan_id}",
            self._snapshot,
            scan.start,
            due.row_index,
            scan.sinogram,
            np.flatnonzero(usable),
            scan.theta,
            scan.t_last_projection,
        )
        due.t_snapshot, due.angles = now, angles

    def tick(self, scans: Iterable[ScanBuffer]) -> None:
        """The ingest's poll: the live scans' projections not previewed yet, when a snapshot
        is due (a DAQ that pauses mid-scan still sees its latest projections)."""
        for scan in scans:
            self.frames(scan)

    def completed(self, scan: CompletedScan) -> CompletedScan:
        """The scan is complete: a last snapshot if angles came since the previous one, and
        the scan with the operator's centre, if one was set."""
        scan_id = scan.start.scan_id
        due = self._due.pop(scan_id, None)
        angles = scan.sinogram.shape[1]
        if due is not None and self.previewer is not None and angles > due.angles:
            self.previewer.guarded(
                f"a preview snapshot of scan_id={scan_id}",
                self._snapshot,
                scan.start,
                due.row_index,
                scan.sinogram,
                np.arange(angles),
                scan.theta,
                scan.t_last_projection,
            )
        if self.previewer is not None:
            self.previewer.final_queued(scan_id)
        self._centering.discard(scan_id)
        live = self.live.close(scan_id)
        if live is not None and live.source == "estimated":
            return estimated_early(scan, live.center)
        if live is None or not live.operator:
            return scan
        log.info("scan_id=%s reconstructed about the operator's centre %.3f", scan_id, live.center)
        return replace(scan, start=replace(scan.start, center=live.center), center=live.center)

    def failed(self, start: ScanStart) -> None:
        self._due.pop(start.scan_id, None)
        self._centering.discard(start.scan_id)
        self.live.close(start.scan_id)
        if self.previewer is not None:
            self.previewer.end_previews(start.scan_id)

    def _snapshot(
        self,
        start: ScanStart,
        rows: tuple[int, ...],
        sinogram: torch.Tensor,
        angles: np.ndarray,
        theta: np.ndarray,
        t_last_projection: float,
    ) -> None:
        """Submit a copy of `rows` of `sinogram` at its `angles` (indices into its angle
        axis, `theta` the same axis' angles), zero-filled and reweighted (`Snapshot`)."""
        assert self.previewer is not None
        device = sinogram.device
        picked = sinogram.index_select(0, torch.as_tensor(rows, device=device)).float()
        if len(angles) < picked.shape[1]:
            # FBP is a weighted sum over angles: angle i's share of the FBP of `angles` alone
            # is w_part[i] (`angle_weights` of those), of the FBP at every angle w_full[i]
            theta64 = theta_tensor(theta).double().numpy()  # the reconstructor's values
            ratio = angle_weights(theta64[angles]) / angle_weights(theta64)[angles]
            index = torch.as_tensor(angles, device=device)
            weights = torch.as_tensor(ratio, dtype=torch.float32, device=device)
            filled = torch.zeros_like(picked)  # angles not received are uninitialised memory
            filled[:, index] = picked[:, index] * weights[None, :, None]
            picked = filled
        live = self.live.get(start.scan_id)
        if live is None:  # not registered (cannot happen through the tap): the middle
            center, source = start.cols / 2, "default"
        else:
            center, source = live.center, live.source
        self.previewer.submit(
            Snapshot(
                start.scan_id,
                start.rows,
                rows,
                picked,
                np.asarray(theta),
                len(angles),
                start.n_angles,
                t_last_projection,
                center,
                source,
            )
        )
