"""The archive: every slice the service makes, written per scan to HDF5 on its own thread.

Layout: NeXus (`service.nexus`), one file per scan, `<directory>/<scan_id>.h5`:
    /entry                  NXentry: title (scan_id), start_time, end_time
    /entry/data             NXdata: data (rows, N, N) float32, the slices (denoised, or FBP
                            when denoising is off; attribute `scale` for denoised ones),
                            received (rows,) bool, slice_index (rows,) and, with a
                            denoiser, denoised (rows,) bool and consistency (rows,) float32
                            (the no-harm guard's verdict and score per slice, NaN: unscored)
    /entry/recon            NXdata: the plain FBP slices, with `archive.recon`
    /entry/sample           NXsample: rotation_angle (angles,) degrees, the angles reconstructed
    /entry/tomocast         NXprocess: program, version, date, model_name, model and settings
                            (NXnote, JSON), the scan's parameters (`scan_parameters`); attrs
                            version, model, center, meta and, once complete, completed (the
                            ScanCompleted event), all JSON where not a number
and, for DXchange readers (TomoPy's dxchange, scripts written before NeXus), HDF5 soft links to
the same datasets: /exchange/data, /exchange/recon, /exchange/received, /exchange/theta and
/process/tomocast. The slice datasets are compressed with `archive.compression`.

A file is written as `<scan_id>.h5.partial` and renamed when its scan completes, so a file with
the final name is always complete. A `SliceSink` (`service.sinks`) of the reconstruct loop.
Policy: block — the loop waits when the disk is slower than the pipeline (nothing is lost). A
write error (disk full, unwritable directory) abandons that scan's file: closed, the `.partial`
removed, one log line, `tomocast_errors_total{stage="archive"}` and
`tomocast_archive_abandoned_total`; publishing goes on. HDF5 writes through a `_GuardedFile`
that drops every write after the first failed one, so the file can still be closed (HDF5
flushes at close) on the archive thread, never left open for the interpreter's exit.

`.partial` files found at start were left by a crash: they are logged, counted
(`tomocast_archive_stale_partials`) and never overwritten (a new scan with the same scan_id
writes `<scan_id>.1.h5.partial`, ...).
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

from service import __version__, nexus
from service.errors import ConfigError
from service.events import ScanCompleted, ScanEnded
from service.metrics import Metrics
from service.sinks import ScanDescription, SliceBatch
from service.stage import StageThread

log = logging.getLogger(__name__)

ENTRY = "entry"
# DXchange name -> the NeXus object it links to (readers of the layout before NeXus)
LEGACY_LINKS = {
    "exchange/data": "/entry/data/data",
    "exchange/recon": "/entry/recon/data",
    "exchange/received": "/entry/data/received",
    "exchange/theta": "/entry/sample/rotation_angle",
    "process/tomocast": "/entry/tomocast",
}


def scan_parameters(scan: ScanDescription) -> dict[str, Any]:
    """The scan-level parameters the archive records in its NXprocess (`/entry/tomocast`), one
    field and one attribute each (dicts and lists as JSON).

    THE ONE PLACE where scan-level attributes are written: a new `ScanDescription` field that
    belongs in the archive (the centre's source, the preprocessing applied, ...) is one more
    key here."""
    return {
        "center": scan.center,  # the rotation axis used, pixels (tomocast's convention)
        "center_source": scan.center_source,  # declared, config, estimated or default
        "preprocessing": scan.preprocessing,  # setting -> what ran ([preprocess])
        "meta": scan.meta,  # the DAQ's, from scan_start
    }


class _GuardedFile:
    """The bytes of one archive file as HDF5 writes them (h5py's file-object driver). A failed
    write (disk full, file too large, I/O error) is recorded in `failed`, not raised: an
    exception does not cross HDF5's C code cleanly (h5py reports some from destructors, or
    leaves them set), and HDF5 could not close a file whose writes fail. From then on every
    write is dropped; the owner checks `failed` after each operation and abandons the file,
    which closes without an error. Used on the archive thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "x+b", buffering=0)  # noqa: SIM115 (closed in `close`)
        self.failed: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.failed is not None:
            return len(view)
        try:
            done = 0
            while done < len(view):
                done += self._file.write(view[done:]) or 0
        except OSError as exc:
            self.failed = exc
        return len(view)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size) or b""

    def readinto(self, buffer: Any) -> int:
        return self._file.readinto(buffer) or 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.failed is not None:
            return self._file.tell() if size is None else size
        try:
            return self._file.truncate(size)
        except OSError as exc:
            self.failed = exc
            return self._file.tell() if size is None else size

    def flush(self) -> None:
        """Nothing to do: writes are unbuffered (their errors surface in `write`)."""

    def check(self) -> None:
        """Raise the write error, if one happened."""
        if self.failed is not None:
            raise self.failed

    def close(self) -> None:
        self._file.close()


