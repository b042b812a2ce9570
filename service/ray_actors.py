"""Ray worker actors as engines (`cluster.engine = "ray"`): each actor owns a device (the GPU
Ray gave it, else a CPU), its reconstructor and denoiser, and runs work units of rows with the
reconstruct loop's own conveyor (`service.engine.RowEngine`): the same code as in-process.

`ray` is an optional dependency (`tomocast[ray]`): nothing here imports it before an engine is
started, and without it the service says what to install.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from service.config import Settings
from service.engine import (
    Engine,
    EngineLost,
    RowEngine,
    ScanPart,
    UnitResult,
    WorkUnit,
    load_model,
    loop_options,
)
from service.errors import ConfigError
from workers.recon import make_reconstructor

log = logging.getLogger(__name__)

# the object store of a Ray instance the service starts itself (units in flight live there)
LOCAL_OBJECT_STORE_BYTES = 1 << 30
# how long the actors may take to load torch and the model before the service gives up
ACTOR_START_S = 120.0


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
