"""Read a DXchange HDF5 file (a recorded scan) for replay to the service as a DAQ would send it.

DXchange keeps projections in /exchange/data (angles, rows, cols), darks in
/exchange/data_dark, flats in /exchange/data_white and angles in /exchange/theta, in degrees.
Projections can be streamed lazily in chunks (`iter_projection_chunks`), so a file larger than
memory replays in constant memory.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from service.errors import DataError
from service.protocol import DTYPES, SCAN_ID, ScanStart

log = logging.getLogger(__name__)

DATA, DARK, WHITE, THETA = (
    "exchange/data",
    "exchange/data_dark",
    "exchange/data_white",
    "exchange/theta",
)
_SCAN_FRAMES = 64  # frames read at a time when scanning an integer data set's value range


@dataclass(frozen=True, eq=False)
class ReplayScan:
    """A recorded scan: reference frames in memory, projections in memory or left in the file.

    Plain data, safe to read from any thread.
    """

    scan_id: str
    theta: np.ndarray  # (n_angles,) radians
    center: float | None  # TomoPy's convention; None = cols/2
    darks: np.ndarray  # (n_dark, rows, cols) of `dtype`
    flats: np.ndarray  # (n_flat, rows, cols) of `dtype`
    projections: np.ndarray | None  # (n_angles, rows, cols) of `dtype`; None when read lazily
    dtype: str  # one of protocol.DTYPES: what the frames are sent as
    shape: tuple[int, int, int] = (0, 0, 0)  # (n_angles, rows, cols) of /exchange/data
    normalized: bool = False  # no flats in the file: frames are sent as line integrals
    meta: dict[str, Any] = field(default_factory=dict)

    def scan_start(self, seq: int = 0) -> ScanStart:
        """The scan_start message announcing this scan."""
        n_angles, rows, cols = self.shape
        return ScanStart(
            scan_id=self.scan_id,
            seq=seq,
            rows=rows,
            cols=cols,
            n_angles=n_angles,
            dtype=self.dtype,
            theta=tuple(float(t) for t in self.theta),
            center=self.center,
            n_dark=len(self.darks),
            n_flat=len(self.flats),
            normalized=self.normalized,
            meta=dict(self.meta),
        )


def read_dxchange(path: str | Path, *, load_projections: bool = True) -> ReplayScan:
    """Read a DXchange file; DataError names the file and what is missing or inconsistent.

    Data sets of a dtype the protocol does not carry are converted: integers to uint16 (or
    uint32) when every value fits, anything else to float32; a log line says which.
    With `load_projections=False` the projections stay in the file: stream them with
    `iter_projection_chunks`.
    """
    path = Path(path)
    with _open(path) as f:
        data = _dataset(f, path, DATA)
        if data.ndim != 3 or 0 in data.shape:
            raise DataError(
                f"{path}: /{DATA} has shape {data.shape}, expected a non-empty (angles, rows, cols)"
            )
        n_angles, rows, cols = data.shape
        references = [_references(f, path, name, rows, cols) for name in (DARK, WHITE)]
        dtype = _choose_dtype(path, [data, *(r for r in references if r is not None)])
        darks, flats = (
            _convert(path, name, r[()], dtype)
            if r is not None
            else np.zeros((0, rows, cols), DTYPES[dtype])
            for name, r in zip((DARK, WHITE), references, strict=True)
        )
        projections = _convert(path, DATA, data[()], dtype) if load_projections else None
        theta = _theta(f, path, n_angles)
        exchange = f["exchange"].attrs
        center = next(
            (float(exchange[k]) for k in ("center", "rotation_center") if k in exchange), None
        )
        meta = _meta(path, exchange.get("meta"))
        scan_id = _scan_id(path, exchange.get("scan_id"))
    normalized = len(flats) == 0
    if normalized:
        log.warning(
            "%s: no flats in /%s: replaying /%s as flat-field corrected line integrals",
            path,
            WHITE,
            DATA,
        )
    return ReplayScan(
        scan_id,
        theta,
        center,
        darks,
        flats,
        projections,
        dtype,
        (n_angles, rows, cols),
        normalized,
        meta,
    )


def _references(f: h5py.File, path: Path, name: str, rows: int, cols: int) -> h5py.Dataset | None:
    """The dark or flat frames at `name`, None when the file has none; DataError when their
    frames are not the projections' shape."""
    frames = f.get(name)
    if frames is not None and (frames.ndim != 3 or frames.shape[1:] != (rows, cols)):
        raise DataError(
            f"{path}: /{name} has shape {frames.shape}, expected "
            f"(frames, {rows}, {cols}) to match /{DATA}"
        )
    return frames


