"""The archive's write speed (HDF5 through h5py's file-object driver) next to plain h5py and a
raw file write, measured in the same run.

For each width N: --rows float32 slices of N x N (random values: what compresses least),
handed over in batches of --batch as the reconstruct loop hands them, three ways, each
--repeat times into a fresh file in --directory (the system's temporary directory by default),
the three ways in turn in each round:
  - archive: the service's sink (`service.archive.Archive`: its thread, the NeXus layout, the
    `.partial` file written through `_GuardedFile` and renamed at the end), timed from `begin`
    to the thread's end;
  - h5py: one (rows, N, N) dataset with the same chunks and `archive.compression`, written
    batch by batch through h5py's default (sec2) driver: what the archive would cost without
    its own file layer;
  - raw: the same bytes written to a plain file: the disk's (or page cache's) own speed.
Nothing is fsync'ed inside the timing: the figures are what the writer thread costs, the page
cache absorbing the disk (a full disk's throughput is the disk's, whoever writes); `os.sync()`
before each run keeps one way's writeback out of the next one's time. Least and median seconds,
MB/s and slices/s from the least, and the archive's least over h5py's: the file-object
driver's overhead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.bench import add_common_arguments, command_line, emit, heading, machine

WAYS = ("archive", "h5py", "raw")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tomocast bench archive`."""
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[512, 1024, 2048],
        metavar="COLS",
        help="slice widths",
    )
    parser.add_argument("--rows", type=int, default=32, help="slices per scan")
    parser.add_argument("--batch", type=int, default=8, help="slices per batch handed over")
    parser.add_argument(
        "--compression", default="none", help="archive.compression (none, gzip, ...)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (least and median)")
    parser.add_argument(
        "--directory", default=None, help="where the files go (default: a temporary directory)"
    )
    add_common_arguments(parser, seed_help="seed of the slice values")


def _command(args: argparse.Namespace) -> str:
    flags = ["--sizes", "--rows", "--batch", "--compression", "--repeat", "--seed"]
    return command_line("archive", args, flags)


def _archive(folder: Path, slices: Any, batch: int, compression: str) -> Callable[[], None]:
    import numpy as np

    from service.archive import Archive
    from service.events import ScanCompleted, ScanLatency
    from service.metrics import Metrics
    from service.sinks import ScanDescription, SliceBatch, SliceTiming

    rows, cols = slices.shape[0], slices.shape[1]
    theta = np.linspace(0, np.pi, 180, endpoint=False)
    runs = iter(range(1 << 30))
    metrics = Metrics()  # the service has one: not a cost per scan

    def write() -> None:
        scan_id = f"bench-{next(runs)}"
        sink = Archive(folder, False, 4, metrics, {"name": "bench"}, None, compression)
        sink.start()
        sink.begin(ScanDescription(scan_id, rows, cols, theta, cols / 2, "bench", time.time()))
        for first in range(0, rows, batch):
            part = slices[first : first + batch]
            sink.write(SliceBatch(scan_id, "slice", first, part, SliceTiming(0.0, 0.0)))
        latency = ScanLatency(0.0, 0.0, 0.0)
        sink.end(ScanCompleted(scan_id, rows, 0, 0, 0, "bench", latency))
        sink.stop()
        if not sink.join(600):
            raise RuntimeError("the archive thread did not finish within 600 s")
        if not (folder / f"{scan_id}.h5").is_file():
            raise RuntimeError(f"the archive wrote no {scan_id}.h5 (see the log)")

    return write


def _h5py(folder: Path, slices: Any, batch: int, compression: str) -> Callable[[], None]:
    import h5py

    from service.nexus import compression_options

    options = compression_options(compression)
    runs = iter(range(1 << 30))

    def write() -> None:
        with h5py.File(folder / f"plain-{next(runs)}.h5", "w") as file:
            data = file.create_dataset(
                "data", slices.shape, "float32", chunks=(1, *slices.shape[1:]), **options
            )
            for first in range(0, len(slices), batch):
                data[first : first + batch] = slices[first : first + batch]

    return write


