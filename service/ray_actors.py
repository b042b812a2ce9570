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

import numpy as np
import torch

from models.artifact import ModelMetadata
from service.cluster import ClusterModel
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
# the actor's concurrency group for `prepare`: its own thread, beside the units' (one at a time)
PREPARE_GROUP = "prepare"
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
    Ray runs `run` one call at a time; `prepare` runs beside it, on the actor's "prepare"
    thread (the reconstructor's `prepare` is thread-safe)."""

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
        self.denoiser = load_model(config.model, device)
        self.engine = RowEngine(
            worker,
            config.publish.recon,
            reconstructor,
            self.denoiser,
            loop_options(config),
        )
        self.engine.warm_up()

    def describe(self) -> dict[str, Any]:
        """Its device, and its denoiser as loaded (None: off): what the service says of the
        model (`service.cluster.ClusterModel`)."""
        model = None
        if self.denoiser is not None:
            metadata = self.denoiser.metadata.model_dump_json()
            model = {"metadata": metadata, "precision": self.denoiser.precision}
        return {"device": str(self.engine.device), "model": model}

    def prepare(self, theta: np.ndarray, center: float, cols: int) -> bool:
        return self.engine.prepare(theta, center, cols)

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
        if not self._alive:
            out: Future[UnitResult] = Future()
            out.set_exception(EngineLost(f"{self._name} is gone"))
            return out
        # numpy rows go into the object store as one buffer; the actor maps them
        return _answer(self.actor.run.remote(part.on_host(), unit, scale))

    def prepare(self, theta: np.ndarray, center: float, cols: int) -> Future[bool]:
        if not self._alive:
            out: Future[bool] = Future()
            out.set_exception(EngineLost(f"{self._name} is gone"))
            return out
        # on the actor's own "prepare" thread: never queued behind the units it holds
        return _answer(
            self.actor.prepare.options(concurrency_group=PREPARE_GROUP).remote(theta, center, cols)
        )

    def ready(self) -> Future[dict[str, Any]]:
        """Done when the actor has started (its `describe`), failed when it did not."""
        return _answer(self.actor.describe.remote())

    def lost(self) -> None:
        self._alive = False

    def close(self) -> None:
        ray = _ray()

        if self._alive:
            ray.kill(self.actor)
        self._alive = False


def _answer(ref: Any) -> Future[Any]:
    """A Ray call's result as a future; `EngineLost` when its actor died or is unreachable."""
    ray = _ray()
    out: Future[Any] = Future()

    def done(inner: Future[Any]) -> None:
        try:
            out.set_result(inner.result())
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            out.set_exception(EngineLost(str(exc).splitlines()[0]))
        except BaseException as exc:
            out.set_exception(exc)

    ref.future().add_done_callback(done)
    return out


class RayWorkers:
    """This service's actors on one Ray instance: `cluster.address`'s, one started here on
    127.0.0.1 (stopped by `close`), or the one this process is already connected to. Starts
    them (`start`) and one more in a lost one's place (`replacement`). Called from one thread
    at a time (the service's start, then its loop)."""

    def __init__(self, settings: Settings) -> None:
        ray = _ray()
        cluster = settings.cluster
        self._count = cluster.workers
        self._owned = not ray.is_initialized()
        if self._owned:
            _connect(ray, settings)
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        options = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
        self._actor_class = ray.remote(concurrency_groups={PREPARE_GROUP: 1})(RowActor).options(
            **options
        )
        self._config = settings.model_dump(mode="json")
        self.model: ClusterModel | None = None  # as the actors loaded it, once started

    def start(self) -> list[RayEngine]:
        """`cluster.workers` actors, ready to work (ACTOR_START_S at most)."""
        ray = _ray()
        actors = [self._actor_class.remote(self._config) for _ in range(self._count)]
        try:
            described = ray.get(
                [actor.describe.remote() for actor in actors], timeout=ACTOR_START_S
            )
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            raise
        first = described[0]
        if first["model"] is not None:
            metadata = ModelMetadata.model_validate_json(first["model"]["metadata"])
            device = torch.device(first["device"])
            self.model = ClusterModel(metadata, first["model"]["precision"], device)
        log.info(
            "ray: %d worker actors on %s", len(actors), ", ".join(d["device"] for d in described)
        )
        return [RayEngine(f"ray-{i}", actor) for i, actor in enumerate(actors)]

    def replacement(self, index: int) -> tuple[Engine, Future[Any]]:
        """A new actor in place `index`, starting (Ray schedules it where there is room); and
        a future done when it is ready."""
        engine = RayEngine(f"ray-{index}", self._actor_class.remote(self._config))
        return engine, engine.ready()

    def close(self) -> None:
        """Disconnect; a Ray instance started here is stopped."""
        if self._owned:
            _ray().shutdown()


def _connect(ray: Any, settings: Settings) -> None:
    cluster = settings.cluster
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


def start_ray_engines(settings: Settings) -> tuple[list[Engine], Callable[[], None]]:
    """`cluster.workers` actors, ready to work, and what disconnects (stops a Ray instance
    started here) at the end (`RayWorkers`)."""
    workers = RayWorkers(settings)
    try:
        engines: list[Engine] = list(workers.start())
    except BaseException:
        workers.close()
        raise
    return engines, workers.close
