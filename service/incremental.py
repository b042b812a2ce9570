"""Incremental reconstruction: a scan's FBP done block by block while its projections arrive.

    [ingest thread] scan_started / scan_frames / scan_failed --blocks ready--> [incremental thread]
        folds each complete block of angles into the scan's accumulators (workers.incremental)
    [worker thread] take(scan) at the scan's turn: the accumulators, and the blocks not folded
        in yet, become its slices batch by batch (`Partial.slices`)

A block (`incremental.block_angles` consecutive angle indices) is ready once all its projections
are stored flat-field corrected. The incremental thread folds ready blocks in, oldest scan and
lowest block first; what it has not reached when the scan completes (in a burst, most of it) the
reconstruct loop folds in itself, so the slices are the same either way: the FBP of the complete
sinogram by the loop's method (direct or gridding), to float rounding. The ingest never waits:
readiness is a mark in the scan's state, not a queued copy.

A scan is reconstructed incrementally only when that gives its end-of-scan slices:
- its centre is known at scan_start (declared, or `preprocess.center` a number). A centre
  estimated from the data (`preprocess.center = "auto"` and none declared) is only known at
  the scan's end: such scans take the end-of-scan path;
- no whole-sinogram preprocessing (stripe removal, half-acquisition stitching);
- darks and flats come before the projections (protocol v1): a projection stored raw
  (references incomplete) ends the scan's incremental work, logged;
- at the end every declared projection arrived (the angle weights are the whole scan's) and the
  centre is still the one folded in with (an operator's live centre moves it: end-of-scan path).
Otherwise the scan goes through the end-of-scan path as without this stage, and the log says
why. Accumulator memory, for all scans being received together, is bounded by
`incremental.max_bytes`: a scan's first rows that fit are incremental, the rest wait for the end.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from service.config import IncrementalSettings, PreprocessSettings, WorkerSettings
from service.metrics import Metrics
from service.protocol import ScanStart
from service.sinogram import CompletedScan, ScanBuffer
from service.stage import StageThread
from workers.incremental import BlockPlan, DirectSum, GriddingSum, accumulator_bytes, angle_sum
from workers.recon import AutoFBP
from workers.rows import theta_tensor

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often an idle incremental thread looks at the stop flag
PLANS_KEPT = 2  # block plans (geometries) kept for the next scans of the same geometry


@dataclass
class _Scan:
    """One scan's incremental state. `lock` is held while a block is folded in; `ready`,
    `closed` are read and written under the stage's `_lock`."""

    start: ScanStart
    center: float
    method: str
    rows: int  # the scan's first `rows` rows are incremental
    nbytes: int  # its accumulators' share of incremental.max_bytes
    blocks: int
    block: int
    queued: np.ndarray  # (blocks,) bool: marked ready (or folded in)
    ready: list[int] = field(default_factory=list)  # blocks waiting for the thread
    done: set[int] = field(default_factory=set)  # blocks folded in
    sinogram: torch.Tensor | None = None  # the ScanBuffer's, once projections arrived
    plan: BlockPlan | None = None
    accumulator: torch.Tensor | None = None
    closed: bool = False  # taken by the loop, failed or given up: fold in nothing more
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Partial:
    """A scan's incremental result, handed to the reconstruct loop (its thread only): rows
    [0, rows) come from `slices`, the others from the loop's reconstructor."""

    scan_id: str
    rows: int
    plan: BlockPlan
    accumulator: torch.Tensor
    remaining: list[int]  # blocks the loop folds in
    sinogram: torch.Tensor
    engine: DirectSum | GriddingSum  # the loop's own (its FFT buffers)

    def slices(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) (r1 <= rows), float32 (r1 - r0, N, N) on the accumulators' device."""
        first = r0 - r0 % 2 if self.plan.method == "gridding" else r0  # grids hold row pairs
        last = min(r1 + r1 % 2, self.rows) if self.plan.method == "gridding" else r1
        accumulator = self.engine.rows_of(self.accumulator, first, last)
        rows = self.sinogram[first:last].float()
        return self.engine.finish(self.plan, accumulator, rows, self.remaining)[r0 - first :]


