"""Viewer-side writers of received slices (HDF5, PNG), per-scan progress, comparison figures.

A writer gets each published slice as (header, data): the publisher's slice header (docs/DESIGN,
"Publisher") and a float32 (h, w) array. A bad slice costs that slice (one log line), never the
viewer. Writers are owned by the one thread that receives slices; none of them is thread-safe.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import h5py
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service import nexus
from service.events import SliceHeader
from service.protocol import SCAN_ID

log = logging.getLogger(__name__)

WINDOW_PERCENTILES = (0.5, 99.5)
# Publisher topic -> the NXdata group of its slices in a scan's NXentry (service.nexus)
TOPIC_GROUPS = {"slice": "data", "recon": "recon"}


@runtime_checkable
class SliceWriter(Protocol):
    """Where a viewer puts received slices: each with its published header and topic
    (`slice`: denoised, `recon`: plain FBP). Viewer side; the service's own outputs are
    `service.sinks.SliceSink`."""

    def write(self, header: SliceHeader, data: np.ndarray, topic: str = "slice") -> None: ...

    def close(self) -> None: ...


class HDF5SliceFile:
    """All slices of one viewer run in one HDF5 file, one NeXus NXentry per scan (the archive's
    layout, `service.nexus`): `/<scan_id>/data` (NXdata: `data` (rows, h, w) float32, NaN where
    no slice arrived, `received` (rows,) bool, `slice_index`), plain FBP slices (topic `recon`)
    in `/<scan_id>/recon` alike, `/<scan_id>/tomocast` (NXprocess: program, version, date,
    model); entry attrs `model` and a timing summary. The file is written as `<path>.partial`
    and renamed to `<path>` by `close()`, so a crashed run never leaves a file that looks
    complete. Owned by one thread.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.progress: dict[str, ScanProgress] = {}
        self._file: h5py.File | None = h5py.File(self.partial, "w")
        self._file.attrs["content"] = "tomocast slices, one NXentry per scan"

    def write(self, header: SliceHeader, data: np.ndarray, topic: str = "slice") -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: write after close")
        checked = _check(header, data, topic)
        if checked is None:
            return
        scan_id, index, rows, topic = checked
        if scan_id not in self._file:
            if not self._file.attrs.get("NX_class"):
                nexus.mark_root(self._file, scan_id)  # viewers open the first scan
            entry = nexus.create_entry(self._file, scan_id, scan_id)
            nexus.write_process(entry, {"name": header.model})
        entry = self._file[scan_id]
        name = TOPIC_GROUPS[topic]
        if name not in entry:
            long_name = "slices" if topic == "slice" else "plain FBP slices"
            nexus.create_slices(entry, name, rows, np.shape(data), long_name=long_name)
            if topic == "slice":
                entry.attrs["model"] = header.model
        stored = entry[name]["data"]
        if stored.shape != (rows, *np.shape(data)):
            log.warning(
                "scan_id=%r %s %d: shape (%d, %s) differs from the scan's %s: skipped",
                scan_id,
                topic,
                index,
                rows,
                np.shape(data),
                stored.shape,
            )
            return
        stored[index] = np.asarray(data, dtype=np.float32)
        entry[name]["received"][index] = True
        if topic == "slice":
            self.progress.setdefault(scan_id, ScanProgress(scan_id, rows)).add(header)

    def close(self) -> None:
        """Write the timing summaries, flush, and rename `<path>.partial` to `<path>`."""
        if self._file is None:
            return
        for scan_id, progress in self.progress.items():
            summary = progress.summary()
            attrs = self._file[scan_id].attrs
            attrs.update(
                slices_received=summary["slices"],
                missing=summary["missing"],
                duplicates=summary["duplicates"],
                timing_summary=json.dumps(summary),
            )
            for key, value in summary["end_to_end_ms"].items():
                attrs[f"end_to_end_{key}_ms"] = value
        self._file.close()
        self._file = None
        os.replace(self.partial, self.path)
        log.info("wrote %s (%d scans)", self.path, len(self.progress))

    def __enter__(self) -> HDF5SliceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PNGSliceFiles:
    """Each slice as an 8-bit PNG, `<directory>/<scan_id>/slice_00012.png` (`recon_00012.png`
    for plain FBP slices), windowed to its own 0.5/99.5 percentiles. Files appear whole
    (written aside, then renamed). Owned by one thread."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, header: SliceHeader, data: np.ndarray, topic: str = "slice") -> None:
        checked = _check(header, data, topic)
        if checked is None:
            return
        scan_id, index, _, topic = checked
        folder = self.directory / scan_id
        folder.mkdir(exist_ok=True)
        target = folder / f"{topic}_{index:05d}.png"
        aside = folder / f".{target.name}.partial"
        Image.fromarray(to_uint8(data, *robust_window(data))).save(aside, format="PNG")
        os.replace(aside, target)

    def close(self) -> None:
        """Nothing is buffered: every slice is on disk once `write` returns."""


class ScanProgress:
    """What arrived of one scan: unique slices, duplicates, and latency samples from the slice
    headers (end to end = t_published - t_last_projection; per stage = header["timing"]).
    Owned by one thread."""

    def __init__(self, scan_id: str, rows: int | None = None) -> None:
        self.scan_id = scan_id
        self.rows = rows  # None until a header says (header["rows"])
        self.model: str | None = None
        self.duplicates = 0
        self._received: set[int] = set()
        self._end_to_end: list[float] = []
        self._delivery: list[float] = []
        self._stages: dict[str, list[float]] = {}

    def add(self, header: SliceHeader, received_at: float | None = None) -> bool:
        """Count one slice; False for a duplicate index. `received_at` (unix seconds, this
        host's clock) adds a `delivery` sample: received_at - t_published."""
        if self.rows is None:
            self.rows = header.rows
        if header.index in self._received:
            self.duplicates += 1
            return False
        self._received.add(header.index)
        self.model = header.model
        published = _seconds(header.t_published)
        last_projection = _seconds(header.t_last_projection)
        if published is not None and last_projection is not None:
            self._end_to_end.append(published - last_projection)
        if published is not None and received_at is not None:
            self._delivery.append(received_at - published)
        for stage, value in header.timing.items():
            seconds = _seconds(value)
            # end_to_end is derived above from the two timestamps; don't list it twice.
            if seconds is not None and stage != "end_to_end":
                self._stages.setdefault(stage, []).append(seconds)
        return True

    @property
    def complete(self) -> bool:
        return self.rows is not None and not self.missing_indices()

    def missing_indices(self) -> list[int]:
        return sorted(set(range(self.rows or 0)) - self._received)

    def summary(self) -> dict[str, Any]:
        """Counts, and {"p50", "p95", "n"} of each latency in milliseconds. `expected_rows`
        and `missing` are None while the scan's size is unknown."""
        result: dict[str, Any] = {
            "scan_id": self.scan_id,
            "model": self.model,
            "slices": len(self._received),
            "expected_rows": self.rows,
            "missing": None if self.rows is None else len(self.missing_indices()),
            "duplicates": self.duplicates,
            "end_to_end_ms": _stats(self._end_to_end),
            "stages_ms": {stage: _stats(v) for stage, v in sorted(self._stages.items())},
        }
        if self._delivery:
            result["delivery_ms"] = _stats(self._delivery)
        return result

    def format_summary(self) -> str:
        """One readable block: counts, then a p50/p95 table of the latencies."""
        s = self.summary()
        lines = [
            f"scan {self.scan_id}: {s['slices']}/{self.rows or '?'} slices, "
            f"{s['missing'] if s['missing'] is not None else '?'} missing, "
            f"{s['duplicates']} duplicates, model {self.model or '?'}",
            f"  {'latency (ms)':<16}{'p50':>9}{'p95':>9}{'n':>7}",
        ]
        rows = [("end-to-end", s["end_to_end_ms"]), *s["stages_ms"].items()]
        if "delivery_ms" in s:
            rows.append(("delivery", s["delivery_ms"]))
        for name, stats in rows:
            if stats["n"]:
                lines.append(
                    f"  {name:<16}{stats['p50']:>9.1f}{stats['p95']:>9.1f}{stats['n']:>7d}"
                )
        return "\n".join(lines)


def _seconds(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _stats(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"p50": None, "p95": None, "n": 0}
    p50, p95 = np.percentile(np.asarray(samples) * 1e3, (50, 95))
    return {"p50": float(p50), "p95": float(p95), "n": len(samples)}


def robust_window(image: np.ndarray) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of the finite values (0, 1 when there are none)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, WINDOW_PERCENTILES)
    return float(low), float(high)


def to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] to 0..255, clipping outside and sending NaN to 0; halves round up.
    The web viewer (static/render.js `paint`) does the same arithmetic in the same order, so a
    slice looks the same, level for level, in a PNG and in the browser (a denoiser's output
    can have few distinct values, and then many of them fall exactly on a half level)."""
    scale = 255 / (high - low) if high > low else 255.0
    levels = (np.asarray(image, dtype=np.float64) - low) * scale
    levels = np.floor(np.clip(np.nan_to_num(levels, nan=0.0), 0.0, 255.0) + 0.5)
    return np.minimum(levels, 255).astype(np.uint8)


def save_comparison_png(path: str | Path, panels: list[tuple[str, np.ndarray]]) -> None:
    """Panels side by side under their titles, all windowed to the first panel's (the
    phantom's) finite min..max, so brightness compares across panels."""
    if not panels:
        raise ValueError("save_comparison_png needs at least one panel")
    for title, image in panels:
        if np.ndim(image) != 2:
            raise ValueError(f"panel {title!r} has shape {np.shape(image)}, expected (h, w)")
    reference = np.asarray(panels[0][1], dtype=np.float64)
    finite = reference[np.isfinite(reference)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    try:
        font: Any = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        font = ImageFont.load_default()
    gap = 8
    title_height = max(font.getbbox(title)[3] for title, _ in panels) + 2 * gap
    width = sum(np.shape(image)[1] for _, image in panels) + gap * (len(panels) + 1)
    height = max(np.shape(image)[0] for _, image in panels) + title_height + gap
    canvas = Image.new("L", (width, height), color=255)
    draw = ImageDraw.Draw(canvas)
    left = gap
    for title, image in panels:
        draw.text((left, gap), title, fill=0, font=font)
        canvas.paste(Image.fromarray(to_uint8(np.asarray(image), low, high)), (left, title_height))
        left += np.shape(image)[1] + gap
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")


def _check(header: SliceHeader, data: np.ndarray, topic: str) -> tuple[str, int, int, str] | None:
    """(scan_id, index, rows, topic) of a well-formed slice, else None after one log line."""
    scan_id, index, rows = header.scan_id, header.index, header.rows
    shape = [] if header.shape is None else list(header.shape)
    problem = None
    if topic not in TOPIC_GROUPS:
        problem = f"topic={topic!r} is not one of {', '.join(TOPIC_GROUPS)}"
    elif not SCAN_ID.match(scan_id) or scan_id in (".", ".."):
        problem = f"scan_id={scan_id!r} is not a usable name"
    elif rows < 1:
        problem = f"rows={rows!r} must be a positive integer"
    elif not 0 <= index < rows:
        problem = f"index={index!r} is outside [0, rows={rows})"
    elif np.ndim(data) != 2 or list(np.shape(data)) != shape:
        problem = f"data shape {np.shape(data)} does not match header shape {header.shape!r}"
    if problem is not None:
        log.warning("slice dropped by the sink: %s", problem)
        return None
    return scan_id, index, rows, topic
