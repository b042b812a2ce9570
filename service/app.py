"""The whole service in one process: the stages, their queues and sinks, and the health endpoint.

    DAQ --PUSH--> [ingest thread] --bounded queue (block)--> [worker thread: reconstruct loop]
        --sinks--> PublishChannel --inproc--> [publish thread] --XPUB--> viewers
               --> Archive --bounded queue (block)--> [archive thread] --> HDF5
    [ingest thread] --scan_start (drop)--> [prepare thread]: the scan's FBP geometry, built
        while its projections arrive (`service.prepare`)

`Service.start()` loads the model, binds the sockets, builds the stages, warms the device,
starts the stages (consumers first), then reports ready. docs/architecture.md follows one scan
through them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import zmq
from zmq.auth.thread import ThreadAuthenticator

from service import __version__
from service.adapt import Adapter, ModelSlot
from service.archive import Archive
from service.cluster import ClusterModel, Spread, build_ray_spread, build_spread
from service.config import Settings
from service.continuous import ContinuousEnded
from service.events import ScanFailed
from service.health import HealthServer
from service.incremental import Incremental
from service.ingest import POLL_MS, Ingest
from service.live import CenterControl, LiveScans
from service.metrics import Metrics
from service.prepare import GeometryPreparer, Prepares
from service.preprocess import ScanPreprocessor
from service.preview import Previewer, PreviewTap
from service.publish import PublishChannel, Publisher
from service.pva import PVAServer
from service.reconstruct import Worker
from service.security import ServerKeys, start_authenticator
from service.sinks import SliceSink
from service.sinogram import CompletedScan
from workers.denoise import DenoiseEngine, load_denoiser
from workers.protocols import PreparableReconstructor, Reconstructor
from workers.recon import make_reconstructor

log = logging.getLogger(__name__)

# At stop, how long the prepare thread's build under way may take before it is left behind (a
# build takes seconds, and is most likely for the scan being received, which fails at stop)
PREPARE_JOIN_S = 1.0
# after a drain timeout: how long the archive may take to close its files before the process exits
ARCHIVE_JOIN_S = 10.0
# at stop, how long an adaptation under way may take to notice (its current training step or
# set-up) before it is left behind
ADAPT_JOIN_S = 10.0


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from service.errors import ConfigError

        raise ConfigError(
            f"worker.device={name} but this machine has no CUDA device: use --device cpu or auto"
        )
    return device


@dataclass(frozen=True)
class Endpoints:
    ingest: str
    publish: str
    metrics_port: int


class Service:
    """Owns every thread and socket of one tomocast instance. Start and stop from one thread."""

    def __init__(self, settings: Settings, reconstructor: Reconstructor | None = None) -> None:
        """`reconstructor` replaces the configured FBP (any `Reconstructor` on this device)."""
        self.settings = settings
        self._reconstructor = reconstructor
        self._stopped: bool | None = None  # set once stop() has run: its result
        self.metrics = Metrics()
        self.preprocessor = ScanPreprocessor(settings.preprocess, self.metrics)
        # several devices: scans are assembled on the first (service.cluster spreads the rows)
        self.device = resolve_device(
            settings.worker.devices[0] if settings.worker.devices else settings.worker.device
        )
        self.context = zmq.Context()
        self._ready = threading.Event()
        self._why_not_ready = "starting"
        # with Ray, the model as the actors loaded it (the service process loads none)
        self.denoiser: DenoiseEngine | ClusterModel | None = None
        # complete scans, and continuous scans' windows and ends (service.continuous)
        self.scans: queue.Queue[CompletedScan | ContinuousEnded | None] = queue.Queue(
            settings.worker.queue_scans
        )
        self.metrics.watch_queue("scans", self.scans.qsize)
        self.metrics.batch_size.set(settings.worker.batch_rows)
        if self.device.type == "cuda":
            device = self.device
            self.metrics.watch_gpu_memory(
                lambda: torch.cuda.memory_allocated(device),
                lambda: torch.cuda.memory_reserved(device),
            )
        # the scans being received and their live centres (POST /scans/{scan_id}/center)
        self.live = LiveScans(self.metrics, self.preprocessor.known_center)
        self.health = HealthServer(
            settings.metrics.host,
            settings.metrics.port,
            self.metrics.registry,
            self._readiness,
            self._liveness,
            CenterControl(self.live),
        )
        self.publisher: Publisher | None = None
        self.ingest: Ingest | None = None
        self.worker: Worker | None = None
        self.preparer: GeometryPreparer | None = None
        self.archive: Archive | None = None
        self.pva: PVAServer | None = None  # EPICS PV Access, with publish.pva_prefix
        self.previewer: Previewer | None = None  # previews during a scan, with preview.enabled
        self.incremental: Incremental | None = None  # FBP as scans arrive (incremental.enabled)
        self.authenticator: ThreadAuthenticator | None = None
        self._worker_channel: PublishChannel | None = None  # the loop's, closed after it ends
        self.spread: Spread | None = None  # several devices or Ray actors (closed after the loop)
        self.adapter: Adapter | None = None  # with model.adapt (service/adapt.py)

    def start(self) -> Endpoints:
        """Build the stages from the settings, then start them in reverse flow order: each
        stage's consumer runs before anything reaches it."""
        self.health.start()
        if self.settings.cluster.engine == "ray":
            # the actors load the denoiser and their FBP; this process only describes the model
            self._why_not_ready = "starting the cluster's worker actors"
            self.spread, self.denoiser = build_ray_spread(self.settings, self.metrics)
            if self.denoiser is not None:
                self._model_info(self.denoiser, str(self.denoiser.device))
        else:
            self._why_not_ready = "loading the model"
            self.denoiser = self._load_denoiser()
        # with Ray the loop's own FBP is never run: built (no geometry, no warm-up), not used
        reconstructor = self._reconstructor or make_reconstructor(
            self.settings.worker.fbp_method,
            self.device,
            filter_name=self.settings.worker.filter_name,
            circle_mask=self.settings.worker.circle_mask,
        )
        if self.spread is None:  # several devices of this process, or None
            self.spread = build_spread(self.settings, reconstructor, self.denoiser, self.metrics)
        self._why_not_ready = "binding sockets"
        curve = self._curve()
        self.publisher = self._build_publisher(curve)
        self.archive = self._build_archive()
        self.pva = self._build_pva()
        self.incremental = self._build_incremental()
        self.previewer = self._build_previewer()
        self.preparer = self._build_preparer(reconstructor)
        self.ingest = self._build_ingest(curve)
        self.worker = self._build_worker(reconstructor)
        self._why_not_ready = "warming up the device"
        self._warm_up(reconstructor)
        stages = (
            self.publisher,
            self.archive,
            self.pva,
            self.previewer,
            self.adapter,
            self.incremental,
            self.worker,
            self.preparer,
            self.ingest,
        )
        for stage in stages:
            if stage is not None:
                stage.start()
        self._ready.set()
        self._why_not_ready = "ready"
        endpoints = Endpoints(self.ingest.endpoint, self.publisher.endpoint, self.health.port)
        log.info(
            "ready: ingest %s, publish %s, metrics http://%s:%d/metrics on %s",
            endpoints.ingest,
            endpoints.publish,
            self.settings.metrics.host,
            endpoints.metrics_port,
            self.device,
        )
        return endpoints

    # ---- building the stages, in flow order --------------------------------------------------

    def _load_denoiser(self) -> DenoiseEngine | None:
        if not self.settings.model.enabled:
            return None
        denoiser = load_denoiser(
            self.settings.model.path,
            self.device,
            precision=self.settings.model.precision,
            memory_limit_bytes=self.settings.model.memory_bytes,
            field_width=self.settings.model.field_width,
        )
        self._model_info(denoiser, str(self.device))
        return denoiser

    def _model_info(self, denoiser: DenoiseEngine | ClusterModel, device: str) -> None:
        meta = denoiser.metadata
        self.metrics.model.info(
            {
                "name": meta.name,
                "arch": meta.arch,
                "depth": str(meta.depth),
                "precision": denoiser.precision,
                "trained": str(meta.trained).lower(),
                "version": meta.tomocast_version,
                "device": device,
            }
        )

    def _curve(self) -> ServerKeys | None:
        """The service's CURVE keys, with the authenticator of the allowed clients running;
        None when CURVE is off."""
        security = self.settings.security
        if security.server_secret_key is None or security.allowed_clients is None:
            return None
        curve = ServerKeys.from_file(security.server_secret_key)
        self.authenticator = start_authenticator(self.context, security.allowed_clients)
        return curve

    def _build_publisher(self, curve: ServerKeys | None) -> Publisher:
        info: dict[str, Any] = {
            "service": "tomocast",
            "version": __version__,
            "model": self.denoiser.name if self.denoiser else "none",
            "trained": bool(self.denoiser and self.denoiser.metadata.trained),
            "device": str(self.device),
        }
        publisher = Publisher(self.settings.publish, self.context, self.metrics, info, curve)
        publisher.bind()
        return publisher

    def _build_archive(self) -> Archive | None:
        if self.settings.archive.directory is None:
            return None
        model = self.denoiser.metadata.model_dump() if self.denoiser else {"name": "none"}
        archive = Archive(
            self.settings.archive.directory,
            self.settings.archive.recon,
            self.settings.archive.queue_items,
            self.metrics,
            model,
            settings=self.settings.model_dump(mode="json"),
            compression=self.settings.archive.compression,
        )
        archive.open_directory()
        return archive

    def _build_pva(self) -> PVAServer | None:
        prefix = self.settings.publish.pva_prefix
        if not prefix:
            return None
        pva = PVAServer(prefix, self.metrics, self.denoiser.name if self.denoiser else "none")
        pva.open()  # a ConfigError without p4p: start-up fails, naming the setting
        return pva

    def _build_previewer(self) -> Previewer | None:
        if not self.settings.preview.enabled:
            return None
        assert self.publisher is not None
        return Previewer(
            self.settings.preview,
            self.settings.worker,
            self.device,
            self.publisher,
            self.live,
            self.metrics,
            self.incremental,
        )

    def _build_preparer(self, reconstructor: Reconstructor) -> GeometryPreparer | None:
        if not self.settings.worker.prepare_geometry:
            return None
        target: Prepares
        if self.spread is not None:  # every device or actor builds it (service.cluster)
            target = self.spread
        elif isinstance(reconstructor, PreparableReconstructor):
            target = reconstructor
        else:
            return None
        # one per scan that can be assembling at once. The reconstructor's cache may hold
        # fewer (gridding: the scan in progress and one more): with more scans started than
        # that, the earliest prepared are evicted again before their turn
        return GeometryPreparer(
            target,
            self.metrics,
            self.settings.ingest.max_live_scans,
            self.preprocessor.known_center,
        )

    def _build_incremental(self) -> Incremental | None:
        """The incremental stage, for one local device (with several, or Ray actors, the
        scan's rows are spread at its end as ever)."""
        settings = self.settings
        if not settings.incremental.enabled:
            return None
        if len(settings.worker.devices) > 1 or settings.cluster.engine == "ray":
            log.info("incremental reconstruction is off: it runs on one local device only")
            return None
        return Incremental(
            settings.incremental,
            settings.worker,
            settings.preprocess,
            self.device,
            self.metrics,
            self.preprocessor.known_center,
        )

    def _build_ingest(self, curve: ServerKeys | None) -> Ingest:
        assert self.publisher is not None
        ingest = Ingest(
            self.settings.ingest,
            self.context,
            self.device,
            self.scans,
            self.publisher,
            self.metrics,
            curve,
            self.preparer,
            self.preprocessor,
            PreviewTap(
                self.settings.preview,
                self.live,
                self.previewer,
                early_center=self.preprocessor.early_center,
            ),
            self.incremental,
        )
        ingest.bind()
        return ingest

    def _sinks(self) -> list[SliceSink]:
        """Where every scan's slices and outcome go, in this order. A new output (an EPICS PV
        Access server, say) is one more `SliceSink` here."""
        assert self.publisher is not None
        # the loop's own channel: made here, used only by the loop's thread, closed after it
        self._worker_channel = self.publisher.channel()
        sinks: list[SliceSink] = [self._worker_channel]
        if self.archive is not None:
            sinks.append(self.archive)
        if self.pva is not None:
            sinks.append(self.pva)
        if self.previewer is not None:  # ends a scan's previews as its final slices begin
            sinks.append(self.previewer)
        return sinks

    def _build_worker(self, reconstructor: Reconstructor) -> Worker:
        self.adapter = self._build_adapter()
        worker = Worker(
            self.settings.worker,
            self.settings.publish,
            self.scans,
            reconstructor,
            self.denoiser,
            self._sinks(),
            self.metrics,
            self.settings.guard,
            self.preprocessor,
            self.spread,
            models=self.adapter,
            incremental=self.incremental,
        )
        ingest = self.ingest
        assert ingest is not None
        self.metrics.scans_in_flight.set_function(
            lambda: ingest.live_scans + self.scans.qsize() + int(worker.busy)
        )
        return worker

    # ---- stopping -------------------------------------------------------------------------------

    def stop(self, timeout: float | None = None) -> bool:
        """Stop reading; scans still being received fail (`ScanFailed` event); complete scans
        are reconstructed, published and archived within `timeout` (default
        `worker.drain_timeout_s`). Returns whether everything was drained in time. A geometry
        build under way on the prepare thread is waited for `PREPARE_JOIN_S` at most. Also
        stops a service whose `start` failed part-way. Stages stop in flow order, each once
        what it feeds has been handed on."""
        if self._stopped is not None:
            return self._stopped
        timeout = self.settings.worker.drain_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._ready.clear()
        self._why_not_ready = "stopping"
        if self.adapter is not None:  # an adaptation under way stops at its next step
            self.adapter.stop()
        self._stop_preparer(timeout)
        if self.spread is not None:  # a lost Ray actor is not replaced while stopping
            self.spread.stop_replacing()
        if self.ingest is not None:
            # the ingest ends the loop's stream (its sentinel) as it stops
            self.ingest.stop(max(0.0, deadline - time.monotonic()))
            self.ingest.join(max(0.0, deadline - time.monotonic()) + 2 * POLL_MS / 1000)
        drained = self.worker is None or self.worker.join(max(0.0, deadline - time.monotonic()))
        if not drained:
            self._fail_undrained(timeout)
        else:
            if self._worker_channel is not None:
                self._worker_channel.close()
            self._close_adapter()
            if self.spread is not None:
                self.spread.close()
            if self.archive is not None:
                self.archive.stop()
                self.archive.join()
        if self.incremental is not None:  # after the loop: it takes scans' results from it
            self.incremental.stop()
            self.incremental.join(ARCHIVE_JOIN_S)  # a block being folded in finishes
        if self.previewer is not None:
            self.previewer.stop()
            self.previewer.join()  # a render under way finishes; its channel closes before term()
        if self.pva is not None:
            self.pva.stop()
            self.pva.join(ARCHIVE_JOIN_S)
            self.pva.close()
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher.join()
        self.health.stop()
        if self.authenticator is not None:
            self.authenticator.stop()
        if drained:
            self.context.term()
        else:
            # the loop still uses its socket; closing it from here is not thread-safe and
            # term() would wait for it forever. Should the loop come back, it is closed after
            # it; if not, the daemon threads end with the process.
            threading.Thread(target=self._close_after_worker, name="reaper", daemon=True).start()
        self._stopped = drained
        return drained

    def _close_after_worker(self) -> None:
        assert self.worker is not None
        self.worker.join()
        if self._worker_channel is not None:
            self._worker_channel.close()
        self._close_adapter()
        self.context.term()

    def _build_adapter(self) -> Adapter | None:
        """Adaptation of the denoiser to completed scans (model.adapt), swapped in by the loop
        between scans."""
        if not self.settings.model.adapt:
            return None
        from service.errors import ConfigError

        assert self.denoiser is not None and self.publisher is not None  # model.enabled
        if self.spread is not None or not isinstance(self.denoiser, DenoiseEngine):
            raise ConfigError(
                "model.adapt runs on one device: it cannot swap the weights of several devices "
                "or Ray actors (worker.devices, cluster.engine); turn one of them off"
            )
        if self.denoiser.metadata.arch == "placeholder":
            raise ConfigError(
                f"model.adapt: {self.denoiser.path} is the placeholder filter, which has "
                "nothing to fine-tune: serve a trained model"
            )
        slot = ModelSlot(self.denoiser, self.publisher.channel(), self.metrics)
        return Adapter(self.settings.model, self.settings.worker, slot, self.device, self.metrics)

    def _close_adapter(self) -> None:
        """After the loop has ended: the adaptation under way is left behind if it does not
        stop within ADAPT_JOIN_S (a daemon thread); its channel closes, its temporary folder
        goes."""
        if self.adapter is None:
            return
        self.adapter.stop()
        if not self.adapter.join(ADAPT_JOIN_S):
            log.warning("stopping with an adaptation still running; it ends with the process")
        if not self.adapter.slot.close(ADAPT_JOIN_S):
            log.error("the adaptation held the model slot past %.0f s at stop", ADAPT_JOIN_S)
        self.adapter.remove_directory()

    def _fail_undrained(self, timeout: float) -> None:
        """The drain timeout ran out: every scan still in the loop or queued for it ends for
        the viewers (and the archive) with `ScanFailed`, each named in the log. The loop
        hears no more of its sinks; its thread ends with the process."""
        assert self.worker is not None and self.publisher is not None
        lost = self.worker.abandon()
        log.error(
            "the %.0f s drain timeout (worker.drain_timeout_s) ran out with %d scans "
            "not reconstructed: %s",
            timeout,
            len(lost),
            ", ".join(lost) or "none",
        )
        channel = self.publisher.channel()  # the loop's own is not ours to use
        for scan_id in lost:
            reason = (
                f"drain timeout: the service stopped before this scan was reconstructed "
                f"(worker.drain_timeout_s={timeout:g})"
            )
            log.error("scan_id=%s failed: %s", scan_id, reason)
            failed = ScanFailed(scan_id, reason)
            channel.send_event(failed)
            if self.archive is not None:
                self.archive.end(failed)  # its partial file is removed, on the archive thread
        channel.close()
        if self.archive is not None:
            self.archive.stop()
            if not self.archive.join(ARCHIVE_JOIN_S):
                log.error("the archive thread did not finish within %.0f s", ARCHIVE_JOIN_S)

    def _stop_preparer(self, timeout: float) -> None:
        """Scans starting from now fail: nothing more to prepare. A build under way cannot be
        interrupted; a complete scan that needs it waits for it in the loop, within the
        deadline, and nothing else does. The thread is a daemon with no sockets."""
        if self.preparer is None:
            return
        self.preparer.stop()
        if not self.preparer.join(min(PREPARE_JOIN_S, timeout)):
            log.warning(
                "stopping with a geometry build still running on the prepare "
                "thread; it ends with the process"
            )

    def _readiness(self) -> tuple[bool, str]:
        return self._ready.is_set(), self._why_not_ready

    def _liveness(self) -> tuple[bool, str]:
        """Broken once ready when a thread the service cannot work without has died."""
        if self._ready.is_set():
            for name, part in (
                ("ingest", self.ingest),
                ("worker", self.worker),
                ("publisher", self.publisher),
                ("archive", self.archive),
                ("pva", self.pva),
                ("preview", self.previewer),
                ("incremental", self.incremental),
            ):
                if part is not None and not part.alive:
                    return False, f"the {name} thread has stopped (see the log)"
        return True, "ok"

    def _warm_up(self, reconstructor: Reconstructor) -> None:
        """One small reconstruct + denoise so the first scan pays no start-up cost (with Ray,
        the actors warmed up their own)."""
        if self.settings.cluster.engine == "ray":
            return
        cols, angles = 64, 32
        sinogram = torch.zeros((1, angles, cols), device=self.device)
        theta = torch.linspace(0, torch.pi, angles)  # on the CPU, as the worker's
        volume = reconstructor.reconstruct(sinogram, theta, cols / 2)
        if isinstance(reconstructor, PreparableReconstructor):
            reconstructor.release()  # no scan uses the warm-up's geometry: unpin it
        if isinstance(self.denoiser, DenoiseEngine):
            self.denoiser.warmup((1, cols, cols))
            self.denoiser.denoise(volume.expand(self.denoiser.depth, -1, -1)[None])