def iter_projection_chunks(
    path: str | Path, chunk: int, dtype: str | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first index, (count, rows, cols) array) of /exchange/data, `chunk` projections at
    a time, read lazily and converted to `dtype` (default: as `read_dxchange` chooses)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    path = Path(path)
    with _open(path) as f:
        data = _dataset(f, path, DATA)
        if dtype is None:
            dtype = _choose_dtype(path, [data, *(f[n] for n in (DARK, WHITE) if n in f)])
        for index in range(0, data.shape[0], chunk):
            yield index, _convert(path, DATA, data[index : index + chunk], dtype, index)


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot open as HDF5: {exc}") from None


def _dataset(f: h5py.File, path: Path, name: str) -> h5py.Dataset:
    node = f.get(name)
    if not isinstance(node, h5py.Dataset):
        raise DataError(
            f"{path}: no /{name} dataset: a DXchange file keeps its projections "
            f"in /{DATA} as (angles, rows, cols)"
        )
    return node


def _choose_dtype(path: Path, datasets: list[h5py.Dataset]) -> str:
    """The protocol dtype every frame of the scan is sent as."""
    names = {d.dtype.name for d in datasets}
    if len(names) == 1 and next(iter(names)) in DTYPES:
        return str(next(iter(names)))
    found = ", ".join(sorted(names))
    if all(d.dtype.kind in "iu" for d in datasets):
        low, high = _value_range(datasets)
        for target in ("uint16", "uint32"):
            if low >= 0 and high <= np.iinfo(target).max:
                log.info(
                    "%s: data sets are %s, every value fits: sending as %s", path, found, target
                )
                return target
    log.info("%s: data sets are %s: converting to float32", path, found)
    return "float32"


def _value_range(datasets: list[h5py.Dataset]) -> tuple[int, int]:
    low, high = 0, 0
    for dataset in datasets:
        for start in range(0, dataset.shape[0] if dataset.ndim else 1, _SCAN_FRAMES):
            block = dataset[start : start + _SCAN_FRAMES] if dataset.ndim else dataset[()]
            if np.size(block):
                low, high = min(low, int(np.min(block))), max(high, int(np.max(block)))
    return low, high


def _convert(path: Path, name: str, frames: np.ndarray, dtype: str, first: int = 0) -> np.ndarray:
    frames = np.ascontiguousarray(frames, dtype=DTYPES[dtype])
    if dtype == "float32" and not np.isfinite(frames).all():
        bad = np.flatnonzero(~np.isfinite(frames).reshape(len(frames), -1).all(axis=1))
        raise DataError(f"{path}: /{name} has NaN or inf values in frame {first + bad[0]}")
    return frames


def _theta(f: h5py.File, path: Path, n_angles: int) -> np.ndarray:
    if THETA not in f:
        log.warning(
            "%s: no /%s: assuming %d angles evenly spaced over [0, 180) degrees",
            path,
            THETA,
            n_angles,
        )
        return np.arange(n_angles, dtype=np.float64) * (np.pi / n_angles)
    theta = np.asarray(f[THETA][()], dtype=np.float64).reshape(-1)
    if theta.size != n_angles:
        raise DataError(
            f"{path}: /{THETA} has {theta.size} angles, /{DATA} has {n_angles} projections"
        )
    if not np.isfinite(theta).all():
        raise DataError(f"{path}: /{THETA} has NaN or inf angles")
    return np.radians(theta)


def _scan_id(path: Path, stored: Any) -> str:
    if isinstance(stored, bytes):
        stored = stored.decode(errors="replace")
    if isinstance(stored, str) and SCAN_ID.match(stored):
        return stored
    scan_id = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:128] or "replay"
    if stored is not None:
        log.warning(
            "%s: scan_id %r is not 1-128 of [A-Za-z0-9._-]: using %r", path, stored, scan_id
        )
    return scan_id


def _meta(path: Path, stored: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if stored is not None:
        try:
            parsed = json.loads(stored)
        except (TypeError, ValueError):
            parsed = None
        if isinstance(parsed, dict):
            meta.update(parsed)
        else:
            log.warning("%s: /exchange attribute 'meta' is not a JSON object: ignored", path)
    meta.setdefault("source", path.name)
    return meta
