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

`ray` is an optional dependency (`tomocast[ray]`), imported only when the engine is "ray".
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace
from typing import Any

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
from service.metrics import Metrics
from service.reconstruct import RowsDone
from service.sinks import SliceBatch
from service.sinogram import CompletedScan
from workers.protocols import Denoiser, Reconstructor
from workers.recon import make_reconstructor

log = logging.getLogger(__name__)

# the object store of a Ray instance the service starts itself (units in flight live there)
LOCAL_OBJECT_STORE_BYTES = 1 << 30
# how long the actors may take to load torch and the model before the service gives up
ACTOR_START_S = 120.0


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
                    result = results.pop(published)
                    for batch in result.batches:
                        write(replace(batch, timing=replace(batch.timing, wait=wait_s)))
                    total.fbp_s += result.done.fbp_s
                    total.denoise_s += result.done.denoise_s
                    total.non_finite += result.done.non_finite
                    published += 1
        finally:
            # abandoned, or a unit failed the scan: what is still out is not wanted (a unit
            # already running finishes, unread), and its room is the next scan's
            for future, (slot, _, _) in running.items():
                future.cancel()
                slot.in_flight -= 1
        return total

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


# ---- Ray -------------------------------------------------------------------------------------


def _ray() -> Any:
    """The `ray` module (untyped here: its stubs are partial), or a ConfigError saying how to
    install it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError(
            "cluster.engine=ray but ray is not installed: pip install 'tomocast[ray]'"
        ) from None


class RowActor:
    """A Ray actor: one device (the GPU Ray gave it, else the CPU), its reconstructor, its
    denoiser and the loop's conveyor (`service.engine.RowEngine`): the same code as in-process.
    Ray runs its methods one at a time."""

    def __init__(self, settings: dict[str, Any]) -> None:
        config = Settings.model_validate(settings)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        worker = config.worker
        reconstructor = make_reconstructor(
            worker.fbp_method,
            device,
            filter_name=worker.filter_name,
            circle_mask=worker.circle_mask,
        )
        self.engine = RowEngine(
            worker,
            config.publish.recon,
            reconstructor,
            load_model(config.model, device),
            loop_options(config),
        )
        self.engine.warm_up()

    def where(self) -> str:
        return str(self.engine.device)

    def run(self, part: ScanPart, unit: WorkUnit, scale: float | None) -> UnitResult:
        return self.engine.run(part, unit, scale)


class RayEngine:
    """An `Engine` over one `RowActor`."""

    def __init__(self, name: str, actor: Any) -> None:
        self._name = name
        self.actor = actor
        self._alive = True

    @property
    def name(self) -> str:
        return self._name

    @property
    def alive(self) -> bool:
        return self._alive

    def submit(self, part: ScanPart, unit: WorkUnit, scale: float | None) -> Future[UnitResult]:
        ray = _ray()

        out: Future[UnitResult] = Future()
        if not self._alive:
            out.set_exception(EngineLost(f"{self._name} is gone"))
            return out
        # numpy rows go into the object store as one buffer; the actor maps them
        ref = self.actor.run.remote(part.on_host(), unit, scale)

        def done(inner: Future[UnitResult]) -> None:
            try:
                out.set_result(inner.result())
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                out.set_exception(EngineLost(str(exc).splitlines()[0]))
            except BaseException as exc:
                out.set_exception(exc)

        ref.future().add_done_callback(done)
        return out

    def lost(self) -> None:
        self._alive = False

    def close(self) -> None:
        ray = _ray()

        if self._alive:
            ray.kill(self.actor)
        self._alive = False


def start_ray_engines(settings: Settings) -> tuple[list[Engine], Callable[[], None]]:
    """`cluster.workers` actors on the Ray instance of `cluster.address` (or one started here
    on 127.0.0.1, or the one this process is already connected to), ready to work; and what
    disconnects (stops a Ray instance started here) at the service's stop."""
    ray = _ray()
    cluster = settings.cluster
    owned = not ray.is_initialized()
    if owned:
        # Ray's core installs its own SIGTERM/SIGINT handlers (log, then die): the service's
        # (drain, then exit) are put back once it is connected
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        if cluster.address:
            ray.init(address=cluster.address, logging_level=logging.WARNING)
        else:
            ray.init(
                num_cpus=cluster.workers,
                num_gpus=torch.cuda.device_count(),
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING,
            )
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    options = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
    actor_class = ray.remote(RowActor).options(**options)
    config = settings.model_dump(mode="json")
    actors = [actor_class.remote(config) for _ in range(cluster.workers)]
    try:
        where = ray.get([actor.where.remote() for actor in actors], timeout=ACTOR_START_S)
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        if owned:
            ray.shutdown()
        raise
    log.info("ray: %d worker actors on %s", len(actors), ", ".join(where))
    engines: list[Engine] = [RayEngine(f"ray-{i}", actor) for i, actor in enumerate(actors)]
    return engines, (ray.shutdown if owned else lambda: None)
