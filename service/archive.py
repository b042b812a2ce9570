"""The archive: every slice the service makes, written per scan to HDF5 on its own thread.

Layout (DXchange-like), one file per scan, `<directory>/<scan_id>.h5`:
    /exchange/data          (rows, N, N) float32  denoised slices (or FBP when denoising is off)
    /exchange/recon         (rows, N, N) float32  plain FBP slices, with `archive.recon`
    /exchange/theta         (angles,)   float64  degrees, the angles reconstructed
    /exchange/received      (rows,)     bool     slices written
    /process/tomocast       attrs: version, model (JSON metadata), center, scan meta (JSON),
                            completed (the ScanCompleted event, JSON)
A file is written as `<scan_id>.h5.partial` and renamed when its scan completes, so a file with
the final name is always complete. A `SliceSink` (`service.sinks`) of the reconstruct loop.
Policy: block — the loop waits when the disk is slower than the pipeline (nothing is lost). A
write error (disk full, unwritable directory) abandons that scan's file with one log line and
`tomocast_errors_total{stage="archive"}`; publishing goes on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from service import __version__
from service.events import ScanCompleted, ScanEnded
from service.metrics import Metrics
from service.sinks import ScanDescription, SliceBatch
from service.stage import StageThread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Begin:
    scan_id: str
    scan: ScanDescription


@dataclass(frozen=True)
class _Write:
    scan_id: str
    batch: SliceBatch


@dataclass(frozen=True)
class _End:
    scan_id: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Abort:
    scan_id: str


class Archive(StageThread):
    """Owns the archive thread and its open files. `begin`/`write`/`end` (its `SliceSink`) are
    called from the reconstruct loop's thread (they block when `queue_items` are waiting);
    `start`/`stop` from the owner."""

    def __init__(
        self,
        directory: Path,
        keep_recon: bool,
        queue_items: int,
        metrics: Metrics,
        model: dict[str, Any],
    ) -> None:
        super().__init__("archive", metrics)
        self.directory = directory
        self.keep_recon = keep_recon
        self.model_json = json.dumps(model, default=str)
        self._queue: queue.Queue[_Begin | _Write | _End | _Abort | None] = queue.Queue(queue_items)
        self._files: dict[str, h5py.File] = {}

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        super().start()
        log.info("archiving slices to %s", self.directory)

    def _signal_stop(self) -> None:
        """The thread writes everything queued, closes the files and ends (`join`)."""
        if self.alive:
            self._queue.put(None)

    def begin(self, scan: ScanDescription) -> None:
        self._queue.put(_Begin(scan.scan_id, scan))

    def write(self, batch: SliceBatch) -> None:
        if batch.topic == "recon" and not self.keep_recon:
            return
        self._queue.put(_Write(batch.scan_id, batch))

    def end(self, outcome: ScanEnded) -> None:
        """Completed: the file gets the event and its final name. Failed: the partial file is
        removed."""
        if isinstance(outcome, ScanCompleted):
            self._queue.put(_End(outcome.scan_id, outcome.encode()))
        else:
            self._queue.put(_Abort(outcome.scan_id))

    def path(self, scan_id: str) -> Path:
        return self.directory / f"{scan_id}.h5"

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            # disk full, unwritable, bad metadata...: that scan's file is abandoned
            what = f"scan_id={item.scan_id} archive (abandoned)"
            done = self.guarded(what, self._apply, item, traceback=False)
            if not done:
                self._abandon(item.scan_id)
        for scan_id in list(self._files):
            log.error("scan_id=%s archive left incomplete at shutdown", scan_id)
            self._abandon(scan_id, keep=True)

    def _apply(self, item: _Begin | _Write | _End | _Abort) -> None:
        if isinstance(item, _Begin):
            self._begin(item)
        elif item.scan_id in self._files:
            if isinstance(item, _Write):
                self._write(item)
            elif isinstance(item, _End):
                self._end(item)
            else:
                log.warning("scan_id=%s failed: its partial archive is removed", item.scan_id)
                self._abandon(item.scan_id)

    def _begin(self, item: _Begin) -> None:
        scan = item.scan
        partial = self.path(item.scan_id).with_suffix(".h5.partial")
        f = h5py.File(partial, "w")
        self._files[item.scan_id] = f
        shape = (scan.rows, scan.cols, scan.cols)
        chunks = (1, scan.cols, scan.cols)
        f.create_dataset("exchange/data", shape, np.float32, chunks=chunks, fillvalue=np.nan)
        if self.keep_recon:
            f.create_dataset("exchange/recon", shape, np.float32, chunks=chunks, fillvalue=np.nan)
        f["exchange/theta"] = np.degrees(scan.theta)
        f["exchange/theta"].attrs["units"] = "degrees"
        f.create_dataset("exchange/received", (scan.rows,), bool, fillvalue=False)
        process = f.require_group("process/tomocast")
        process.attrs.update(
            version=__version__,
            model=self.model_json,
            center=scan.center,
            meta=json.dumps(scan.meta, default=str),
        )

    def _write(self, item: _Write) -> None:
        f, batch = self._files[item.scan_id], item.batch
        if batch.topic == "recon":
            f["exchange/recon"][batch.first : batch.stop] = batch.slices
            return
        f["exchange/data"][batch.first : batch.stop] = batch.slices
        f["exchange/received"][batch.first : batch.stop] = True

    def _end(self, item: _End) -> None:
        f = self._files.pop(item.scan_id)
        f["process/tomocast"].attrs["completed"] = json.dumps(item.summary, default=str)
        partial = Path(f.filename)
        f.close()
        final = self.path(item.scan_id)
        n = 0
        while final.exists():  # a scan_id used again: never overwrite an earlier scan's file
            n += 1
            final = self.directory / f"{item.scan_id}.{n}.h5"
        os.replace(partial, final)
        log.info("scan_id=%s archived to %s", item.scan_id, final)

    def _abandon(self, scan_id: str, keep: bool = False) -> None:
        f = self._files.pop(scan_id, None)
        if f is None:
            return
        partial = Path(f.filename)
        try:
            f.close()
            if not keep:
                partial.unlink(missing_ok=True)
        except OSError as exc:
            log.error("scan_id=%s could not clean up %s: %s", scan_id, partial, exc)
