"""Read a NeXus NXtomo file (ESRF, DLS, SOLEIL; nabu, tomwer, silx) for replay to the service.

An NXtomo entry keeps every frame in one data set, NXentry/instrument/detector/data (frames, rows,
cols), with an image key per frame (`image_key_control` where present, else `image_key`):
0 projection, 1 flat, 2 dark; -1 (alignment) and 3 (invalid) are skipped. Angles are
NXentry/sample/rotation_angle, one per frame, in the unit its `units` attribute names (degrees when
it names none). Flats may come before and after the projections: the service averages all of
them, as it averages the darks. Optional x_pixel_size, distance and beam/incident_energy go into
the scan's `meta` in SI units (`pixel_size_m`, `distance_m`, `energy_kev`) for phase retrieval.

Compressed data sets (bitshuffle-LZ4, Blosc, ... as EIGER-class detectors write them) open when
`hdf5plugin` is installed (`pip install hdf5plugin`); without it h5py names the missing filter.
A file with several NXtomo entries needs `entry` (`tomocast replay --entry NAME`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from service.errors import DataError
from service.protocol import DTYPES
from service.sim.replay import ReplayScan, _choose_dtype, _convert, _scan_id

log = logging.getLogger(__name__)

DATA, KEY, KEY_CONTROL = "instrument/detector/data", "image_key", "image_key_control"
ANGLES = "sample/rotation_angle"
PROJECTION, FLAT, DARK = 0, 1, 2
# unit names as NeXus files spell them -> factor to the SI unit (radians for angles)
_ANGLE_UNITS = {"degree": np.pi / 180, "degrees": np.pi / 180, "deg": np.pi / 180, "rad": 1.0,
                "radian": 1.0, "radians": 1.0}  # fmt: skip
_LENGTH_UNITS = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "nm": 1e-9}
_ENERGY_UNITS = {"kev": 1.0, "ev": 1e-3, "mev": 1e3}
_CHUNK_FRAMES = 64  # frames read at a time when choosing the dtype


def is_nxtomo(path: str | Path) -> bool:
    """Whether `path` is an HDF5 file with at least one NXtomo entry."""
    try:
        with _open(Path(path)) as f:
            return bool(_entries(f))
    except DataError:
        return False


def read_nxtomo(
    path: str | Path, entry: str | None = None, *, load_projections: bool = True
) -> ReplayScan:
    """Read an NXtomo entry; DataError names the file and what is missing or inconsistent.
    With `load_projections=False` the projections stay in the file (`iter_nxtomo_chunks`)."""
    path = Path(path)
    with _open(path) as f:
        group = _entry(f, path, entry)
        data, keys, theta = _frames(group, path)
        n_frames, rows, cols = data.shape
        chosen = {kind: np.flatnonzero(keys == kind) for kind in (PROJECTION, FLAT, DARK)}
        if not len(chosen[PROJECTION]):
            raise DataError(f"{path}: entry {group.name} has no projection (image key 0)")
        dtype = _choose_dtype(path, [data])
        darks, flats = (_read(path, data, chosen[k], dtype) for k in (DARK, FLAT))
        projections = _read(path, data, chosen[PROJECTION], dtype) if load_projections else None
        meta = {"source": path.name, "entry": group.name.lstrip("/"), **_physics(group)}
        scan_id = _scan_id(path, None)
    skipped = n_frames - sum(len(v) for v in chosen.values())
    if skipped:
        log.info("%s: %d alignment or invalid frames skipped", path, skipped)
    normalized = len(flats) == 0
    if normalized:
        log.warning("%s: no flats (image key 1): replaying as flat-field corrected data", path)
    shape = (len(chosen[PROJECTION]), rows, cols)
    return ReplayScan(
        scan_id,
        theta[chosen[PROJECTION]],
        None,
        darks,
        flats,
        projections,
        dtype,
        shape,
        normalized,
        meta,
    )


def iter_nxtomo_chunks(
    path: str | Path, chunk: int, dtype: str, entry: str | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first projection index, (count, rows, cols) array) of the entry's projections,
    `chunk` at a time, read lazily and converted to `dtype`."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    path = Path(path)
    with _open(path) as f:
        data, keys, _ = _frames(_entry(f, path, entry), path)
        frames = np.flatnonzero(keys == PROJECTION)
        for first in range(0, len(frames), chunk):
            taken = frames[first : first + chunk]
            yield first, _read(path, data, taken, dtype)


def _read(path: Path, data: h5py.Dataset, frames: np.ndarray, dtype: str) -> np.ndarray:
    """The frames at indices `frames` (increasing) as `dtype`; (0, rows, cols) for none."""
    if not len(frames):
        return np.zeros((0, *data.shape[1:]), DTYPES[dtype])
    return _convert(path, DATA, data[frames], dtype, int(frames[0]))


def _open(path: Path) -> h5py.File:
    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401  (registers the compression filters with HDF5)
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot open as HDF5: {exc}") from None


def _entries(f: h5py.File) -> list[str]:
    found = []
    for name, node in f.items():
        if not isinstance(node, h5py.Group) or _text(node.attrs.get("NX_class")) != "NXentry":
            continue
        definition = node.get("definition")
        is_tomo = isinstance(definition, h5py.Dataset) and _text(definition[()]) == "NXtomo"
        if is_tomo or _text(node.attrs.get("definition")) == "NXtomo" or DATA in node:
            found.append(name)
    return found


def _entry(f: h5py.File, path: Path, entry: str | None) -> h5py.Group:
    entries = _entries(f)
    if entry is not None:
        if entry not in entries:
            raise DataError(
                f"{path}: no NXtomo entry {entry!r} (entries: {', '.join(entries) or 'none'})"
            )
        return f[entry]
    if not entries:
        raise DataError(f"{path}: no NXtomo entry (an NXentry with {DATA})")
    if len(entries) > 1:
        raise DataError(
            f"{path}: {len(entries)} NXtomo entries ({', '.join(entries)}): choose one (--entry)"
        )
    return f[entries[0]]


def _frames(group: h5py.Group, path: Path) -> tuple[h5py.Dataset, np.ndarray, np.ndarray]:
    """(the frames data set, an image key per frame, an angle per frame in radians)."""
    data = group.get(DATA)
    if not isinstance(data, h5py.Dataset) or data.ndim != 3 or 0 in data.shape:
        raise DataError(f"{path}: {group.name}/{DATA} is missing or not (frames, rows, cols)")
    detector = group["instrument/detector"]
    key_set = detector.get(KEY_CONTROL, detector.get(KEY))
    if key_set is None:
        raise DataError(f"{path}: {group.name}/instrument/detector has no image_key")
    keys = np.asarray(key_set[()], dtype=np.int64).reshape(-1)
    angles = group.get(ANGLES)
    if angles is None:
        raise DataError(f"{path}: {group.name}/{ANGLES} is missing")
    theta = np.asarray(angles[()], dtype=np.float64).reshape(-1)
    if not len(keys) == len(theta) == data.shape[0]:
        raise DataError(
            f"{path}: {data.shape[0]} frames, {len(keys)} image keys and {len(theta)} rotation "
            "angles: one of each per frame expected"
        )
    unit = _text(angles.attrs.get("units")) or "degree"
    if unit.lower() not in _ANGLE_UNITS:
        raise DataError(f"{path}: {group.name}/{ANGLES} in {unit!r}: expected degree or rad")
    theta = theta * _ANGLE_UNITS[unit.lower()]
    if not np.isfinite(theta[keys == PROJECTION]).all():
        raise DataError(f"{path}: {group.name}/{ANGLES} has NaN or inf projection angles")
    return data, keys, theta


def _physics(group: h5py.Group) -> dict[str, float]:
    """Pixel size, propagation distance and energy, in SI units, where the entry has them."""
    found: dict[str, float] = {}
    for name, key, units in (
        ("instrument/detector/x_pixel_size", "pixel_size_m", _LENGTH_UNITS),
        ("instrument/detector/distance", "distance_m", _LENGTH_UNITS),
        ("instrument/beam/incident_energy", "energy_kev", _ENERGY_UNITS),
    ):
        node = group.get(name)
        if not isinstance(node, h5py.Dataset) or node.shape not in ((), (1,)):
            continue
        unit = (_text(node.attrs.get("units")) or "").lower()
        factor = units.get(unit)
        value = float(np.asarray(node[()]).reshape(-1)[0])
        if factor is None or not np.isfinite(value):
            log.warning("%s: %r in %r not understood: left out of meta", group.name, name, unit)
            continue
        found[key] = value * factor
    return found


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    return value if isinstance(value, str) else ""
