"""`tomocast export-slices ARCHIVE --tiff DIR`: TIFF files read back with tifffile hold exactly
the archive's slices, as an ImageJ stack (or one file per slice)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from service.cli import main
from tests.unit.service.test_archive_nexus import archive_one
from tests.unit.service.test_slice_sinks import COLS, ROWS


def test_the_stack_holds_every_slice_and_imagej_reads_it_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = archive_one(tmp_path / "archive")
    assert main(["export-slices", str(archive), "--tiff", str(tmp_path / "tiff")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "tiff").iterdir()) == ["nx.tif"]
    with h5py.File(archive) as f:
        expected = f["entry/data/data"][()]
        recon = f["entry/recon/data"][()]
    with tifffile.TiffFile(tmp_path / "tiff" / "nx.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["images"] == ROWS
        assert len(tif.pages) == ROWS
        stack = tif.asarray()
    assert stack.dtype == np.float32 and stack.shape == (ROWS, COLS, COLS)
    np.testing.assert_array_equal(stack, expected)
    assert main(["export-slices", str(archive), "--tiff", str(tmp_path / "fbp"), "--recon"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "fbp" / "nx.tif"), recon)


def test_a_compressed_archive_exports_alike(tmp_path: Path) -> None:
    pytest.importorskip("hdf5plugin")
    archive = archive_one(tmp_path / "archive", "bitshuffle-lz4")
    assert main(["export-slices", str(archive), "--tiff", str(tmp_path / "tiff")]) == 0
    with h5py.File(archive) as f:
        expected = f["entry/data/data"][()]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "tiff" / "nx.tif"), expected)


def test_separate_files_and_an_archive_from_before_nexus(tmp_path: Path) -> None:
    rows = np.random.default_rng(2).normal(size=(3, 4, 5)).astype(np.float32)
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:  # the layout archives had before NeXus
        f["exchange/data"] = rows
        f["exchange/received"] = np.array([True, False, True])
    out = tmp_path / "tiff"
    assert main(["export-slices", str(old), "--tiff", str(out), "--separate"]) == 0
    files = sorted((out / "old").iterdir())
    assert [p.name for p in files] == [f"slice_{i:05d}.tif" for i in range(3)]
    for index, path in enumerate(files):
        page = tifffile.imread(path)
        assert page.dtype == np.float32
        np.testing.assert_array_equal(page, rows[index])


def test_a_file_without_slices_is_refused_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    assert main(["export-slices", str(empty), "--tiff", str(tmp_path / "t")]) == 2
    assert "NXentry" in capsys.readouterr().err
    archive = archive_one(tmp_path / "a", keep_recon=False)
    assert main(["export-slices", str(archive), "--tiff", str(tmp_path / "t"), "--recon"]) == 2
    assert "without recon" in capsys.readouterr().err
