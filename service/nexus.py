"""The NeXus layout of tomocast's slice files, written by the archive (`service.archive`) and by
`tomocast view --out` (`service.clients.writers.HDF5SliceFile`), read by `tomocast
export-slices`. One NXentry per scan:

    <entry>               NXentry   title (the scan_id), start_time, end_time (archive)
      data                NXdata    signal "data", axes ["slice_index", ".", "."]
        data              (rows, N, N) float32  the slices (denoised; plain FBP without a
                                                denoiser), NaN where none was written
        received          (rows,) bool          which slices were written
        slice_index       (rows,) int64         the detector row of each slice
      recon               NXdata    the same, for the plain FBP slices (where kept)
      sample              NXsample  rotation_angle (angles,) float64, degrees (archive)
      tomocast            NXprocess program "tomocast", version, date, sequence_index,
                                    model (NXnote, JSON), settings (NXnote, JSON), and the
                                    scan's parameters (centre, DAQ meta, ...), one field each

The archive's entry is `/entry`; a viewer's file holds `/<scan_id>` for each scan. The root is
an NXroot whose `default` names the (first) entry, so NeXus viewers (silx, h5web) open straight
on the slices. Plain h5py reads it without anything of ours; compressed files need the filter
(`hdf5plugin`) wherever they are read.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import h5py
import numpy as np

from service import __version__
from service.errors import ConfigError, DataError

COMPRESSIONS = ("none", "bitshuffle-lz4", "blosc-lz4", "gzip")
# The DXchange-era layout (before NeXus): still read, so older archives export alike
LEGACY_SLICES = "exchange/data"


def now_iso() -> str:
    """The current time, ISO 8601 with its UTC offset (NeXus NX_DATE_TIME)."""
    return datetime.now(timezone.utc).isoformat()


def compression_options(name: str) -> dict[str, Any]:
    """`h5py.Group.create_dataset` keyword arguments of an `archive.compression` value; a
    ConfigError naming the setting when the filter is not available here."""
    if name not in COMPRESSIONS:
        raise ConfigError(f"archive.compression={name!r} is not one of {', '.join(COMPRESSIONS)}")
    if name == "none":
        return {}
    if name == "gzip":  # built into every HDF5
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    try:
        import hdf5plugin
    except ImportError:
        raise ConfigError(
            f"archive.compression={name!r} needs hdf5plugin: pip install 'tomocast[nexus]', "
            "or choose archive.compression = 'gzip' or 'none'"
        ) from None
    if name == "bitshuffle-lz4":
        chosen: Any = hdf5plugin.Bitshuffle(cname="lz4")
    else:
        chosen = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
    if not h5py.h5z.filter_avail(chosen.filter_id):
        raise ConfigError(
            f"archive.compression={name!r}: this HDF5 has no filter {chosen.filter_id} "
            "(reinstall hdf5plugin, or choose 'gzip' or 'none')"
        )
    return dict(chosen)


def mark_root(f: h5py.File, default: str) -> None:
    """The file's NXroot attributes; `default` is the entry viewers open."""
    f.attrs.update(
        NX_class="NXroot",
        default=default,
        creator=f"tomocast {__version__}",
        file_time=now_iso(),
        HDF5_Version=h5py.version.hdf5_version,
        h5py_version=h5py.version.version,
    )


def create_entry(parent: h5py.Group, name: str, scan_id: str) -> h5py.Group:
    """An empty NXentry for one scan; its `default` is the slices."""
    entry = parent.create_group(name)
    entry.attrs.update(NX_class="NXentry", default="data")
    entry["title"] = scan_id
    entry["start_time"] = now_iso()
    return entry


