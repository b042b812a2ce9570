"""The archive is NeXus (service.nexus): NXentry / NXdata (the slices) / NXprocess (what made
them), optionally compressed, on real HDF5 files read back with plain h5py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from service import __version__
from service.archive import Archive
from service.errors import ConfigError
from service.metrics import Metrics
from service.nexus import compression_options, find_slices
from tests.unit.service.test_slice_sinks import ANGLES, COLS, ROWS, completed, feed

# HDF5 filter ids: gzip (deflate) is built in, the others come with hdf5plugin
FILTERS = {"gzip": 1, "bitshuffle-lz4": 32008, "blosc-lz4": 32001}


def archive_one(tmp_path: Path, compression: str = "none", keep_recon: bool = True) -> Path:
    settings = {"archive": {"compression": compression}, "worker": {"batch_rows": 3}}
    model = {"name": "test-model", "depth": 3}
    archive = Archive(tmp_path, keep_recon, 4, Metrics(), model, settings, compression)
    archive.open_directory()
    archive.start()
    feed(archive, "nx", completed("nx"))
    archive.stop()
    assert archive.join(30)
    return tmp_path / "nx.h5"


def nx_class(item: h5py.HLObject) -> str:
    return str(item.attrs["NX_class"])


def test_the_archive_is_a_nexus_entry_with_its_slices_and_process(tmp_path: Path) -> None:
    with h5py.File(archive_one(tmp_path)) as f:
        assert nx_class(f) == "NXroot" and f.attrs["default"] == "entry"
        entry = f["entry"]
        assert nx_class(entry) == "NXentry" and entry.attrs["default"] == "data"
        assert entry["title"][()] == b"nx"
        assert entry["start_time"][()] <= entry["end_time"][()]
        for name, sign in (("data", 1), ("recon", -1)):
            group = entry[name]
            assert nx_class(group) == "NXdata" and group.attrs["signal"] == "data"
            assert list(group.attrs["axes"]) == ["slice_index", ".", "."]
            data = group["data"]
            assert data.shape == (ROWS, COLS, COLS) and data.dtype == np.float32
            # feed() writes slice i filled with i (recon: -i), rows out of order
            np.testing.assert_array_equal(data[:, 0, 0], sign * np.arange(ROWS))
            np.testing.assert_array_equal(group["slice_index"][()], np.arange(ROWS))
        assert entry["data/received"][()].all()
        angles = entry["sample/rotation_angle"]
        assert nx_class(entry["sample"]) == "NXsample" and angles.attrs["units"] == "degree"
        np.testing.assert_allclose(angles[()], np.arange(ANGLES) * 180 / ANGLES)
        process = entry["tomocast"]
        assert nx_class(process) == "NXprocess"
        assert process["program"][()] == b"tomocast"
        assert process["version"][()].decode() == __version__
        assert process["date"][()].decode().startswith("20")
        assert process["model_name"][()] == b"test-model"
        assert json.loads(process["model/data"][()])["depth"] == 3
        settings = json.loads(process["settings/data"][()])
        assert settings["worker"]["batch_rows"] == 3
        assert process["center"][()] == COLS / 2 and process.attrs["center"] == COLS / 2
        assert json.loads(process["meta"][()]) == {"sample": "foam"}
        assert json.loads(process.attrs["completed"])["slices"] == ROWS
        # the DXchange names are links to the same objects, for readers of the older layout
        assert f["exchange/data"] == entry["data/data"]
        assert f["exchange/recon"] == entry["recon/data"]
        assert f["exchange/theta"] == angles
        assert f["process/tomocast"] == process
        slices, received = find_slices(f)
        assert slices == entry["data/data"] and received.all()


def test_without_recon_there_is_no_recon_group(tmp_path: Path) -> None:
    with h5py.File(archive_one(tmp_path, keep_recon=False)) as f:
        assert "recon" not in f["entry"] and "exchange/recon" not in f


@pytest.mark.parametrize("compression", list(FILTERS))
def test_compressed_slices_read_back_exactly(tmp_path: Path, compression: str) -> None:
    if compression != "gzip":
        pytest.importorskip("hdf5plugin")  # also registers the filters for reading
    path = archive_one(tmp_path, compression)
    with h5py.File(path) as f:
        data = f["entry/data/data"]
        plist = data.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        assert FILTERS[compression] in filters
        np.testing.assert_array_equal(data[:, 0, 0], np.arange(ROWS))
        np.testing.assert_array_equal(f["entry/recon/data"][:, 3, 2], -np.arange(ROWS))


def test_an_unavailable_filter_is_a_clear_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # import hdf5plugin raises
    with pytest.raises(ConfigError, match=r"archive\.compression='bitshuffle-lz4'.*hdf5plugin"):
        Archive(Path("."), False, 4, Metrics(), {"name": "none"}, None, "bitshuffle-lz4")
    assert compression_options("gzip")["compression"] == "gzip"  # needs nothing extra
    with pytest.raises(ConfigError, match="not one of"):
        compression_options("zstd")


def test_a_scan_made_by_adapted_weights_names_them(tmp_path: Path) -> None:
    """model.adapt swaps the weights between scans: each file names the weights that made its
    slices (the scan's model), not the ones the service started with."""
    from dataclasses import replace

    from tests.unit.service.test_slice_sinks import batch, describe

    archive = Archive(tmp_path, False, 4, Metrics(), {"name": "test-model", "depth": 3})
    archive.open_directory()
    archive.start()
    archive.begin(replace(describe("swapped"), model="test-model-adapted-1"))
    archive.write(batch("swapped", "slice", 0, ROWS))
    archive.end(completed("swapped"))
    archive.stop()
    assert archive.join(30)
    with h5py.File(tmp_path / "swapped.h5") as f:
        process = f["entry/tomocast"]
        assert process["model_name"][()] == b"test-model-adapted-1"
        model = json.loads(process["model/data"][()])
        assert model["adapted_from"] == "test-model" and model["depth"] == 3
        assert json.loads(process.attrs["model"])["name"] == "test-model-adapted-1"
