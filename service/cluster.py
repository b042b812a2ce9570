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

import torch

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


@dataclass
class _Slot:
    engine: Engine
    label: str  # its `worker` label in the metrics: its index
    in_flight: int = 0


class Spread:
    """The coordinator (`service.reconstruct.RowSpread`): a scan's work units over `engines`,
    results to the loop's sinks in row order. Called from the loop's thread only; owns the
    engines (closed by `close`)."""

    def __init__(
        self,
        engines: list[Engine],
        batch_rows: int,
        halo: int,
        denoised: bool,
        settings: ClusterSettings,
        metrics: Metrics,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self._slots = [_Slot(engine, str(i)) for i, engine in enumerate(engines)]
        self.batch_rows, self.halo = batch_rows, halo
        self.denoised = denoised  # the engines denoise: the scan's scale is probed first
        self.settings = settings
        self.metrics = metrics
        self._on_close = on_close
        for index in range(len(engines)):
            metrics.cluster_unit_seconds.labels(str(index))
        metrics.cluster_workers.set_function(lambda: sum(s.engine.alive for s in self._slots))

    @property
    def engines(self) -> list[Engine]:
        return [slot.engine for slot in self._slots]

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
        running: dict[Future[UnitResult], tuple[_Slot, WorkUnit, float]] = {}
        results: dict[int, UnitResult] = {}
        total = RowsDone([], [], 0, scale)
        published = 0
        try:
            while published < len(units):
                if abandoned.is_set():
                    break
                self._submit(scan, pending, running, published, scale)
                if not running:
                    raise ClusterError(f"scan_id={scan.start.scan_id}: no cluster worker is left")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    slot, unit, t0 = running.pop(future)
                    slot.in_flight -= 1
                    result = self._result(future, slot, unit, pending)
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
            for future, (slot, _, _) in running.items():
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
        running: dict[Future[UnitResult], tuple[_Slot, WorkUnit, float]],
        published: int,
        scale: float | None,
    ) -> None:
        """Units to the engines with room, in row order, never more than the engines can hold
        ahead of the next unit to publish (the reorder buffer stays bounded)."""
        live = [slot for slot in self._slots if slot.engine.alive]
        ahead = max(1, len(live)) * self.settings.in_flight
        while pending and pending[0].index < published + ahead:
            free = [slot for slot in live if slot.in_flight < self.settings.in_flight]
            if not free:
                return
            slot = min(free, key=lambda s: s.in_flight)
            unit = pending.pop(0)
            future = slot.engine.submit(ScanPart.of(scan, unit), unit, scale)
            slot.in_flight += 1
            running[future] = (slot, unit, time.perf_counter())

    def _result(
        self, future: Future[UnitResult], slot: _Slot, unit: WorkUnit, pending: list[WorkUnit]
    ) -> UnitResult | None:
        """The unit's result; None when its engine was lost (the unit goes back in line)."""
        try:
            return future.result()
        except EngineLost as exc:
            if slot.engine.alive:
                self.metrics.cluster_workers_lost.inc()
                log.error("cluster worker %s lost (%s): its work is re-run", slot.engine.name, exc)
                slot.engine.lost()
            self.metrics.cluster_units_retried.inc()
            pending.append(unit)
            pending.sort(key=lambda u: u.index)
            return None

    def _run_one(self, scan: CompletedScan, unit: WorkUnit) -> UnitResult:
        """One unit to the first live engine, re-run on the next while engines are lost."""
        while live := [slot for slot in self._slots if slot.engine.alive]:
            pending: list[WorkUnit] = []
            result = self._result(
                live[0].engine.submit(ScanPart.of(scan, unit), unit, None), live[0], unit, pending
            )
            if result is not None:
                return result
        raise ClusterError(f"scan_id={scan.start.scan_id}: no cluster worker is left")

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
    """The coordinator the settings ask for: None for one local device (the loop's own
    conveyor, unchanged), local engines for several `worker.devices`, Ray actors for
    `cluster.engine = "ray"`. The first local device uses the service's own `reconstructor`
    and `denoiser` (warmed up and prepared by the service)."""
    worker, cluster = settings.worker, settings.cluster
    halo = denoiser.depth // 2 if denoiser is not None else 0
    if cluster.engine == "ray":
        from service.ray_actors import start_ray_engines

        actors, on_close = start_ray_engines(settings)
        denoised = denoiser is not None
        return Spread(actors, worker.batch_rows, halo, denoised, cluster, metrics, on_close)
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
