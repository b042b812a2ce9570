"""Every Prometheus metric tomocast exports, in one place.

Each `Metrics` owns its own registry (no process-global state), so tests and several services in
one process never collide. Label sets are created up front, so dashboards show zeros before the
first scan. deploy/grafana and deploy/prometheus/alerts.yml query these names; the unit test
tests/unit/service/test_deploy_files.py fails when one of them is renamed here and not there.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from service.events import ScanCompleted, ScanEnded
from service.protocol import MESSAGE_TYPES, REJECT_REASONS

# What one slice may cost (fbp + denoise + publish) for the service to keep up with a detector;
# the dashboard's budget line and the TomocastSliceOverBudget alert use the same value.
SLICE_BUDGET_SECONDS = 0.07
# Per-stage latency, resolving 1 ms .. 10 s, with a bucket edge exactly on the 70 ms budget so
# "share of slices over budget" is one bucket ratio, not an interpolation.
STAGE_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    SLICE_BUDGET_SECONDS,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Last projection of a scan -> its last slice published: seconds to minutes for big scans.
TAIL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)
# receive, normalize: per ingest message; wait: per scan (queued before the worker took it);
# fbp, denoise, guard, publish: per slice; end_to_end: per slice, last projection -> slice
# published. guard: the no-harm guard's check of a denoised slice (service/guard.py).
STAGES = ("receive", "normalize", "wait", "fbp", "denoise", "guard", "publish", "end_to_end")
QUEUES = ("scans", "publish")
ERROR_STAGES = (
    "ingest",
    "prepare",
    "worker",
    "publish",
    "archive",
    "pva",
    "preview",
    "adapt",
    "incremental",
)
SCAN_OUTCOMES = ("completed", "failed")
# EPICS PV Access image PVs (service.pva), `<publish.pva_prefix><name>`
PVA_IMAGES = ("Slice", "Recon")
# What became of each scan's geometry prepare (service.prepare): built now, found cached, dropped
# (its queue was full), cancelled (the scan failed first), failed (also an error, stage prepare).
PREPARE_OUTCOMES = ("built", "cached", "dropped", "cancelled", "failed", "deferred")
# The no-harm guard's score (service/guard.py): 1 = the denoised slice fits the measured data as
# well as FBP; far above = contradicted. An edge exactly on the default threshold (1.25), so
# "share above it" is a bucket ratio; wide on both sides (the measured range is 0.003 .. 700).
GUARD_BUCKETS = (0.01, 0.1, 0.25, 0.5, 0.75, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0, 1e3)
# Why a denoised slice was published as plain FBP: its score was above guard.threshold
# (inconsistent), or it could not be scored (not_finite: a NaN/inf score, too few columns).
GUARD_FALLBACK_REASONS = ("inconsistent", "not_finite")
# Where a scan's rotation centre came from (service.preprocess.CENTER_SOURCES).
CENTER_SOURCES = ("declared", "config", "estimated", "default")
# The whole-scan preprocessing before FBP (stripes, centre, stitching), per scan.
PREPROCESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Previews (service.preview): latest projection in a snapshot -> its preview published.
PREVIEW_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Why a preview snapshot was not rendered: superseded in the full queue by a later one, or the
# scan's final slices had begun.
PREVIEW_DROP_REASONS = ("queue_full", "final_begun")
# POST /scans/{scan_id}/center (service.live): applied, or refused (bad value, no live scan).
CENTER_CHANGE_OUTCOMES = ("accepted", "rejected")
# What became of each adaptation of the denoiser to a completed scan (service/adapt.py):
# updated (swapped in between scans), rejected (it predicted the held-out angles no better),
# failed (an error, in the log), cancelled (stop came first), skipped (the scan cannot be
# adapted on, or a newer one replaced it before its turn).
MODEL_UPDATE_OUTCOMES = ("updated", "rejected", "failed", "cancelled", "skipped")
# Incremental reconstruction (service.incremental): the path a scan's rows took (incremental:
# folded in while the scan arrived; end_of_scan: not, or given up, see the log), and where each
# block of angles was folded in (arrival: on the incremental thread; scan_end: by the loop).
INCREMENTAL_PATHS = ("incremental", "end_of_scan")
INCREMENTAL_BLOCK_PLACES = ("arrival", "scan_end")


class Metrics:
    """The service's metrics. Thread-safe (prometheus-client metrics are).

    Values are pushed by the component that knows them (`metrics.projections.inc(n)`); values
    that are cheaper to read than to track (a queue's length, GPU memory) are read at scrape time
    through the `watch_*` methods, which the owner of the thing calls once at start-up.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._latency(self.registry)
        self._ingest(self.registry)
        self._output(self.registry)
        self._resources(self.registry)
        self._guard(self.registry)
        self._pva(self.registry)
        self._preview(self.registry)
        self._preprocess(self.registry)
        self._incremental(self.registry)

        self._cluster(self.registry)
        self._adapt(self.registry)
        self._create_labels()

    def _latency(self, r: CollectorRegistry) -> None:
        self.stage_seconds = Histogram(
            "tomocast_stage_seconds",
            "Time spent per stage; per slice for fbp, denoise, publish "
            "and end_to_end, per message for receive and normalize, per scan for wait",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.scan_tail_seconds = Histogram(
            "tomocast_scan_tail_seconds",
            "Last projection of a scan received -> its last slice published",
            buckets=TAIL_BUCKETS,
            registry=r,
        )

    def _ingest(self, r: CollectorRegistry) -> None:
        self.messages = Counter(
            "tomocast_messages_total", "Ingest messages accepted, by type", ["type"], registry=r
        )
        self.projections = Counter("tomocast_projections_total", "Projections accepted", registry=r)
        self.ingest_bytes = Counter(
            "tomocast_ingest_bytes_total", "Payload bytes accepted", registry=r
        )
        self.rejected = Counter(
            "tomocast_rejected_messages_total",
            "Ingest messages rejected, by reason",
            ["reason"],
            registry=r,
        )
        self.clipped_pixels = Counter(
            "tomocast_clipped_pixels_total",
            "Pixels whose flat-field ratio was not positive and were clipped before -log",
            registry=r,
        )
        self.scans_evicted = Counter(
            "tomocast_scans_evicted_total",
            "Live scans failed to make room for a new one after ingest.idle_evict_s of silence",
            registry=r,
        )
        # continuous scans (protocol v1.1, service.continuous)
        self.continuous_windows = Counter(
            "tomocast_continuous_windows_total",
            "Windows of continuous scans cut for reconstruction (rate: windows per second)",
            registry=r,
        )
        self.continuous_windows_dropped = Counter(
            "tomocast_continuous_windows_dropped_total",
            "Windows of continuous scans dropped because the reconstruct loop was behind",
            registry=r,
        )
        self.continuous_buffer_bytes = Gauge(
            "tomocast_continuous_buffer_bytes",
            "Ring buffers of live continuous scans plus their windows waiting for the loop",
            registry=r,
        )
        self.geometry_prepares = Counter(
            "tomocast_geometry_prepares_total",
            "FBP geometries asked for at scan start, by outcome",
            ["outcome"],
            registry=r,
        )

    def _output(self, r: CollectorRegistry) -> None:
        """Slices, scan outcomes and errors."""
        self.slices = Counter(
            "tomocast_slices_published_total", "Slices published, by topic", ["topic"], registry=r
        )
        # No "dropped for slow viewers" counter: ZeroMQ's PUB drops for a slow subscriber without
        # telling the sender. Each viewer counts its own losses from gaps in `pub_seq`.
        self.scans = Counter(
            "tomocast_scans_total", "Scans finished, by outcome", ["outcome"], registry=r
        )
        self.non_finite_pixels = Counter(
            "tomocast_non_finite_pixels_total",
            "Reconstructed or denoised pixels that were NaN or infinite, published as 0",
            registry=r,
        )
        self.late_dropped = Counter(
            "tomocast_late_slices_dropped_total",
            "Slices of a scan whose end had already been published (a batch the worker was "
            "writing when the drain timeout failed its scan), not sent, by topic",
            ["topic"],
            registry=r,
        )
        self.archive_abandoned = Counter(
            "tomocast_archive_abandoned_total",
            "Scan archive files abandoned on a write error (their .partial removed)",
            registry=r,
        )
        self.archive_stale_partials = Gauge(
            "tomocast_archive_stale_partials",
            "Partial archive files an earlier run left in archive.directory, found at start",
            registry=r,
        )
        self.errors = Counter(
            "tomocast_errors_total", "Unexpected errors, by stage", ["stage"], registry=r
        )

    def _guard(self, r: CollectorRegistry) -> None:
        """The no-harm guard (service/guard.py): its score per denoised slice, and the slices
        published as plain FBP in the denoiser's place."""
        self.guard_consistency = Histogram(
            "tomocast_guard_consistency",
            "No-harm guard score per denoised slice: chi2(denoised) / max(chi2(FBP), 1) against "
            "the measured sinogram (1: as consistent as FBP; above guard.threshold: FBP published)",
            buckets=GUARD_BUCKETS,
            registry=r,
        )
        self.guard_fallbacks = Counter(
            "tomocast_guard_fallbacks_total",
            "Slices published as plain FBP because the no-harm guard rejected the denoised one, "
            "by reason",
            ["reason"],
            registry=r,
        )

    def _resources(self, r: CollectorRegistry) -> None:
        """What the service holds: scans, queues, batch size, GPU memory, the model."""
        self.scans_in_flight = Gauge(
            "tomocast_scans_in_flight", "Scans being assembled or reconstructed", registry=r
        )
        self.queue_depth = Gauge(
            "tomocast_queue_depth", "Items waiting in a queue", ["queue"], registry=r
        )
        self.batch_size = Gauge("tomocast_batch_size", "Slices per worker batch", registry=r)
        self.gpu_memory = Gauge(
            "tomocast_gpu_memory_bytes",
            "GPU memory allocated by the service's tensors (0 on the CPU)",
            registry=r,
        )
        self.gpu_memory_reserved = Gauge(
            "tomocast_gpu_memory_reserved_bytes",
            "GPU memory held by PyTorch's caching "
            "allocator: what the card really has taken (0 on the CPU)",
            registry=r,
        )
        self.model = Info("tomocast_model", "The denoiser artifact in use", registry=r)

    def _pva(self, r: CollectorRegistry) -> None:
        """EPICS PV Access (service.pva): latest value wins, what was replaced is counted."""
        self.pva_updates = Counter(
            "tomocast_pva_updates_total", "Images posted to PV Access, by PV", ["pv"], registry=r
        )
        self.pva_superseded = Counter(
            "tomocast_pva_superseded_total",
            "Images replaced by a newer one before they were posted to PV Access, by PV",
            ["pv"],
            registry=r,
        )
        for label in PVA_IMAGES:
            self.pva_updates.labels(label)
            self.pva_superseded.labels(label)

    def _preview(self, r: CollectorRegistry) -> None:
        """Previews during a scan and the live centre (service.preview, service.live)."""
        self.preview_latency = Histogram(
            "tomocast_preview_latency_seconds",
            "Latest projection included in a preview received -> each preview slice published",
            buckets=PREVIEW_BUCKETS,
            registry=r,
        )
        self.previews = Counter(
            "tomocast_previews_published_total",
            "Preview slices published (topic preview), one per previewed row",
            registry=r,
        )
        self.previews_dropped = Counter(
            "tomocast_previews_dropped_total",
            "Preview snapshots not rendered, by reason (queue_full: superseded by a later one; "
            "final_begun: the scan's final slices had begun)",
            ["reason"],
            registry=r,
        )
        self.center_changes = Counter(
            "tomocast_center_changes_total",
            "Live centre changes (POST /scans/{scan_id}/center), by outcome",
            ["outcome"],
            registry=r,
        )
        for reason in PREVIEW_DROP_REASONS:
            self.previews_dropped.labels(reason)
        for outcome in CENTER_CHANGE_OUTCOMES:
            self.center_changes.labels(outcome)

    def _preprocess(self, r: CollectorRegistry) -> None:
        """What `[preprocess]` did (service.preprocess)."""
        self.center = Gauge(
            "tomocast_center_pixels",
            "Rotation centre the last scan was reconstructed about (tomocast's convention: "
            "cols/2 is the detector's middle; the stitched detector's for half-acquisition)",
            registry=r,
        )
        self.centers = Counter(
            "tomocast_centers_total",
            "Scans reconstructed, by where their centre came from "
            "(declared, config, estimated, default)",
            ["source"],
            registry=r,
        )
        self.zinger_pixels = Counter(
            "tomocast_zinger_pixels_total",
            "Projection pixels replaced as zingers before -log (preprocess.zingers)",
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "tomocast_preprocess_seconds",
            "Preprocessing of a complete scan before its first FBP batch (stripes, centre, "
            "stitching), per scan",
            buckets=PREPROCESS_BUCKETS,
            registry=r,
        )

    def _cluster(self, r: CollectorRegistry) -> None:
        """Engines a scan's rows are spread over (service.cluster): devices or Ray actors,
        labelled by their index in the coordinator's list."""
        self.cluster_workers = Gauge(
            "tomocast_cluster_workers",
            "Live engines reconstructing work units: local devices or Ray actors "
            "(0: the worker's own conveyor, one device)",
            registry=r,
        )
        self.cluster_unit_seconds = Histogram(
            "tomocast_cluster_unit_seconds",
            "A work unit of a scan's rows, handed to a worker -> its slices back, by worker",
            ["worker"],
            buckets=TAIL_BUCKETS,
            registry=r,
        )
        self.cluster_units_retried = Counter(
            "tomocast_cluster_units_retried_total",
            "Work units re-run on another worker because theirs was lost",
            registry=r,
        )
        self.cluster_workers_lost = Counter(
            "tomocast_cluster_workers_lost_total",
            "Cluster workers (Ray actors) lost while the service ran",
            registry=r,
        )
        self.cluster_workers_replaced = Counter(
            "tomocast_cluster_workers_replaced_total",
            "Ray actors started in the place of lost ones (cluster.replacements in a row at most)",
            registry=r,
        )
        self.cluster_geometry_builds = Counter(
            "tomocast_cluster_unit_geometry_builds_total",
            "Work units whose engine built the scan's FBP geometry itself, in the scan's tail "
            "(not prepared at scan_start)",
            registry=r,
        )
        # worker "0" always exists (the one device, or the first engine); the coordinator
        # creates the others' label sets as it starts
        self.cluster_unit_seconds.labels("0")

    def _adapt(self, r: CollectorRegistry) -> None:
        """Adaptation of the denoiser to completed scans (service/adapt.py, model.adapt)."""
        self.model_updates = Counter(
            "tomocast_model_updates_total",
            "Adaptations of the denoiser to a completed scan, by outcome (updated: the adapted "
            "weights were swapped in between scans)",
            ["outcome"],
            registry=r,
        )

    def _incremental(self, r: CollectorRegistry) -> None:
        """Incremental reconstruction while scans arrive (service.incremental)."""
        self.incremental_scans = Counter(
            "tomocast_incremental_scans_total",
            "Scans reconstructed with incremental.enabled, by path: incremental (blocks of "
            "angles folded in as they arrived) or end_of_scan (all at the end; the log says why)",
            ["path"],
            registry=r,
        )
        self.incremental_blocks = Counter(
            "tomocast_incremental_blocks_total",
            "Blocks of angles folded into incremental scans' accumulators, by where: arrival "
            "(while the scan arrived) or scan_end (the remainder, by the reconstruct loop)",
            ["where"],
            registry=r,
        )
        self.incremental_bytes = Gauge(
            "tomocast_incremental_bytes",
            "Bytes of accumulators held for scans being received (incremental.max_bytes bounds it)",
            registry=r,
        )
        for path in INCREMENTAL_PATHS:
            self.incremental_scans.labels(path)
        for where in INCREMENTAL_BLOCK_PLACES:
            self.incremental_blocks.labels(where)

    def _create_labels(self) -> None:
        """Every label set up front: dashboards show zeros before the first scan."""
        for metric, labels in (
            (self.stage_seconds, STAGES),
            (self.messages, MESSAGE_TYPES),
            (self.rejected, REJECT_REASONS),
            (self.slices, ("slice", "recon")),
            (self.scans, SCAN_OUTCOMES),
            (self.errors, ERROR_STAGES),
            (self.queue_depth, QUEUES),
            (self.geometry_prepares, PREPARE_OUTCOMES),
            (self.guard_fallbacks, GUARD_FALLBACK_REASONS),
            (self.centers, CENTER_SOURCES),
            (self.model_updates, MODEL_UPDATE_OUTCOMES),
        ):
            for label in labels:
                metric.labels(label)

    def scan_ended(self, event: ScanEnded) -> None:
        """Count a scan's outcome (`tomocast_scans_total`): called where every scan's last
        event is published (`PublishChannel.send_event`), once per scan."""
        self.scans.labels("completed" if isinstance(event, ScanCompleted) else "failed").inc()

    def watch_queue(self, name: str, depth: Callable[[], float]) -> None:
        """Report `depth()` (e.g. a `queue.Queue`'s `qsize`) as the queue's depth at each scrape.

        `depth` runs on the HTTP thread: it must be cheap and thread-safe.
        """
        if name not in QUEUES:
            raise ValueError(f"queue {name!r} is not one of {', '.join(QUEUES)}")
        self.queue_depth.labels(name).set_function(depth)

    def watch_gpu_memory(
        self, allocated: Callable[[], float], reserved: Callable[[], float]
    ) -> None:
        """Read GPU memory at each scrape, e.g. `lambda: torch.cuda.memory_allocated(device)`
        and `torch.cuda.memory_reserved`; both run on the HTTP thread."""
        self.gpu_memory.set_function(allocated)
        self.gpu_memory_reserved.set_function(reserved)
