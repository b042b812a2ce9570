"""The archive: every slice the service makes, written per scan to HDF5 on its own thread.

Layout (DXchange-like), one file per scan, `<directory>/<scan_id>.h5`:
    /exchange/data          (rows, N, N) float32  denoised slices (or FBP when denoising is off)
    /exchange/recon         (rows, N, N) float32  plain FBP slices, with `archive.recon`
    /exchange/theta         (angles,)   float64  degrees, the angles reconstructed
    /exchange/received      (rows,)     bool     slices written
    /process/tomocast       attrs: version, model (JSON metadata), center, scan meta (JSON),
                            completed (the scan_completed event, JSON)
A file is written as `<scan_id>.h5.partial` and renamed when its scan completes, so a file with
the final name is always complete. Policy: block — the worker waits when the disk is slower than
the pipeline (nothing is lost). A write error (disk full, unwritable directory) abandons that
scan's file with one log line and `tomocast_errors_total{stage="archive"}`; publishing goes on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from service import __version__
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Begin:
    scan_id: str
    rows: int
    size: int
    theta: np.ndarray
    center: float
    meta: dict[str, Any]


@dataclass(frozen=True)
class _Write:
    scan_id: str
    topic: str
    first_index: int
    slices: np.ndarray


@dataclass(frozen=True)
class _End:
    scan_id: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Abort:
    scan_id: str


class Archive:
    """Owns the archive thread and its open files. `begin`/`write`/`end` are called from the
    worker thread (they block when `queue_items` are waiting); `start`/`stop` from the owner."""

    def __init__(
        self,
        directory: Path,
        keep_recon: bool,
        queue_items: int,
        metrics: Metrics,
        model: dict[str, Any],
    ) -> None:
        self.directory = directory
        self.keep_recon = keep_recon
        self.metrics = metrics
        self.model_json = json.dumps(model, default=str)
        self._queue: queue.Queue[_Begin | _Write | _End | _Abort | None] = queue.Queue(queue_items)
        self._files: dict[str, h5py.File] = {}
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        log.info("archiving slices to %s", self.directory)

    def stop(self) -> None:
        """Write everything queued, close the files, join the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def begin(
        self,
        scan_id: str,
        rows: int,
        size: int,
        theta: np.ndarray,
        center: float,
        meta: dict[str, Any],
    ) -> None:
        self._queue.put(_Begin(scan_id, rows, size, theta, center, meta))

    def write(self, scan_id: str, topic: str, first_index: int, slices: np.ndarray) -> None:
        if topic == "recon" and not self.keep_recon:
            return
        self._queue.put(_Write(scan_id, topic, first_index, slices))

    def end(self, scan_id: str, summary: dict[str, Any]) -> None:
        self._queue.put(_End(scan_id, summary))

    def abort(self, scan_id: str) -> None:
        """The scan failed: drop its partial file."""
        self._queue.put(_Abort(scan_id))

    def path(self, scan_id: str) -> Path:
        return self.directory / f"{scan_id}.h5"

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if isinstance(item, _Begin):
                    self._begin(item)
                elif item.scan_id in self._files:
                    if isinstance(item, _Write):
                        self._write(item)
                    elif isinstance(item, _End):
                        self._end(item)
                    else:
                        log.warning(
                            "scan_id=%s failed: its partial archive is removed", item.scan_id
                        )
                        self._abandon(item.scan_id)
            except Exception as exc:  # the one place: disk full, unwritable, bad metadata...
                log.error(
                    "scan_id=%s archive abandoned: %s: %s", item.scan_id, type(exc).__name__, exc
                )
                self.metrics.errors.labels("archive").inc()
                self._abandon(item.scan_id)
        for scan_id in list(self._files):
            log.error("scan_id=%s archive left incomplete at shutdown", scan_id)
            self._abandon(scan_id, keep=True)

    def _begin(self, item: _Begin) -> None:
        partial = self.path(item.scan_id).with_suffix(".h5.partial")
        f = h5py.File(partial, "w")
        self._files[item.scan_id] = f
        shape = (item.rows, item.size, item.size)
        chunks = (1, item.size, item.size)
        f.create_dataset("exchange/data", shape, np.float32, chunks=chunks, fillvalue=np.nan)
        if self.keep_recon:
            f.create_dataset("exchange/recon", shape, np.float32, chunks=chunks, fillvalue=np.nan)
        f["exchange/theta"] = np.degrees(item.theta)
        f["exchange/theta"].attrs["units"] = "degrees"
        f.create_dataset("exchange/received", (item.rows,), bool, fillvalue=False)
        process = f.require_group("process/tomocast")
        process.attrs.update(
            version=__version__,
            model=self.model_json,
            center=item.center,
            meta=json.dumps(item.meta, default=str),
        )

    def _write(self, item: _Write) -> None:
        f = self._files[item.scan_id]
        stop = item.first_index + len(item.slices)
        if item.topic == "recon":
            f["exchange/recon"][item.first_index : stop] = item.slices
            return
        f["exchange/data"][item.first_index : stop] = item.slices
        f["exchange/received"][item.first_index : stop] = True

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
