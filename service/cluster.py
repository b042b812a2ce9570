"""Spreading a scan's rows over several engines: devices of this process, or Ray actors.

    [worker thread] Spread.reconstruct(scan)
        probe unit -> one engine -> the scan's denoise scale
        work units -> engines (at most `cluster.in_flight` each; none more than
                      engines x in_flight units ahead of the next to publish)
        results, merged in row order -> the loop's sinks (publish, archive)

Ingest, scan assembly, publish and archive stay in the service process; an engine only
reconstructs and denoises (`service.engine`). With `cluster.engine = "ray"` each engine is an
actor that owns a device (one GPU when the cluster has them, else one CPU) and its
reconstructor and denoiser; a unit's rows travel through Ray's object store. An actor that dies
has its units re-run on another engine (`tomocast_cluster_units_retried_total`): a unit's slices
are published only when the whole unit is back, so none is published twice.

The Ray side (actors, their engines, connecting to a cluster) is `service.ray_actors`; `ray` is
an optional dependency (`tomocast[ray]`), imported only when the engine is "ray".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace
from typing import Any

import torch

from models.artifact import ModelMetadata
from service.config import ClusterSettings, Settings
from service.engine import (
    Engine,
    EngineLost,
    LocalEngine,
    RowEngine,
    ScanPart,
    UnitResult,
    WorkUnit,
    load_model,
    loop_options,
    plan_units,
    probe_unit,
)
from service.errors import ConfigError, TomocastError
from service.guard import Verdict, record
from service.metrics import Metrics
from service.reconstruct import RowsDone
from service.sinks import SliceBatch
from service.sinogram import CompletedScan
from workers.protocols import Denoiser, Reconstructor
from workers.recon import make_reconstructor

log = logging.getLogger(__name__)


class ClusterError(TomocastError):
    """No engine is left to run a scan's rows."""


# how long the prepare thread waits for the engines to build a scan's geometry (a build takes
# seconds; one that takes longer goes on, and the units find it cached or wait for it)
PREPARE_WAIT_S = 120.0


