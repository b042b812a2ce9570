"""Adaptation of the denoiser to the user's sample while the service runs (`model.adapt`).

    [worker] scan completed --`completed`: its central rows, copied to the host (bounded by
        model.adapt_memory_bytes)--> one-scan mailbox (the latest scan wins)
    [adapt thread] Noise2Inverse fine-tuning of a copy of the current weights on that scan
        (`models.training.selfsupervised`: K interleaved angle subsets, each reconstructed with
        the service's own FBP settings), for model.adapt_seconds of training steps; exported;
        the engine rebuilt in the precision the service runs (int8 re-calibrated, fp16, fp32)
        --`ModelSlot.offer`--> swapped in between scans, never inside one
        --> event `model_updated` (topic `event`), `tomocast_model_updates_total{outcome}`

The slot (`ModelSlot`) is what the reconstruct loop asks for its denoiser at the start of each
scan and holds until the scan's end (`service.reconstruct.ModelSwap`): adapted weights offered
while a scan is in the loop wait for its end; offered while the loop is idle, they go in at once.

Share of the machine: on the CPU the adapt thread computes on model.adapt_threads threads (torch's
intra-op threads are per thread); on CUDA it trains only while no scan is in the loop (each step
waits for the loop to be idle). Adapted weights that predict the scan's held-out angles no better
than the current ones (the Noise2Inverse objective, on the scan itself) are rejected; a failure
or a stop leaves the current weights in place; each says why in the log and counts its outcome.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from service.config import ModelSettings, WorkerSettings
from service.errors import DataError
from service.events import ModelUpdated
from service.metrics import Metrics
from service.publish import PublishChannel
from service.sinogram import CompletedScan
from service.stage import StageThread
from workers.denoise import DenoiseEngine, load_denoiser

if TYPE_CHECKING:
    from models.training.train import Trainer

log = logging.getLogger(__name__)

# Noise2Inverse's settings, as docs/adaptation.md measured them (2 interleaved subsets, 64 px
# patches, batch 16, Adam at 1e-4, pixel MSE)
SUBSETS = 2
PATCH = 64
BATCH = 16
LEARNING_RATE = 1e-4
VALIDATION_SLICES = 8  # whole slices the held-out figure is taken on
NO_STEP_CAP = 1 << 40
# how often a training step waiting for the loop to be idle (CUDA) looks for a stop
IDLE_POLL_S = 0.5
ADAPTED = re.compile(r"^(?P<base>.+)-adapted-(?P<n>\d+)$")


def rows_that_fit(angles: int, cols: int, budget_bytes: int, subsets: int = SUBSETS) -> int:
    """Detector rows adaptation can hold within `budget_bytes`: per row, its sinogram (angles x
    cols) and the training pairs (K subset FBPs, their scaled copies and the K inputs, plus the
    full FBP: (3K + 1) x cols^2), float32."""
    per_row = 4 * (angles * cols + (3 * subsets + 1) * cols * cols)
    return budget_bytes // per_row


def adapted_name(current: str, directory: Path) -> str:
    """`<base>-adapted-<n>` for the weights adapted from `current`: n one more than current's
    (0 for a model not adapted yet), bumped past names already in `directory`."""
    found = ADAPTED.match(current)
    base, n = (found["base"], int(found["n"])) if found else (current, 0)
    while True:
        n += 1
        name = f"{base}-adapted-{n}"
        if not (directory / f"{name}.pt").exists():
            return name


@dataclass(frozen=True)
class KeptScan:
    """Rows [first, first + rows) of a completed scan, as line integrals (angles, rows, cols) on
    the host, about the centre it was reconstructed at. Plain data, read by the adapt thread."""

    scan_id: str
    sinogram: np.ndarray
    theta: np.ndarray
    center: float
    first: int
    scan_rows: int

    @property
    def rows(self) -> int:
        return int(self.sinogram.shape[1])


def keep_rows(scan: CompletedScan, budget_bytes: int) -> KeptScan | None:
    """The central rows of `scan` that fit `budget_bytes` (`rows_that_fit`), copied to the
    host; None when not even one row fits."""
    rows, angles, cols = scan.sinogram.shape
    take = min(rows, rows_that_fit(angles, cols, budget_bytes))
    if take < 1:
        return None
    first = (rows - take) // 2
    part = scan.sinogram[first : first + take].float().cpu().numpy()
    return KeptScan(
        scan.start.scan_id,
        np.array(part.transpose(1, 0, 2), order="C"),  # a copy: never a view of the scan
        np.asarray(scan.theta, dtype=np.float64),
        float(scan.center),
        first,
        rows,
    )


@dataclass
class Update:
    """Adapted weights, loaded and ready to run, and the event announcing them."""

    engine: DenoiseEngine
    event: ModelUpdated
    swapped: threading.Event = field(default_factory=threading.Event)


class ModelSlot:
    """The denoiser the reconstruct loop runs, and adapted weights waiting for a gap between
    scans.

    Threading: the loop's thread holds `scan()` for the whole of each scan; the adapt thread
    `offer`s weights. They are swapped in at once when no scan is in the loop, else when the
    scan in the loop ends (after its last event) or, at the latest, before the next begins. The
    slot's publisher channel is used only by whichever thread holds the scan lock; `close` it
    once the loop has ended.
    """

    def __init__(self, denoiser: DenoiseEngine, channel: PublishChannel, metrics: Metrics) -> None:
        self._scan_lock = threading.Lock()  # held by the loop for a scan, or by a swap
        self._state = threading.Lock()  # guards _pending and _closed
        self._current = denoiser
        self._pending: Update | None = None
        self._closed = False
        self._channel = channel
        self.metrics = metrics
        self.idle = threading.Event()  # set while no scan is in the loop
        self.idle.set()

    @property
    def current(self) -> DenoiseEngine:
        """The weights the loop runs (or will run for its next scan, once a swap is done)."""
        return self._current

    @contextmanager
    def scan(self) -> Iterator[DenoiseEngine]:
        """The loop's thread, around one scan: the denoiser to run for all of it."""
        with self._scan_lock:
            self.idle.clear()
            try:
                self._swap_pending()
                yield self._current
            finally:
                self._swap_pending()
                self.idle.set()

    def offer(self, update: Update) -> bool:
        """Hand over adapted weights (any thread but the loop's); swapped now when no scan is in
        the loop. False when the slot is closed (the service stops): they are dropped."""
        with self._state:
            if self._closed:
                return False
            self._pending = update
        if self._scan_lock.acquire(blocking=False):
            try:
                self._swap_pending()
            finally:
                self._scan_lock.release()
        return True

    def close(self, timeout: float) -> bool:
        """No more swaps; weights not yet swapped in are dropped; the channel is closed. Call
        once the loop has ended. False (channel left open) when a swap held on past
        `timeout`."""
        with self._state:
            self._closed = True
            dropped, self._pending = self._pending, None
        if dropped is not None:
            self.metrics.model_updates.labels("cancelled").inc()
            log.info("adapted weights %s dropped: the service stops", dropped.event.model)
            dropped.swapped.set()
        if not self._scan_lock.acquire(timeout=timeout):
            return False
        try:
            self._channel.close()
        finally:
            self._scan_lock.release()
        return True

    def _swap_pending(self) -> None:
        """With the scan lock held: the pending weights (if any) become the current ones."""
        with self._state:
            update, self._pending = self._pending, None
            if self._closed:
                return
        if update is None:
            return
        self._current = update.engine
        self._channel.send_event(update.event)
        self.metrics.model_updates.labels("updated").inc()
        self.metrics.model.info(model_info(update.engine))
        event = update.event
        log.info(
            "model updated: %s replaces %s (adapted on scan_id=%s, %d rows; held-out angles "
            "%.2f dB, %+.3f dB; %.1f s)",
            event.model,
            event.previous,
            event.scan_id,
            event.rows,
            event.validation_psnr_db,
            event.validation_gain_db,
            event.seconds,
        )
        update.swapped.set()


