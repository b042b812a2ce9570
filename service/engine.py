"""Engines: "reconstruct and denoise rows [first, stop) of this completed scan" on one device.

A scan's rows are cut into work units (`plan_units`). Each unit carries the rows it publishes,
[first, stop), and the rows it reconstructs, [lo, hi): those plus the denoiser's halo
(depth // 2 rows each side), widened to the loop's batch grid. An engine runs the reconstruct
loop's own conveyor (`Worker.reconstruct_rows`) over rows [lo, hi) and keeps [first, stop):
the same FBP batches and the same denoise batches as one device running the whole scan, so its
slices are bit for bit those of one device, whatever the FBP or the network does with a batch.

    unit edges:   k * unit_rows - halo   (unit_rows a multiple of batch_rows), 0 and rows
    lo:           the batch edge at or before first - halo;   hi: stop + halo (a batch edge)

Every engine denoises with one scale per scan, the one a single device takes from the scan's
first rows: a probe unit (`probe_unit`) measures it first, on one engine.

`RowEngine` is the computation (a reconstructor, a denoiser and their loop on one device);
`LocalEngine` runs one on a thread of this process, `service.ray_actors.RayEngine` in a Ray
actor. Both satisfy `Engine`, which the coordinator (`service.cluster.Spread`) drives.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np
import torch

from service.config import ModelSettings, PublishSettings, Settings, WorkerSettings
from service.events import ScanEnded
from service.metrics import Metrics
from service.protocol import ScanStart
from service.reconstruct import RowsDone, Worker
from service.sinks import ScanDescription, SliceBatch
from service.sinogram import CompletedScan
from workers.denoise import DenoiseEngine, load_denoiser
from workers.protocols import Denoiser, PreparableReconstructor, Reconstructor
from workers.rows import theta_tensor


@dataclass(frozen=True)
class WorkUnit:
    """Rows [first, stop) of a scan to publish, from rows [lo, hi) reconstructed."""

    index: int  # position in the scan (the probe: -1)
    first: int
    stop: int
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.stop - self.first


def plan_units(rows: int, batch_rows: int, halo: int, unit_rows: int) -> list[WorkUnit]:
    """A scan's rows as units of about `unit_rows` (rounded up to `batch_rows`), edges on the
    loop's denoise-batch grid (see the module's docstring)."""
    unit = batch_rows * max(1, math.ceil(unit_rows / batch_rows))
    edges = [0]
    k = 1
    while (edge := k * unit - halo) < rows:
        if edge > edges[-1]:
            edges.append(edge)
        k += 1
    edges.append(rows)
    units = []
    for index, (first, stop) in enumerate(itertools.pairwise(edges)):
        lo = max(0, (first - halo) // batch_rows * batch_rows)
        units.append(WorkUnit(index, first, stop, lo, min(rows, stop + halo)))
    return units


def probe_unit(rows: int, batch_rows: int, halo: int) -> WorkUnit:
    """The rows whose reconstruction one device measures its scale on: those reconstructed
    when its first denoise batch is ready. Publishes nothing."""
    hi = min(rows, batch_rows * math.ceil((halo + 1) / batch_rows))
    return WorkUnit(-1, 0, 0, 0, hi)


@dataclass(frozen=True)
class ScanPart:
    """Rows [unit.lo, unit.hi) of a completed scan: what travels to an engine."""

    start: ScanStart  # rows: hi - lo
    sinogram: torch.Tensor | np.ndarray  # (hi - lo, angles, cols) line integrals
    theta: np.ndarray
    center: float
    # the scan's other per-row tensors, rows [lo, hi) (e.g. the flat's photon counts the
    # no-harm guard reads), by their `CompletedScan` field name
    per_row: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, scan: CompletedScan, unit: WorkUnit) -> ScanPart:
        start = replace(scan.start, rows=unit.hi - unit.lo)
        per_row: dict[str, torch.Tensor | np.ndarray] = {
            f.name: value[unit.lo : unit.hi]
            for f in fields(scan)
            if f.name != "sinogram"
            and isinstance(value := getattr(scan, f.name), torch.Tensor)
            and value.dim() > 0
            and value.shape[0] == scan.start.rows
        }
        return cls(start, scan.sinogram[unit.lo : unit.hi], scan.theta, scan.center, per_row)

    def on_host(self) -> ScanPart:
        """The rows as numpy arrays (Ray's object store passes those without pickling)."""
        return replace(
            self,
            sinogram=_numpy(self.sinogram),
            per_row={name: _numpy(value) for name, value in self.per_row.items()},
        )

    def scan(self, device: torch.device) -> CompletedScan:
        """The part as a scan of hi - lo rows on `device`."""
        tensors: dict[str, Any] = {
            name: _tensor(value, device)
            for name, value in {"sinogram": self.sinogram, **self.per_row}.items()
        }
        sinogram = tensors.pop("sinogram")
        scan = CompletedScan(self.start, sinogram, self.theta, self.center, 0, 0, 0, 0.0, 0.0)
        return replace(scan, **tensors) if tensors else scan

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays on the host (0 for tensors on a device)."""
        arrays = [self.sinogram, *self.per_row.values()]
        return sum(int(a.nbytes) for a in arrays if isinstance(a, np.ndarray))


@dataclass(frozen=True)
class UnitResult:
    """A unit's slices, rows numbered in the scan, in the order the loop delivered them."""

    unit: WorkUnit
    batches: list[SliceBatch]
    done: RowsDone
    seconds: float  # on the engine, compute only
    # the engine built the scan's FBP geometry for this unit: it was not prepared ahead
    # (`RowEngine.prepare`, at scan_start) nor left by an earlier unit
    geometry_built: bool = False


class RowEngine:
    """One device's reconstructor and denoiser, run by the reconstruct loop's conveyor over
    work units. Also the conveyor's sink, collecting its batches.

    Threading: one thread at a time calls `run` (an engine's thread or actor); the
    reconstructor's `prepare` may be called from elsewhere, as ever.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        publish_recon: bool,
        reconstructor: Reconstructor,
        denoiser: Denoiser | None,
        loop_options: dict[str, Any] | None = None,
    ) -> None:
        """`loop_options`: further keyword arguments of the loop (`Worker`), as the service
        gives its own loop (`loop_options` below)."""
        self.device = reconstructor.device
        self.reconstructor = reconstructor
        self.denoiser = denoiser
        self._batches: list[SliceBatch] = []
        # the loop's conveyor, with its own metrics: the coordinator counts what is published
        self._loop = Worker(
            settings,
            PublishSettings(recon=publish_recon),
            queue.Queue(),
            reconstructor,
            denoiser,
            [self],
            Metrics(),
            **(loop_options or {}),
        )
        self._release = (
            reconstructor.release
            if isinstance(reconstructor, PreparableReconstructor)
            else lambda: None
        )

    def run(self, part: ScanPart, unit: WorkUnit, scale: float | None) -> UnitResult:
        """Rows [unit.lo, unit.hi) of a scan (`part`) through the loop; rows [first, stop)
        back, numbered in the scan."""
        t0 = time.perf_counter()
        scan = part.scan(self.device)
        self._batches = []
        try:
            # what the first FBP batch would build, built (or found) here: so it is known
            built = self._prepare(theta_tensor(part.theta), part.center, part.start.cols)
            # the unit counts NaN/inf in the rows it publishes only: a halo row is counted by
            # the unit that owns it, once, as on one device
            owned = (unit.first - unit.lo, unit.stop - unit.lo)
            done = self._loop.reconstruct_rows(scan, scale, owned)
        finally:
            self._release()
        batches = [kept for batch in self._batches if (kept := _crop(batch, unit)) is not None]
        self._batches = []
        return UnitResult(unit, batches, done, time.perf_counter() - t0, built)

    def prepare(self, theta: np.ndarray, center: float, cols: int) -> bool:
        """Build a scan's FBP geometry ahead of its units (`service.prepare`, at scan_start);
        callable from any thread, also while `run` runs. True if this call built it."""
        return self._prepare(theta_tensor(theta), center, cols)

    def _prepare(self, theta: torch.Tensor, center: float, cols: int) -> bool:
        if not isinstance(self.reconstructor, PreparableReconstructor):
            return False
        return self.reconstructor.prepare(theta, center, cols)

    def warm_up(self) -> None:
        """One small scan through the conveyor, so the first unit pays no start-up cost."""
        rows, angles, cols = 1, 32, 64
        start = ScanStart("warm-up", 0, rows, cols, angles, "float32")
        theta = np.linspace(0, np.pi, angles, endpoint=False)
        part = ScanPart(start, torch.zeros((rows, angles, cols)), theta, cols / 2)
        self.run(part, WorkUnit(0, 0, rows, 0, rows), None)

    # the loop's sink: only `write` carries anything
    def begin(self, scan: ScanDescription) -> None:
        pass

    def write(self, batch: SliceBatch) -> None:
        self._batches.append(batch)

    def end(self, outcome: ScanEnded) -> None:
        pass


def _crop(batch: SliceBatch, unit: WorkUnit) -> SliceBatch | None:
    """`batch` (rows numbered from unit.lo) cut to rows [unit.first, unit.stop) of the scan:
    its slices and whatever else it carries per slice (e.g. the no-harm guard's verdict)."""
    first, count = batch.first + unit.lo, len(batch.slices)
    i0, i1 = max(0, unit.first - first), min(count, unit.stop - first)
    if i1 <= i0:
        return None
    per_slice: dict[str, Any] = {
        f.name: value[i0:i1]
        for f in fields(batch)
        if isinstance(value := getattr(batch, f.name), np.ndarray) and len(value) == count
    }
    return replace(batch, first=first + i0, **per_slice)


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else value


def _tensor(value: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():
        # rows from Ray's object store are a read-only mapping: the loop only reads them
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.as_tensor(value).to(device)


class EngineLost(Exception):
    """The engine (a Ray actor, its node) went away: its unit is re-run on another."""


class Engine(Protocol):
    """Where the coordinator sends work units. `submit` never blocks for the computation; the
    future fails with `EngineLost` when the engine is gone, with anything else when the
    computation failed."""

    @property
    def name(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    def submit(self, part: ScanPart, unit: WorkUnit, scale: float | None) -> Future[UnitResult]: ...

    def prepare(self, theta: np.ndarray, center: float, cols: int) -> Future[bool]:
        """Build a scan's FBP geometry ahead of its units, beside the unit running (never queued
        behind it): True once built, False when it was there already (or the engine's FBP keeps
        no geometry)."""
        ...

    def lost(self) -> None:
        """The coordinator saw this engine fail: send it nothing more."""
        ...

    def close(self) -> None: ...


class LocalEngine:
    """A `RowEngine` on a thread of this process, one device. Units queue in submission order
    (the coordinator bounds how many)."""

    def __init__(self, name: str, engine: RowEngine) -> None:
        self._name = name
        self.engine = engine
        self._queue: queue.Queue[
            tuple[ScanPart, WorkUnit, float | None, Future[UnitResult]] | None
        ] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self._name

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, part: ScanPart, unit: WorkUnit, scale: float | None) -> Future[UnitResult]:
        future: Future[UnitResult] = Future()
        self._queue.put((part, unit, scale, future))
        return future

    def prepare(self, theta: np.ndarray, center: float, cols: int) -> Future[bool]:
        """On the caller's thread (the reconstructor's `prepare` is thread-safe)."""
        future: Future[bool] = Future()
        try:
            future.set_result(self.engine.prepare(theta, center, cols))
        except Exception as exc:  # the caller's to log and count
            future.set_exception(exc)
        return future

    def lost(self) -> None:
        pass  # a thread of ours is not lost; its errors fail the scan

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            part, unit, scale, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.engine.run(part, unit, scale))
            except BaseException as exc:  # handed to the coordinator, which fails the scan
                future.set_exception(exc)


def loop_options(settings: Settings) -> dict[str, Any]:
    """What an engine's loop takes beyond its worker settings, from the service's settings:
    the no-harm guard's section where the settings have one (it checks each denoised slice
    against its own sinogram rows, so it runs on the engine, on the unit's rows)."""
    guard = getattr(settings, "guard", None)
    return {} if guard is None else {"guard": guard}


def load_model(settings: ModelSettings, device: torch.device) -> DenoiseEngine | None:
    """The configured denoiser on `device`, as the service loads its own (None: disabled)."""
    if not settings.enabled:
        return None
    return load_denoiser(
        settings.path,
        device,
        precision=settings.precision,
        memory_limit_bytes=settings.memory_bytes,
        field_width=settings.field_width,
    )
