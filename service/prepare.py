"""Geometry ahead of the data: each scan's reconstruction geometry is built as the scan starts.

The reconstructor's per-geometry state (the gridding method's spreading matrix: seconds on one
CPU core at 512 columns and more at 1024, docs/benchmarks.md) would otherwise be built by the
scan's first batch, after the last projection arrived: in the time an operator waits for the last
slice. Here it is built on its own thread while the projections stream in, and the reconstruct
loop finds it cached.

    [ingest thread] --scan_start--> bounded queue (drop, log) --> [prepare thread]
        --reconstructor.prepare()--> the reconstructor's geometry cache <-- [worker thread]

With several devices or Ray actors (`service.cluster`) the target is the coordinator: every
engine builds the geometry beside the units it runs (a Ray actor on a thread of its own), and
the prepare thread waits for all of them; the scan's units then find it cached
(`tomocast_cluster_unit_geometry_builds_total` counts those that did not).

Policy: drop. The ingest never waits for this thread; a scan whose start finds the queue full
(more scans starting than geometries can be built) is not prepared, and its first batch builds
its geometry as it would without this thread. A scan that fails (times out, is refused at its
end) before its turn is skipped. A failed prepare is one log line and
`tomocast_errors_total{stage="prepare"}`; the worker then builds the geometry itself.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from service.metrics import Metrics
from service.protocol import ScanStart
from service.stage import StageThread
from workers.rows import theta_tensor

log = logging.getLogger(__name__)


class Prepares(Protocol):
    """What builds a scan's geometry ahead: a `PreparableReconstructor`, or the coordinator of
    several engines (`service.cluster.Spread`). Thread-safe `prepare`; True if it built."""

    def prepare(self, theta: torch.Tensor, center: float, cols: int) -> bool: ...


class GeometryPreparer(StageThread):
    """Prepares each started scan's geometry on its own thread.

    Threading: `submit` and `cancel` are called from the ingest thread and never block;
    `start`, `stop` and `join` from the owner's. The reconstructor (or the engines) is shared
    with the worker thread through its thread-safe `prepare`
    (`workers.protocols.PreparableReconstructor`).
    """

    def __init__(
        self,
        reconstructor: Prepares,
        metrics: Metrics,
        pending: int,
        center_for: Callable[[ScanStart], float | None] = ScanStart.rotation_center,
    ) -> None:
        super().__init__("prepare", metrics)
        self.reconstructor = reconstructor
        # the centre a scan will be reconstructed about, None when only its data will tell
        # (service.preprocess.ScanPreprocessor.known_center): its geometry is not built ahead
        self.center_for = center_for
        self._starts: queue.Queue[ScanStart | None] = queue.Queue(pending)
        # the queued starts still wanted, by identity (a scan_id may come back): `cancel` takes
        # a failed scan's out, and the thread prepares only what it finds here
        self._wanted: dict[int, ScanStart] = {}
        self._lock = threading.Lock()

    def _signal_stop(self) -> None:
        """Skip what is pending and take nothing more; a build under way runs on (it cannot be
        interrupted): `join` says whether it has ended. Never blocks: a full queue means the
        thread is busy with an item, and it looks at the stop flag before taking the next."""
        with contextlib.suppress(queue.Full):
            self._starts.put_nowait(None)

    def submit(self, start: ScanStart) -> None:
        """Queue `start`'s geometry for building; drops it (logged) when the queue is full, and
        after `stop`."""
        if self.stopping:
            return
        with self._lock:
            try:
                self._starts.put_nowait(start)
            except queue.Full:
                log.info(
                    "scan_id=%s seq=%d geometry not prepared: %d scans' geometries "
                    "pending; its first batch builds it",
                    start.scan_id,
                    start.seq,
                    self._starts.maxsize,
                )
                self.metrics.geometry_prepares.labels("dropped").inc()
                return
            self._wanted[id(start)] = start

    def cancel(self, start: ScanStart) -> None:
        """`start`'s scan failed: if its geometry is still queued, it is not built."""
        with self._lock:
            self._wanted.pop(id(start), None)

    def _run(self) -> None:
        while not self.stopping and (start := self._starts.get()) is not None:
            with self._lock:
                wanted = self._wanted.pop(id(start), None) is start
            if not wanted:
                log.info(
                    "scan_id=%s seq=%d geometry not prepared: the scan failed first",
                    start.scan_id,
                    start.seq,
                )
                self.metrics.geometry_prepares.labels("cancelled").inc()
                continue
            what = f"scan_id={start.scan_id} seq={start.seq} geometry (the worker builds it)"
            if not self.guarded(what, self._prepare, start):
                self.metrics.geometry_prepares.labels("failed").inc()

    def _prepare(self, start: ScanStart) -> None:
        t0 = time.perf_counter()
        center = self.center_for(start)
        if center is None:
            log.info(
                "scan_id=%s seq=%d geometry not prepared: its centre comes from its data",
                start.scan_id,
                start.seq,
            )
            self.metrics.geometry_prepares.labels("deferred").inc()
            return
        theta = theta_tensor(start.theta_array())  # on the CPU: no copy from the device
        built = self.reconstructor.prepare(theta, center, start.cols)
        self.metrics.geometry_prepares.labels("built" if built else "cached").inc()
        if built:
            log.info(
                "scan_id=%s seq=%d geometry prepared: %d angles x %d cols in %.2f s",
                start.scan_id,
                start.seq,
                start.n_angles,
                start.cols,
                time.perf_counter() - t0,
            )
