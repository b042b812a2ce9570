"""Reading DXchange files for replay: round trip, lazy chunks, dtypes, and what is missing."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from service.errors import DataError
from service.sim.replay import iter_projection_chunks, read_dxchange
from service.sim.simulate import SimulatedScan, simulate_scan, write_dxchange


def _write(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(f"exchange/{name}", data=value)
    return path


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, SimulatedScan]:
    scan = simulate_scan(
        "rec-7",
        rows=3,
        cols=16,
        n_angles=12,
        n_dark=2,
        n_flat=4,
        seed=6,
        center=8.25,
        meta={"energy_kev": 25},
    )
    path = tmp_path / "rec.h5"
    write_dxchange(path, scan)
    return path, scan


def test_round_trip_of_a_simulated_scan(recorded: tuple[Path, SimulatedScan]) -> None:
    path, scan = recorded
    replay = read_dxchange(path)
    assert replay.scan_id == "rec-7" and replay.dtype == "uint16" and replay.center == 8.25
    np.testing.assert_allclose(replay.theta, scan.theta, atol=1e-12)  # back in radians
    np.testing.assert_array_equal(replay.projections, scan.projections)
    np.testing.assert_array_equal(replay.darks, scan.darks)
    np.testing.assert_array_equal(replay.flats, scan.flats)
    start = replay.scan_start(seq=3)
    assert (start.rows, start.cols, start.n_angles, start.n_dark, start.n_flat) == (3, 16, 12, 2, 4)
    assert start.seq == 3 and start.dtype == "uint16" and not start.normalized
    np.testing.assert_allclose(start.theta_array(), scan.theta, atol=1e-12)
    assert start.meta == {"energy_kev": 25, "source": "rec.h5"}


def test_projections_stream_in_chunks(recorded: tuple[Path, SimulatedScan]) -> None:
    path, scan = recorded
    lazy = read_dxchange(path, load_projections=False)
    assert lazy.projections is None and lazy.shape == (12, 3, 16)
    chunks = list(iter_projection_chunks(path, 5))
    assert [(index, len(frames)) for index, frames in chunks] == [(0, 5), (5, 5), (10, 2)]
    assert all(frames.dtype == np.dtype("<u2") for _, frames in chunks)
    np.testing.assert_array_equal(np.concatenate([f for _, f in chunks]), scan.projections)


def test_missing_data_names_file_and_dataset(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.h5", theta=np.arange(3.0))
    with pytest.raises(DataError, match=r"empty\.h5.*/exchange/data"):
        read_dxchange(path)
    with pytest.raises(DataError, match=r"/exchange/data"):
        list(iter_projection_chunks(path, 4))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="cannot open as HDF5"):
        read_dxchange(tmp_path / "text.h5")


def test_inconsistent_files_are_refused(tmp_path: Path) -> None:
    data = np.ones((4, 2, 8), np.uint16)
    with pytest.raises(DataError, match="theta has 3 angles"):
        read_dxchange(_write(tmp_path / "a.h5", data=data, theta=np.arange(3.0)))
    with pytest.raises(DataError, match="data_white has shape"):
        read_dxchange(_write(tmp_path / "b.h5", data=data, data_white=np.ones((2, 2, 7))))
    with pytest.raises(DataError, match="NaN or inf values in frame 2"):
        bad = data.astype(np.float32)
        bad[2, 1, 3] = np.nan
        read_dxchange(_write(tmp_path / "c.h5", data=bad, data_white=np.ones((1, 2, 8), "f4")))


def test_missing_theta_and_flats_are_assumed_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "bare scan#1.h5", data=np.ones((6, 2, 8), np.float32))
    with caplog.at_level(logging.INFO, logger="service.sim.replay"):
        replay = read_dxchange(path)
    np.testing.assert_allclose(replay.theta, np.arange(6) * np.pi / 6)
    assert "no /exchange/theta" in caplog.text and "no flats" in caplog.text
    assert replay.normalized and replay.scan_start().normalized
    assert replay.darks.shape == (0, 2, 8) and replay.flats.shape == (0, 2, 8)
    assert replay.scan_id == "bare_scan_1"  # from the file name, made protocol-safe


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 1000, 65535], np.int32), "uint16"),
        (np.array([0, 70000, 5], np.int64), "uint32"),
        (np.array([-3, 2, 5], np.int16), "float32"),
        (np.array([0.5, 2.0, 1.0], np.float64), "float32"),
        (np.array([0, 200, 5], np.uint8), "uint8"),
    ],
)
def test_dtypes_outside_the_protocol_are_converted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, values: np.ndarray, expected: str
) -> None:
    data = np.broadcast_to(values[:, None, None], (3, 2, 4)).copy()
    flats = np.ones((2, 2, 4), values.dtype)
    path = _write(tmp_path / "typed.h5", data=data, data_white=flats)
    with caplog.at_level(logging.INFO, logger="service.sim.replay"):
        replay = read_dxchange(path)
    assert replay.dtype == expected and replay.projections is not None
    assert replay.projections.dtype.name == expected and replay.flats.dtype.name == expected
    np.testing.assert_array_equal(replay.projections, data.astype(expected))
    if values.dtype.name != expected:
        assert f"sending as {expected}" in caplog.text or "converting to float32" in caplog.text
    ((_, first),) = iter_projection_chunks(path, 10)
    assert first.dtype.name == expected
