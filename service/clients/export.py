"""`tomocast export-slices`: an archive's slices as TIFF, for ImageJ/Fiji, Avizo and friends.

Default: one multi-page float32 TIFF per archive, `<DIR>/<scan_id>.tif`, written in ImageJ's
hyperstack format (axes ZYX, one page per detector row), so ImageJ/Fiji opens it as a stack
with File > Open (or drag and drop) and its slider walks the rows. `--separate`: one float32
TIFF per slice, `<DIR>/<scan_id>/slice_00012.tif`, for tools that import image sequences
(ImageJ's File > Import > Image Sequence, Avizo). Slices never written (a scan cut short) are
NaN, as in the archive. Reads the archive's NeXus layout (`service.nexus`), viewer files from
`tomocast view --out` (`--entry` picks the scan) and archives written before NeXus
(`/exchange/data`). Files appear whole: written aside, then renamed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from service.errors import DataError
from service.nexus import find_slices

log = logging.getLogger(__name__)


def export_tiff(
    archive: Path,
    directory: Path,
    entry: str | None = None,
    recon: bool = False,
    separate: bool = False,
) -> list[Path]:
    """Write the slices of `archive` (its plain FBP slices with `recon`) as TIFF under
    `directory`; the files written."""
    import tifffile

    # registers the filters of compressed archives; uncompressed and gzip ones need nothing
    # more, and the others fail in `_pages` with a message that says what to install
    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401
    try:
        f = h5py.File(archive, "r")
    except OSError as exc:
        raise DataError(f"{archive}: not an HDF5 file that can be read ({exc})") from None
    with f:
        slices, received = find_slices(f, entry)
        name = entry or _stem(archive)
        if recon:  # beside the slices: the entry's NXdata `recon`, or DXchange's
            legacy = str(slices.name).startswith("/exchange")
            path = "/exchange/recon" if legacy else f"{slices.parent.parent.name}/recon/data"
            if path not in f:
                raise DataError(f"{archive}: no plain FBP slices ({path}): archived without recon")
            slices = f[path]
        rows = len(slices)
        missing = int(np.count_nonzero(~np.asarray(received, bool)))
        if missing:
            log.warning(
                "%s: %d of %d slices were never written: NaN", archive, missing, len(slices)
            )
        directory.mkdir(parents=True, exist_ok=True)
        if separate:
            return _separate(slices, directory / name)
        target = directory / f"{name}.tif"
        aside = directory / f".{target.name}.partial"
        _, height, width = slices.shape
        with tifffile.TiffWriter(aside, imagej=True) as tif:
            tif.write(
                _pages(slices),
                shape=(rows, height, width),
                dtype=np.float32,
                metadata={"axes": "ZYX"},
            )
        os.replace(aside, target)
        return [target]


def _pages(slices: h5py.Dataset) -> Iterator[np.ndarray]:
    """One slice at a time: an archive larger than memory exports in constant memory."""
    for index in range(len(slices)):
        try:
            page = slices[index]
        except OSError as exc:  # h5py's error when a filter is missing
            raise DataError(
                f"{slices.file.filename}: cannot read {slices.name} ({exc}): a compressed "
                "archive needs hdf5plugin (pip install 'tomocast[nexus]')"
            ) from None
        yield np.asarray(page, dtype=np.float32)


def _separate(slices: h5py.Dataset, folder: Path) -> list[Path]:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, page in enumerate(_pages(slices)):
        target = folder / f"slice_{index:05d}.tif"
        aside = folder / f".{target.name}.partial"
        tifffile.imwrite(aside, page, imagej=True, metadata={"axes": "YX"})
        os.replace(aside, target)
        written.append(target)
    return written


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".partial", ".h5", ".hdf5", ".nxs", ".nx"):
        name = name.removesuffix(suffix)
    return name


def run_export(args: argparse.Namespace) -> int:
    """`tomocast export-slices ARCHIVE --tiff DIR`."""
    written = export_tiff(args.archive, args.tiff, args.entry, args.recon, args.separate)
    where = written[0] if len(written) == 1 else f"{len(written)} files in {written[0].parent}"
    print(f"wrote {where}")
    return 0