class Incremental(StageThread):
    """The incremental stage on its own thread (`incremental`).

    The tap side (`scan_started`, `scan_frames`, `scan_failed`) runs on the ingest thread and
    never blocks beyond a short lock; `take` runs on the reconstruct loop's thread and waits at
    most for the block being folded in (or, for a scan's first block, its plan being built).
    The thread owns its `AngleSum` (FFT buffers); the loop gets its own for the remainder.
    Plans are immutable and shared.
    """

    def __init__(
        self,
        settings: IncrementalSettings,
        worker: WorkerSettings,
        preprocess: PreprocessSettings,
        device: torch.device,
        metrics: Metrics,
        known_center: Callable[[ScanStart], float | None],
    ) -> None:
        super().__init__("incremental", metrics)
        self.settings = settings
        self.worker = worker
        self.preprocess = preprocess
        self.device = device
        self.known_center = known_center
        self._lock = threading.Condition()
        self._scans: dict[str, _Scan] = {}
        self._held = 0  # accumulator bytes of the scans in `_scans`
        self._plans: OrderedDict[tuple[object, ...], BlockPlan] = OrderedDict()
        self._plans_lock = threading.Lock()
        self._engines: dict[str, DirectSum | GriddingSum] = {}  # the thread's, by method
        self._finishers: dict[str, DirectSum | GriddingSum] = {}  # the loop's, by method
        self._previewers: dict[str, DirectSum | GriddingSum] = {}  # the preview thread's
        self._listeners: list[Callable[[str], None]] = []  # told of each block folded in
        metrics.incremental_bytes.set_function(lambda: self._held)

    def on_fold(self, listener: Callable[[str], None]) -> None:
        """Call `listener(scan_id)` (on the incremental thread; it must not block) after each
        block folded in: the previewer re-renders the scan from its accumulators."""
        self._listeners.append(listener)

    # ---- the tap (ingest thread) -----------------------------------------------------------

    def scan_started(self, start: ScanStart) -> None:
        """A scan began: decide whether it is incremental, and reserve its accumulators."""
        why = self._refusal(start)
        if why:
            log.info("scan_id=%s reconstructed at scan end: %s", start.scan_id, why)
            return
        center = self.known_center(start)
        assert center is not None
        method = self._method(start)
        grid = _grid(method, start.cols)
        per_row = accumulator_bytes(method, 1, start.cols, grid)
        with self._lock:
            room = max(0, self.settings.max_bytes - self._held)
            rows = min(start.rows, room // per_row)
            if method == "gridding" and rows < start.rows:
                rows -= rows % 2  # grids hold rows in pairs
            if rows <= 0:
                log.info(
                    "scan_id=%s reconstructed at scan end: incremental.max_bytes=%d holds no "
                    "more rows (%d bytes held)",
                    *(start.scan_id, self.settings.max_bytes, self._held),
                )
                return
            nbytes = accumulator_bytes(method, rows, start.cols, grid)
            block = self.settings.block_angles
            blocks = -(-start.n_angles // block)
            self._scans[start.scan_id] = _Scan(
                start, center, method, rows, nbytes, blocks, block, np.zeros(blocks, dtype=bool)
            )
            self._held += nbytes
        if rows < start.rows:
            log.info(
                "scan_id=%s rows 0..%d incremental, %d..%d at scan end (incremental.max_bytes)",
                *(start.scan_id, rows - 1, rows, start.rows - 1),
            )

    def scan_frames(self, scan: ScanBuffer) -> None:
        """Projections arrived: mark the blocks now complete as ready."""
        with self._lock:
            state = self._scans.get(scan.start.scan_id)
            if state is None or state.closed:
                return
            if scan.raw.any():
                self._give_up(state, "projections arrived before the darks and flats")
                return
            state.sinogram = scan.sinogram
            received, fresh = scan.received, []
            for b in np.flatnonzero(~state.queued):
                a0, a1 = b * state.block, min(len(received), (b + 1) * state.block)
                if received[a0:a1].all():
                    fresh.append(int(b))
            if fresh:
                state.queued[fresh] = True
                state.ready.extend(fresh)
                self._lock.notify()

    def scan_failed(self, start: ScanStart) -> None:
        with self._lock:
            state = self._scans.get(start.scan_id)
            if state is not None:
                self._drop(state)

    # ---- the reconstruct loop (worker thread) ------------------------------------------------

    def take(self, scan: CompletedScan) -> Partial | None:
        """The scan's incremental result for the loop, or None: the end-of-scan path (the
        scan was not incremental, or the completed scan is not the one folded in)."""
        scan_id = scan.start.scan_id
        with self._lock:
            state = self._scans.get(scan_id)
            if state is None:  # not incremental, or given up (logged then)
                self.metrics.incremental_scans.labels("end_of_scan").inc()
                return None
            self._drop(state)
        with state.lock:  # the block being folded in, if any, ends first
            why = self._mismatch(state, scan)
            if why or state.plan is None or state.accumulator is None:
                why = why or "no block was folded in before the scan's turn"
                log.info("scan_id=%s reconstructed at scan end: %s", scan_id, why)
                self.metrics.incremental_scans.labels("end_of_scan").inc()
                return None
            finisher = self._finisher(state.method)
            remaining = [b for b in range(state.blocks) if b not in state.done]
            self.metrics.incremental_scans.labels("incremental").inc()
            self.metrics.incremental_blocks.labels("scan_end").inc(len(remaining))
            log.info(
                "scan_id=%s incremental: %d of %d blocks folded in while it arrived",
                *(scan_id, len(state.done), state.blocks),
            )
            return Partial(
                scan_id,
                state.rows,
                state.plan,
                state.accumulator,
                remaining,
                scan.sinogram,
                finisher,
            )

    # ---- previews (the preview thread) ------------------------------------------------------

    def preview(
        self, scan_id: str, rows: tuple[int, ...], center: float
    ) -> tuple[torch.Tensor, int] | None:
        """Rows `rows` of scan `scan_id` from the angles folded in so far, (k, N, N) float32,
        and how many angles those are (0 and no slices: none yet); None when the scan is not
        incremental here, a row is beyond its accumulators or `center` is not theirs (the
        preview then renders from its snapshot). Each angle has its weight in the whole scan: for a
        scan arriving in angle order that is the FBP of the angles folded in alone."""
        with self._lock:
            state = self._scans.get(scan_id)
        if state is None or any(row >= state.rows for row in rows) or center != state.center:
            return None
        with state.lock:
            if state.closed:
                return None
            if not state.done or state.plan is None or state.accumulator is None:
                return torch.empty(0), 0  # the first block folded in re-renders
            assert state.sinogram is not None
            engine = self._previewers.setdefault(state.method, self._make(state.method))
            slices = []
            for row in rows:  # a row pair's grid for gridding; no remaining block to read
                first = row - row % 2 if state.method == "gridding" else row
                last = min(row + 1 + (row + 1) % 2, state.rows)
                last = last if state.method == "gridding" else row + 1
                grids = engine.rows_of(state.accumulator, first, last)
                empty = state.sinogram[first:last, :0]
                slices.append(engine.finish(state.plan, grids, empty, [])[row - first])
            angles = sum(stop - first for first, stop in map(state.plan.span, state.done))
        return torch.stack(slices), angles

    def forget(self, scan_id: str) -> None:
        """The loop is done with the scan (or failed it before `take`): free its budget."""
        with self._lock:
            state = self._scans.get(scan_id)
            if state is not None:
                self._drop(state)

    # ---- the incremental thread ----------------------------------------------------------------

    def _signal_stop(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _run(self) -> None:
        while not self.stopping:
            with self._lock:
                work = self._next()
                if work is None:
                    self._lock.wait(POLL_S)
                    continue
            state, b = work
            self.guarded(f"block {b} of scan_id={state.start.scan_id}", self._fold, state, b)
        with self._lock:
            for state in list(self._scans.values()):
                self._drop(state)

    def _next(self) -> tuple[_Scan, int] | None:
        """The lowest ready block of the oldest scan with one (under `_lock`)."""
        for state in self._scans.values():
            if state.ready and not state.closed:
                state.ready.sort()
                return state, state.ready.pop(0)
        return None

    def _fold(self, state: _Scan, b: int) -> None:
        with state.lock:
            if state.closed or state.sinogram is None:
                return
            engine = self._engine(state.method)
            if state.plan is None:
                state.plan = self._plan(engine, state)
                state.accumulator = engine.accumulator(state.plan, state.rows)
            a0, a1 = state.plan.span(b)
            rows = state.sinogram[: state.rows, a0:a1].float()
            assert state.accumulator is not None
            engine.add(state.plan, b, rows, state.accumulator)
            state.done.add(b)
        self.metrics.incremental_blocks.labels("arrival").inc()
        for listener in self._listeners:
            listener(state.start.scan_id)

    # ---- helpers ---------------------------------------------------------------------------

    def _refusal(self, start: ScanStart) -> str:
        """Why scan `start` cannot be incremental ("" if it can)."""
        if not self.settings.enabled:
            return ""  # off: nothing to say
        if self.known_center(start) is None:
            return "its centre is estimated from the data at scan end (preprocess.center=auto)"
        if self.preprocess.stripe_removal != "none":
            return "stripe removal needs the whole sinogram"
        if self.preprocess.half_acquisition:
            return "half-acquisition stitching needs the whole sinogram"
        return ""

    def _method(self, start: ScanStart) -> str:
        method = self.worker.fbp_method
        if method == "auto":
            return AutoFBP(self.device).method_for(start.n_angles, start.cols)
        return method

    def _mismatch(self, state: _Scan, scan: CompletedScan) -> str:
        start = state.start
        if scan.missing:
            return f"{scan.missing} of {start.n_angles} projections never arrived"
        if scan.center != state.center:
            return f"its centre moved from {state.center:g} to {scan.center:g}"
        if tuple(scan.sinogram.shape) != (start.rows, start.n_angles, start.cols):
            return "its preprocessing changed the sinogram's shape"
        if not np.array_equal(scan.theta, start.theta_array()):  # protocol v1.1 chunk theta
            return "its projections carried angles other than the scan_start's"
        return ""

    def _give_up(self, state: _Scan, why: str) -> None:
        """(under `_lock`)"""
        log.warning("scan_id=%s reconstructed at scan end: %s", state.start.scan_id, why)
        self._drop(state)

    def _drop(self, state: _Scan) -> None:
        """Forget the scan and free its share of the budget (under `_lock`)."""
        if self._scans.pop(state.start.scan_id, None) is not None:
            self._held -= state.nbytes
        state.closed = True
        state.ready.clear()

    def _engine(self, method: str) -> DirectSum | GriddingSum:
        if method not in self._engines:
            self._engines[method] = self._make(method)
        return self._engines[method]

    def _finisher(self, method: str) -> DirectSum | GriddingSum:
        if method not in self._finishers:
            self._finishers[method] = self._make(method)
        return self._finishers[method]

    def _make(self, method: str) -> DirectSum | GriddingSum:
        return angle_sum(method, self.device, self.worker.filter_name, self.worker.circle_mask)

    def _plan(self, engine: DirectSum | GriddingSum, state: _Scan) -> BlockPlan:
        """The block plan of the scan's geometry: kept for the next scans of the same one."""
        start = state.start
        theta64 = theta_tensor(start.theta_array()).double()  # the loop's values
        key = (state.method, theta64.numpy().tobytes(), state.center, start.cols, state.block)
        with self._plans_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = engine.plan(theta64, state.center, start.cols, state.block)
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        return plan


def _grid(method: str, cols: int) -> int:
    """The side of a gridding accumulator's grid (cols for direct)."""
    return GriddingSum("cpu").grid_size(cols) if method == "gridding" else cols