class ClusterModel:
    """The denoiser as the cluster's actors loaded it, seen from the service process: its name,
    depth, metadata and precision (for slice headers, the archive, /metrics, the halo), without
    the network, which only the actors load and run. The loop takes it as its `Denoiser` for
    that bookkeeping only: with the rows on the actors it never denoises, and `scale_for` and
    `denoise` raise."""

    def __init__(self, metadata: ModelMetadata, precision: str, device: torch.device) -> None:
        self.metadata, self.precision, self._device = metadata, precision, device

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def depth(self) -> int:
        return self.metadata.depth

    @property
    def device(self) -> torch.device:
        """The actors' device type (cuda when the cluster gave them GPUs)."""
        return self._device

    def scale_for(self, slices: torch.Tensor) -> float:
        raise ClusterError("the denoiser runs on the cluster's actors, not in the service")

    def denoise(self, stack: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        raise ClusterError("the denoiser runs on the cluster's actors, not in the service")


# starts an engine in the place of the lost one at an index: the engine, and a future that is
# done when it is ready (failed when it did not start)
Restart = Callable[[int], tuple[Engine, "Future[Any]"]]


@dataclass
class _Slot:
    engine: Engine
    label: str  # its `worker` label in the metrics: its index
    in_flight: int = 0
    starting: Future[Any] | None = None  # a replacement engine being started
    replaced: int = 0  # replacements in a row without a unit completed

    @property
    def ready(self) -> bool:
        """Its engine takes units: alive, and started."""
        if not self.engine.alive:
            return False
        start = self.starting
        return start is None or (start.done() and not start.cancelled() and not start.exception())


class Spread:
    """The coordinator (`service.reconstruct.RowSpread`): a scan's work units over `engines`,
    results to the loop's sinks in row order. `reconstruct` is called from the loop's thread
    only, and only it changes the engines (a lost one replaced by `restart`, when given, at
    most `settings.replacements` times in a row); `prepare` (the prepare thread) reads them.
    Owns the engines (closed by `close`)."""

    def __init__(
        self,
        engines: list[Engine],
        batch_rows: int,
        halo: int,
        denoised: bool,
        settings: ClusterSettings,
        metrics: Metrics,
        on_close: Callable[[], None] = lambda: None,
        restart: Restart | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self._slots = [_Slot(engine, str(i)) for i, engine in enumerate(engines)]
        self.batch_rows, self.halo = batch_rows, halo
        self.denoised = denoised  # the engines denoise: the scan's scale is probed first
        self.settings = settings
        self.metrics = metrics
        self._on_close = on_close
        self._restart = restart
        self.start_timeout_s = start_timeout_s  # for a replacement, when no other engine works
        self._replacing = threading.Event()  # cleared by `stop_replacing`
        self._replacing.set()
        for index in range(len(engines)):
            metrics.cluster_unit_seconds.labels(str(index))
        metrics.cluster_workers.set_function(lambda: sum(s.ready for s in self._slots))

    @property
    def engines(self) -> list[Engine]:
        return [slot.engine for slot in self._slots]

    def stop_replacing(self) -> None:
        """The service is stopping: no lost engine is replaced from now on, and none being
        started is waited for (under a supervisor that signals the whole process group, Ray's
        own processes are stopping too). Any thread."""
        self._replacing.clear()

    def wait_started(self, timeout: float) -> bool:
        """Wait for the replacements being started; whether none is left starting."""
        starting = [s.starting for s in self._slots if s.starting is not None]
        return not wait(starting, timeout=timeout).not_done

    def prepare(self, theta: torch.Tensor, center: float, cols: int) -> bool:
        """A scan's geometry built by every engine, beside the units they run
        (`service.prepare.GeometryPreparer`, at scan_start). True if any built it. An engine
        lost meanwhile is left to the loop; another error is raised once all have answered."""
        angles = theta.numpy()
        futures = [slot.engine.prepare(angles, center, cols) for slot in self._slots if slot.ready]
        done, not_done = wait(futures, timeout=PREPARE_WAIT_S)
        if not_done:
            log.warning(
                "%d cluster workers still building a geometry after %.0f s: their units wait "
                "for it",
                len(not_done),
                PREPARE_WAIT_S,
            )
        built, failure = False, None
        for future in done:
            try:
                built = future.result() or built
            except EngineLost:
                pass  # the loop notices when it sends it a unit
            except Exception as exc:
                failure = exc
        if failure is not None:
            raise failure
        return built

    def reconstruct(
        self,
        scan: CompletedScan,
        write: Callable[[SliceBatch], None],
        abandoned: threading.Event,
    ) -> RowsDone:
        rows = scan.start.rows
        wait_s = time.time() - scan.t_last_projection
        scale = None
        if self.denoised:
            scale = self._run_one(scan, probe_unit(rows, self.batch_rows, self.halo)).done.scale
        units = plan_units(rows, self.batch_rows, self.halo, self.settings.unit_rows)
        pending = list(units)
        running: dict[Future[UnitResult], tuple[_Slot, Engine, WorkUnit, float]] = {}
        results: dict[int, UnitResult] = {}
        total = RowsDone([], [], 0, scale)
        published = 0
        try:
            while published < len(units):
                if abandoned.is_set():
                    break
                self._check_started()
                self._submit(scan, pending, running, published, scale)
                starting = self._starting()
                if not running and not starting:
                    raise ClusterError(f"scan_id={scan.start.scan_id}: no cluster worker is left")
                # a replacement that starts (or fails to) wakes the loop as a unit's end does
                timeout = None if running else self.start_timeout_s
                watched: list[Future[Any]] = [*running, *starting]
                finished, _ = wait(watched, timeout, FIRST_COMPLETED)
                if not finished:
                    raise ClusterError(
                        f"scan_id={scan.start.scan_id}: no cluster worker started within "
                        f"{self.start_timeout_s:.0f} s"
                    )
                for future in finished:
                    if future not in running:
                        continue  # a replacement: seen by _check_started
                    slot, engine, unit, t0 = running.pop(future)
                    slot.in_flight -= 1
                    result = self._result(future, slot, engine, unit, pending)
                    if result is not None:
                        self.metrics.cluster_unit_seconds.labels(slot.label).observe(
                            time.perf_counter() - t0
                        )
                        results[unit.index] = result
                while published in results:
                    self._publish(results.pop(published), write, wait_s, total)
                    published += 1
        finally:
            # abandoned, or a unit failed the scan: what is still out is not wanted (a unit
            # already running finishes, unread), and its room is the next scan's
            for future, (slot, _, _, _) in running.items():
                future.cancel()
                slot.in_flight -= 1
        return total

    def _publish(
        self,
        result: UnitResult,
        write: Callable[[SliceBatch], None],
        wait_s: float,
        total: RowsDone,
    ) -> None:
        """A unit's slices to the sinks (the scan's queueing time in their timing); its
        stage times and counts into `total`."""
        for batch in result.batches:
            if batch.consistency is not None and batch.denoised is not None:
                # the engine's no-harm guard verdicts, counted here for the published rows
                verdict = Verdict(batch.denoised, batch.consistency, 0.0)
                total.fallbacks += record(self.metrics, verdict)
            write(replace(batch, timing=replace(batch.timing, wait=wait_s)))
        total.guard_s += result.done.guard_s
        total.fbp_s += result.done.fbp_s
        total.denoise_s += result.done.denoise_s
        total.non_finite += result.done.non_finite

    def _submit(
        self,
        scan: CompletedScan,
        pending: list[WorkUnit],
        running: dict[Future[UnitResult], tuple[_Slot, Engine, WorkUnit, float]],
        published: int,
        scale: float | None,
    ) -> None:
        """Units to the engines with room, in row order, never more than the engines can hold
        ahead of the next unit to publish (the reorder buffer stays bounded)."""
        live = [slot for slot in self._slots if slot.ready]
        ahead = max(1, len(live)) * self.settings.in_flight
        while pending and pending[0].index < published + ahead:
            free = [slot for slot in live if slot.in_flight < self.settings.in_flight]
            if not free:
                return
            slot = min(free, key=lambda s: s.in_flight)
            unit = pending.pop(0)
            future = slot.engine.submit(ScanPart.of(scan, unit), unit, scale)
            slot.in_flight += 1
            running[future] = (slot, slot.engine, unit, time.perf_counter())

    def _result(
        self,
        future: Future[UnitResult],
        slot: _Slot,
        engine: Engine,
        unit: WorkUnit,
        pending: list[WorkUnit],
    ) -> UnitResult | None:
        """The unit's result; None when its engine was lost (the unit goes back in line)."""
        try:
            result = future.result()
        except EngineLost as exc:
            if engine is slot.engine and engine.alive:  # not yet seen lost, nor replaced
                self._lose(slot, f"{exc}: its work is re-run")
            self.metrics.cluster_units_retried.inc()
            pending.append(unit)
            pending.sort(key=lambda u: u.index)
            return None
        if engine is slot.engine:
            slot.replaced = 0  # it works: a later loss may be replaced again
        if result.geometry_built:
            self.metrics.cluster_geometry_builds.inc()
        return result

    def _lose(self, slot: _Slot, why: str) -> None:
        """`slot`'s engine is gone: counted, sent nothing more, replaced where it may be."""
        self.metrics.cluster_workers_lost.inc()
        log.error("cluster worker %s lost (%s)", slot.engine.name, why)
        slot.engine.lost()
        slot.starting = None
        if self._restart is None:
            return
        if not self._replacing.is_set():
            log.info("cluster worker %s not replaced: the service is stopping", slot.label)
            return
        if slot.replaced >= self.settings.replacements:
            log.error(
                "cluster worker %s not replaced: %d replacements in a row did not complete a "
                "unit (cluster.replacements=%d)",
                slot.label,
                slot.replaced,
                self.settings.replacements,
            )
            return
        slot.replaced += 1
        slot.engine, slot.starting = self._restart(int(slot.label))
        self.metrics.cluster_workers_replaced.inc()
        log.info("cluster worker %s: a replacement is starting", slot.engine.name)

    def _check_started(self) -> None:
        """Replacements that finished starting: ready, or lost (and replaced again)."""
        for slot in self._slots:
            start = slot.starting
            if start is None or not start.done():
                continue
            why = "cancelled" if start.cancelled() else start.exception()
            if why is None:
                slot.starting = None
                log.info("cluster worker %s started", slot.engine.name)
            elif slot.engine.alive:
                self._lose(slot, f"it did not start: {why}")

    def _starting(self) -> list[Future[Any]]:
        """The replacements still starting (none waited for once the service is stopping)."""
        if not self._replacing.is_set():
            return []
        return [
            slot.starting
            for slot in self._slots
            if slot.starting is not None and not slot.starting.done()
        ]

    def _run_one(self, scan: CompletedScan, unit: WorkUnit) -> UnitResult:
        """One unit to the first live engine, re-run on the next while engines are lost (and on
        a replacement once it has started)."""
        while True:
            self._check_started()
            live = [slot for slot in self._slots if slot.ready]
            if live:
                slot = live[0]
                future = slot.engine.submit(ScanPart.of(scan, unit), unit, None)
                result = self._result(future, slot, slot.engine, unit, [])
                if result is not None:
                    return result
                continue
            starting = self._starting()
            if not starting:
                raise ClusterError(f"scan_id={scan.start.scan_id}: no cluster worker is left")
            if not wait(starting, self.start_timeout_s, FIRST_COMPLETED).done:
                raise ClusterError(
                    f"scan_id={scan.start.scan_id}: no cluster worker started within "
                    f"{self.start_timeout_s:.0f} s"
                )

    def close(self) -> None:
        for slot in self._slots:
            slot.engine.close()
        self._on_close()


def build_spread(
    settings: Settings,
    reconstructor: Reconstructor,
    denoiser: Denoiser | None,
    metrics: Metrics,
) -> Spread | None:
    """The coordinator for this process's devices: None for one local device (the loop's own
    conveyor, unchanged), local engines for several `worker.devices`. The first device uses
    the service's own `reconstructor` and `denoiser` (warmed up by the service). Ray actors:
    `build_ray_spread`."""
    worker, cluster = settings.worker, settings.cluster
    if cluster.engine == "ray":
        raise ValueError("cluster.engine=ray: its coordinator comes from build_ray_spread")
    halo = denoiser.depth // 2 if denoiser is not None else 0
    if len(worker.devices) < 2:
        return None
    engines: list[Engine] = []
    for index, name in enumerate(worker.devices):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"worker.devices lists {name} but this machine has no CUDA device")
        options = loop_options(settings)
        if index == 0:
            row_engine = RowEngine(worker, settings.publish.recon, reconstructor, denoiser, options)
        else:
            own = make_reconstructor(
                worker.fbp_method,
                device,
                filter_name=worker.filter_name,
                circle_mask=worker.circle_mask,
            )
            row_engine = RowEngine(
                worker, settings.publish.recon, own, load_model(settings.model, device), options
            )
            row_engine.warm_up()  # the first's is warmed up by the service
        engines.append(LocalEngine(f"{index}:{name}", row_engine))
    return Spread(engines, worker.batch_rows, halo, denoiser is not None, cluster, metrics)


def build_ray_spread(settings: Settings, metrics: Metrics) -> tuple[Spread, ClusterModel | None]:
    """`cluster.workers` Ray actors, started and ready, under a coordinator that replaces the
    lost ones; and the model as they loaded it (None: denoising off). The service process loads
    neither a denoiser nor an FBP of its own for them."""
    from service.ray_actors import ACTOR_START_S, RayWorkers

    workers = RayWorkers(settings)
    try:
        engines = workers.start()
    except BaseException:
        workers.close()
        raise
    model = workers.model
    halo = model.depth // 2 if model is not None else 0
    spread = Spread(
        list(engines),
        settings.worker.batch_rows,
        halo,
        model is not None,
        settings.cluster,
        metrics,
        workers.close,
        restart=workers.replacement,
        start_timeout_s=ACTOR_START_S,
    )
    return spread, model