def _raw(folder: Path, slices: Any, batch: int, compression: str) -> Callable[[], None]:
    runs = iter(range(1 << 30))

    def write() -> None:
        with open(folder / f"raw-{next(runs)}.bin", "wb") as file:
            for first in range(0, len(slices), batch):
                file.write(memoryview(slices[first : first + batch]).cast("B"))

    return write


def _timed(
    calls: dict[str, Callable[[], None]], folders: dict[str, Path], repeat: int
) -> dict[str, list[float]]:
    """Seconds of each call, `repeat` rounds after a warm-up round, the ways taken in turn in
    each round (so a busy moment of a shared machine does not fall on one way only) and the
    dirty pages of the one before flushed first (`os.sync`, untimed: a writer is not charged
    for the previous one's writeback). Each run's file is deleted after it, untimed."""
    seconds: dict[str, list[float]] = {way: [] for way in calls}
    for round_ in range(repeat + 1):
        for way, call in calls.items():
            os.sync()
            started = time.perf_counter()
            call()
            if round_ > 0:
                seconds[way].append(time.perf_counter() - started)
            for written in folders[way].iterdir():
                written.unlink()
    return seconds


def _refusal(args: argparse.Namespace) -> str | None:
    """Why these flags cannot be benched, or None."""
    from service.errors import ConfigError
    from service.nexus import compression_options

    for flag, value in (("--rows", args.rows), ("--batch", args.batch), ("--repeat", args.repeat)):
        if value < 1:
            return f"{flag} must be >= 1, got {value}"
    if min(args.sizes) < 1:
        return f"--sizes must be >= 1, got {min(args.sizes)}"
    try:
        compression_options(args.compression)
    except ConfigError as exc:
        return f"--compression: {exc}"
    return None


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    why = _refusal(args)
    if why is not None:
        sys.stderr.write(f"tomocast bench archive: {why}\n")
        return 2

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    made = {"archive": _archive, "h5py": _h5py, "raw": _raw}
    results = []
    root = Path(tempfile.mkdtemp(prefix="tomocast-bench-archive-", dir=args.directory))
    try:
        for cols in args.sizes:
            slices = rng.random((args.rows, cols, cols), dtype=np.float32)
            megabytes = slices.nbytes / 1e6
            row: dict[str, Any] = {"cols": cols, "rows": args.rows, "megabytes": megabytes}
            folders = {way: root / f"{way}-{cols}" for way in WAYS}
            calls = {}
            for way, folder in folders.items():
                folder.mkdir()
                calls[way] = made[way](folder, slices, args.batch, args.compression)
            timed = _timed(calls, folders, args.repeat)
            for way, seconds in timed.items():
                folders[way].rmdir()
                least = min(seconds)
                row[way] = {
                    "least_s": least,
                    "median_s": statistics.median(seconds),
                    "mb_per_s": megabytes / least,
                    "slices_per_s": args.rows / least,
                }
            row["archive_over_h5py"] = row["archive"]["least_s"] / row["h5py"]["least_s"]
            results.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "command": _command(args),
        "machine": machine(torch.device("cpu"), load_before),
        "compression": args.compression,
        "results": results,
    }
    lines = [
        heading(report),
        "| cols | MB per scan | archive MB/s (slices/s) | h5py MB/s | raw MB/s | archive / h5py |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['cols']} | {row['megabytes']:.0f} | {row['archive']['mb_per_s']:.0f} "
            f"({row['archive']['slices_per_s']:.0f}) | {row['h5py']['mb_per_s']:.0f} | "
            f"{row['raw']['mb_per_s']:.0f} | {row['archive_over_h5py']:.2f}x |"
        )
    emit(args, report, "\n".join(lines) + "\n")
    return 0