@dataclass
class _Open:
    """One scan's archive file being written."""

    h5: h5py.File
    disk: _GuardedFile
    # held open for the scan: a dataset handle dropped after each write would flush its chunks
    # from its destructor, where a write error cannot be raised
    datasets: dict[str, h5py.Dataset]

    def close(self) -> None:
        """Close HDF5's view, then the file; the file is closed even when HDF5 fails."""
        try:
            self.datasets.clear()
            self.h5.close()
        finally:
            self.disk.close()


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
        settings: dict[str, Any] | None = None,
        compression: str = "none",
    ) -> None:
        """`settings`: the service's, recorded in each file; `compression`: an
        `archive.compression` value (ConfigError when its filter is not installed)."""
        super().__init__("archive", metrics)
        self.directory = directory
        self.keep_recon = keep_recon
        self.model = model
        self.model_json = json.dumps(model, default=str)
        self.settings = settings
        self.compression = nexus.compression_options(compression)
        self._queue: queue.Queue[_Begin | _Write | _End | _Abort | None] = queue.Queue(queue_items)
        self._files: dict[str, _Open] = {}

    def open_directory(self) -> None:
        """Make the directory and check it takes files (ConfigError if not: a start-up error
        naming the setting); report `.partial` files a crash left there."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".tomocast-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"archive.directory={str(self.directory)!r} cannot be used: {exc.strerror or exc}"
                " (make it writable for this user, or choose another directory)"
            ) from None
        stale = sorted(self.directory.glob("*.h5.partial"))
        self.metrics.archive_stale_partials.set(len(stale))
        for path in stale:
            log.warning(
                "%s: a partial archive file left by an earlier run (it crashed or was killed); "
                "kept as it is, never overwritten",
                path,
            )

    def start(self) -> None:
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
            what = f"scan_id={item.scan_id} archive (abandoned, its .partial removed)"
            done = self.guarded(what, self._apply, item, traceback=False)
            if not done:
                self.metrics.archive_abandoned.inc()
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
        partial = self.directory / f"{item.scan_id}.h5.partial"
        n = 0
        while partial.exists():  # left by a crash: kept for whoever wants to look at it
            n += 1
            partial = self.directory / f"{item.scan_id}.{n}.h5.partial"
        disk = _GuardedFile(partial)
        try:
            f = h5py.File(disk, "w")
        except BaseException:
            disk.close()
            partial.unlink(missing_ok=True)
            raise
        opened = _Open(f, disk, {})
        self._files[item.scan_id] = opened
        nexus.mark_root(f, ENTRY)
        entry = nexus.create_entry(f, ENTRY, scan.scan_id)
        shape = (scan.cols, scan.cols)
        data, received = nexus.create_slices(entry, "data", scan.rows, shape, self.compression)
        opened.datasets.update({"data": data, "received": received})
        if self.keep_recon:
            recon, _ = nexus.create_slices(
                entry, "recon", scan.rows, shape, self.compression, "plain FBP slices"
            )
            opened.datasets["recon"] = recon
        nexus.write_angles(entry, scan.theta)
        disk.check()
        parameters = scan_parameters(scan)
        model, model_json = self.model, self.model_json
        if scan.model != self.model.get("name"):  # weights swapped since start (model.adapt)
            model = {**self.model, "name": scan.model, "adapted_from": self.model.get("name")}
            model_json = json.dumps(model, default=str)
        process = nexus.write_process(entry, model, self.settings, parameters)
        process.attrs.update(version=__version__, model=model_json)
        for name, target in LEGACY_LINKS.items():
            if target in f:
                f[name] = h5py.SoftLink(target)
        disk.check()

    def _write(self, item: _Write) -> None:
        datasets, batch = self._files[item.scan_id].datasets, item.batch
        if batch.topic == "recon":
            datasets["recon"][batch.first : batch.stop] = batch.slices
            self._files[item.scan_id].disk.check()
            return
        datasets["data"][batch.first : batch.stop] = batch.slices
        datasets["received"][batch.first : batch.stop] = True
        if batch.scale is not None:  # one per scan: the denoiser's intensity factor
            datasets["data"].attrs["scale"] = batch.scale
        if batch.denoised is not None:  # the no-harm guard's verdict and score, per slice
            if "denoised" not in datasets:
                datasets.update(self._verdicts(item.scan_id, len(datasets["received"])))
            datasets["denoised"][batch.first : batch.stop] = batch.denoised
            if batch.consistency is not None:
                datasets["consistency"][batch.first : batch.stop] = batch.consistency
        self._files[item.scan_id].disk.check()

    def _verdicts(self, scan_id: str, rows: int) -> dict[str, h5py.Dataset]:
        """/entry/data/denoised (rows,) bool and consistency (rows,) float32 (NaN: not scored),
        made when the scan's first denoised batch arrives."""
        group = self._files[scan_id].h5[ENTRY]["data"]
        denoised = group.create_dataset("denoised", (rows,), bool, fillvalue=False)
        denoised.attrs["long_name"] = "network output published (false: plain FBP, guard)"
        consistency = group.create_dataset(
            "consistency", (rows,), "float32", fillvalue=float("nan")
        )
        consistency.attrs["long_name"] = "no-harm guard score chi2(denoised) / max(chi2(FBP), 1)"
        return {"denoised": denoised, "consistency": consistency}

    def _end(self, item: _End) -> None:
        opened = self._files[item.scan_id]
        entry = opened.h5[ENTRY]
        entry["tomocast"].attrs["completed"] = json.dumps(item.summary, default=str)
        entry["end_time"] = nexus.now_iso()
        opened.close()
        opened.disk.check()  # on a write error, still in _files: abandoned by the caller
        del self._files[item.scan_id]
        partial = opened.disk.path
        final = self.path(item.scan_id)
        n = 0
        while final.exists():  # a scan_id used again: never overwrite an earlier scan's file
            n += 1
            final = self.directory / f"{item.scan_id}.{n}.h5"
        os.replace(partial, final)
        log.info("scan_id=%s archived to %s", item.scan_id, final)

    def _abandon(self, scan_id: str, keep: bool = False) -> None:
        opened = self._files.pop(scan_id, None)
        if opened is None:
            return
        partial = opened.disk.path
        try:
            opened.close()
        except (OSError, RuntimeError) as exc:  # h5py's errors from the HDF5 library
            log.error("scan_id=%s closing %s failed: %s", scan_id, partial, exc)
        if keep:
            log.error("scan_id=%s partial archive kept as %s", scan_id, partial)
            return
        try:
            partial.unlink(missing_ok=True)
        except OSError as exc:
            log.error("scan_id=%s could not remove %s: %s", scan_id, partial, exc)