def model_info(engine: DenoiseEngine) -> dict[str, str]:
    """`tomocast_model_info`'s labels for `engine` (as the service sets them at start)."""
    meta = engine.metadata
    return {
        "name": meta.name,
        "arch": meta.arch,
        "depth": str(meta.depth),
        "precision": engine.precision,
        "trained": str(meta.trained).lower(),
        "version": meta.tomocast_version,
        "device": str(engine.device),
    }


class Adapter(StageThread):
    """The adapt thread: fine-tunes the slot's current weights on the latest completed scan and
    offers the result to the slot. Implements `service.reconstruct.ModelSwap` for the loop.

    Threading: `completed` and `scan` run on the loop's thread; the rest on the adapt thread.
    One scan waits at most (a newer one replaces it: outcome skipped); memory is bounded by
    twice model.adapt_memory_bytes (the waiting scan, the one being adapted on) plus one
    network's weights and optimiser state.
    """

    def __init__(
        self,
        settings: ModelSettings,
        worker: WorkerSettings,
        slot: ModelSlot,
        device: torch.device,
        metrics: Metrics,
    ) -> None:
        super().__init__("adapt", metrics)
        from models.training.selfsupervised import FBPChoice

        self.settings = settings
        self.slot = slot
        self.device = device
        self.fbp = FBPChoice(worker.fbp_method, worker.filter_name, worker.circle_mask)
        self._temporary = settings.adapt_dir is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="tomocast-adapt-"))
            if settings.adapt_dir is None
            else Path(settings.adapt_dir)
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Condition()
        self._next: KeptScan | None = None

    # ---- the loop's thread (ModelSwap) ------------------------------------------------------

    def scan(self) -> AbstractContextManager[DenoiseEngine]:
        return self.slot.scan()

    def completed(self, scan: CompletedScan) -> None:
        """Keep the rows of a completed scan to adapt on (replacing one still waiting)."""
        if self.stopping:
            return
        kept = keep_rows(scan, self.settings.adapt_memory_bytes)
        if kept is None:
            self._skip(scan.start.scan_id, "not one row fits model.adapt_memory_bytes")
            return
        if kept.rows < kept.scan_rows:
            log.info(
                "scan_id=%s adaptation will use rows %d-%d of %d (model.adapt_memory_bytes)",
                kept.scan_id,
                kept.first,
                kept.first + kept.rows - 1,
                kept.scan_rows,
            )
        with self._wake:
            if self._next is not None:
                self._skip(self._next.scan_id, f"scan_id={kept.scan_id} came before its turn")
            self._next = kept
            self._wake.notify()

    # ---- the adapt thread -------------------------------------------------------------------

    def _signal_stop(self) -> None:
        with self._wake:
            if self._next is not None:
                self.metrics.model_updates.labels("cancelled").inc()
                log.info("scan_id=%s not adapted on: the service stops", self._next.scan_id)
                self._next = None
            self._wake.notify()

    def _take(self) -> KeptScan | None:
        with self._wake:
            while self._next is None and not self.stopping:
                self._wake.wait()
            kept, self._next = self._next, None
            if self.stopping and kept is not None:
                self.metrics.model_updates.labels("cancelled").inc()
                log.info("scan_id=%s not adapted on: the service stops", kept.scan_id)
            return None if self.stopping else kept

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.settings.adapt_threads)  # this thread's, not the loop's
        while (kept := self._take()) is not None:
            if not self.guarded(f"adaptation on scan_id={kept.scan_id}", self.adapt, kept):
                self.metrics.model_updates.labels("failed").inc()

    def remove_directory(self) -> None:
        """Remove the temporary folder of adapted artifacts (a configured one is kept). After
        the thread has ended."""
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _skip(self, scan_id: str, why: str) -> None:
        self.metrics.model_updates.labels("skipped").inc()
        log.warning("scan_id=%s not adapted on: %s", scan_id, why)

    def _interrupted(self) -> bool:
        """Stop training now? On CUDA, first waits until no scan is in the loop."""
        if self.device.type == "cuda":
            while not self.slot.idle.wait(IDLE_POLL_S):
                if self.stopping:
                    return True
        return self.stopping

    def adapt(self, kept: KeptScan) -> None:
        """Fine-tune the current weights on `kept`, offer them to the slot, wait for the swap."""
        from models.training.selfsupervised import ScanLineIntegrals, adapt, adapter

        started = time.monotonic()
        current = self.slot.current
        cols = kept.sinogram.shape[2]
        patch = min(PATCH, cols // 8 * 8)
        if patch < 8:
            self._skip(kept.scan_id, f"slices of {cols} px are too small to train on")
            return
        if not np.all(np.isfinite(kept.sinogram)):
            self._skip(kept.scan_id, "its line integrals hold NaN or infinite values")
            return
        scan = ScanLineIntegrals(
            kept.sinogram,
            kept.theta,
            kept.center,
            f"scan_id={kept.scan_id} rows {kept.first}-{kept.first + kept.rows - 1}",
        )
        name = adapted_name(current.name, self.directory)
        run_dir = self.directory / f".{name}"
        on_cuda = self.device.type == "cuda"
        try:
            trainer = adapter(
                scan,
                current.path,
                device=str(self.device),
                subsets=SUBSETS,
                command=f"tomocast serve (model.adapt) on scan_id={kept.scan_id}",
                fbp=self.fbp,
                patch=patch,
                batch=BATCH,
                steps=self.settings.adapt_steps or NO_STEP_CAP,
                lr=LEARNING_RATE,
                precision="mixed" if on_cuda else "fp32",
                seed=0,
                val_every=NO_STEP_CAP,
                val_slices=VALIDATION_SLICES,
                checkpoint_every=NO_STEP_CAP,
            )
        except DataError as exc:  # a scan adaptation cannot use: too few angles, all zero
            self._skip(kept.scan_id, str(exc))
            return
        before = trainer.validate()["psnr"]
        try:
            summary = adapt(
                trainer,
                run_dir,
                self.settings.adapt_seconds,
                progress=False,
                stop=self._interrupted,
            )
            if self.stopping:
                self.metrics.model_updates.labels("cancelled").inc()
                log.info("scan_id=%s adaptation cancelled: the service stops", kept.scan_id)
                return
            after = float(summary["validation"]["psnr"])
            gain = after - before
            if not (math.isfinite(after) and gain > 0):
                self.metrics.model_updates.labels("rejected").inc()
                log.warning(
                    "scan_id=%s adaptation rejected: the adapted weights predict held-out "
                    "angles at %.3f dB, the current %s at %.3f dB; keeping %s",
                    kept.scan_id,
                    after,
                    current.name,
                    before,
                    current.name,
                )
                return
            path = self._export(trainer, name, current.metadata.precision)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        engine = load_denoiser(
            path,
            self.device,
            precision=self.settings.precision,
            memory_limit_bytes=self.settings.memory_bytes,
            field_width=self.settings.field_width,
        )
        event = ModelUpdated(
            model=engine.name,
            previous=current.name,
            scan_id=kept.scan_id,
            rows=kept.rows,
            validation_psnr_db=after,
            validation_gain_db=gain,
            seconds=time.monotonic() - started,
            train_seconds=float(summary["train_seconds"]),
            steps=int(summary["steps"]),
        )
        update = Update(engine, event)
        if not self.slot.offer(update):
            self.metrics.model_updates.labels("cancelled").inc()
            return
        # the next adaptation starts from these weights: wait until they are the current ones
        while not update.swapped.wait(IDLE_POLL_S):
            if self.stopping:
                return

    def _export(self, trainer: Trainer, name: str, precision: str) -> Path:
        """The trainer's generator as a TorchScript artifact `<name>.pt` in the folder."""
        from models.artifact import save_artifact
        from models.training.export import checkpoint_metadata, generator_from_checkpoint

        state = trainer.state()
        generator, _ = generator_from_checkpoint(state)
        return save_artifact(
            generator, checkpoint_metadata(state, name, precision), self.directory / f"{name}.pt"
        )