def create_slices(
    entry: h5py.Group,
    name: str,
    rows: int,
    shape: tuple[int, int],
    compression: dict[str, Any] | None = None,
    long_name: str = "slices",
) -> tuple[h5py.Dataset, h5py.Dataset]:
    """The NXdata group `name` of `entry`: its (`data`, `received`) datasets, one chunk per
    slice, NaN and False until written."""
    group = entry.create_group(name)
    group.attrs.update(
        NX_class="NXdata", signal="data", axes=["slice_index", ".", "."], slice_index_indices=0
    )
    data = group.create_dataset(
        "data",
        (rows, *shape),
        np.float32,
        chunks=(1, *shape),
        fillvalue=np.nan,
        **(compression or {}),
    )
    data.attrs.update(interpretation="image", long_name=long_name)
    group["slice_index"] = np.arange(rows, dtype=np.int64)
    group["slice_index"].attrs["long_name"] = "detector row"
    received = group.create_dataset("received", (rows,), bool, fillvalue=False)
    return data, received


def write_angles(entry: h5py.Group, theta: np.ndarray) -> h5py.Dataset:
    """The angles reconstructed, in degrees, as NXsample/rotation_angle."""
    sample = entry.create_group("sample")
    sample.attrs["NX_class"] = "NXsample"
    angles = sample.create_dataset("rotation_angle", data=np.degrees(np.asarray(theta, float)))
    angles.attrs["units"] = "degree"
    return angles


def _note(group: h5py.Group, name: str, value: Any) -> None:
    """An NXnote holding `value` as JSON."""
    note = group.create_group(name)
    note.attrs["NX_class"] = "NXnote"
    note["type"] = "application/json"
    note["data"] = json.dumps(value, default=str)


def _field(value: Any) -> Any:
    """A value HDF5 stores as it is (numbers, strings, arrays); anything else as JSON."""
    if isinstance(value, (bool, int, float, str, np.generic, np.ndarray)):
        return value
    return json.dumps(value, default=str)


def write_process(
    entry: h5py.Group,
    model: dict[str, Any],
    settings: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
) -> h5py.Group:
    """The NXprocess `tomocast`: what made the slices. `model` is the denoiser's metadata
    (at least its `name`), `settings` the service's, `parameters` the scan's (one field each,
    dicts and lists as JSON). Each parameter is also an attribute of the group."""
    process = entry.create_group("tomocast")
    process.attrs["NX_class"] = "NXprocess"
    process["program"] = "tomocast"
    process["version"] = __version__
    process["date"] = now_iso()
    process["sequence_index"] = 1
    process["model_name"] = str(model.get("name", "none"))
    _note(process, "model", model)
    if settings is not None:
        _note(process, "settings", settings)
    for key, value in (parameters or {}).items():
        process[key] = _field(value)
        process.attrs[key] = _field(value)
    return process


def entries(f: h5py.File) -> list[str]:
    """The names of the file's NXentry groups holding slices, in file order."""
    names = []
    for name, item in f.items():
        if isinstance(item, h5py.Group) and _nx_class(item) == "NXentry" and "data/data" in item:
            names.append(name)
    return names


def find_slices(f: h5py.File, entry: str | None = None) -> tuple[h5py.Dataset, np.ndarray]:
    """(slices, received) of an entry: `entry` by name, else the root's `default`, else the
    only one; an archive written before NeXus (`/exchange/data`) too. DataError when the file
    has none or several and `entry` does not say which."""
    if entry is None and LEGACY_SLICES in f and not entries(f):
        data = f[LEGACY_SLICES]
        if "exchange/received" in f:
            return data, f["exchange/received"][()]
        return data, np.ones(len(data), bool)
    found = entries(f)
    if entry is None:
        default = f.attrs.get("default")
        default = default.decode() if isinstance(default, bytes) else default
        if isinstance(default, str) and default in found:
            entry = default
        elif len(found) == 1:
            entry = found[0]
    if entry is None or entry not in found:
        which = f"entry {entry!r} is not" if entry is not None else "choose one of"
        raise DataError(
            f"{f.filename}: {which} the NXentry groups with slices: {', '.join(found) or 'none'}"
        )
    return f[entry]["data/data"], f[entry]["data/received"][()]


def _nx_class(group: h5py.Group) -> str | None:
    value = group.attrs.get("NX_class")
    return value.decode() if isinstance(value, bytes) else value
