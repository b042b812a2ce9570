"""The simulated detector: counting statistics, flat-field consistency, files, pacing."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from service.sim.simulate import ScanPacer, simulate_scan, write_dxchange, write_truth
from workers.phantom import FoamPhantom


def test_scan_shapes_and_start_message() -> None:
    scan = simulate_scan(
        "sim-1", rows=4, cols=32, n_angles=24, n_dark=3, n_flat=5, seed=1, meta={"sample": "foam"}
    )
    start = scan.start
    assert (start.scan_id, start.rows, start.cols, start.n_angles) == ("sim-1", 4, 32, 24)
    assert (start.n_dark, start.n_flat, start.dtype, start.normalized) == (3, 5, "uint16", False)
    assert start.theta is None and start.center is None and start.meta == {"sample": "foam"}
    assert scan.darks.shape == (3, 4, 32) and scan.flats.shape == (5, 4, 32)
    assert scan.projections.shape == (24, 4, 32)
    assert {scan.darks.dtype, scan.flats.dtype, scan.projections.dtype} == {np.dtype("<u2")}
    assert scan.truth.shape == (4, 32, 32) and scan.truth.dtype == np.float32
    assert scan.line_integrals.shape == (24, 4, 32) and scan.line_integrals.dtype == np.float32
    np.testing.assert_allclose(scan.theta, np.arange(24) * np.pi / 24)
    np.testing.assert_array_equal(scan.truth, scan.phantom.voxelize())
    np.testing.assert_array_equal(
        scan.line_integrals, FoamPhantom.random(4, 32, seed=1).project(scan.theta)
    )


def test_flat_field_correction_recovers_the_line_integrals() -> None:
    scan = simulate_scan(
        "sim-2",
        rows=4,
        cols=64,
        n_angles=30,
        photons=20000.0,
        n_dark=20,
        n_flat=20,
        dtype="uint32",
        seed=2,
    )
    dark = scan.darks.mean(axis=0)
    flat = scan.flats.mean(axis=0)
    estimate = -np.log((scan.projections - dark) / (flat - dark))
    error = estimate - scan.line_integrals
    assert abs(error.mean()) < 2e-3  # no bias: the beam profile and dark offsets cancel
    assert np.abs(error).mean() < 0.02  # photon noise only
    assert scan.line_integrals.max() == pytest.approx(2.0, abs=0.1)


def test_counts_are_poisson() -> None:
    scan = simulate_scan(
        "sim-3",
        rows=8,
        cols=32,
        n_angles=2,
        photons=500.0,
        n_dark=200,
        n_flat=200,
        dark_level=50.0,
        seed=3,
    )
    for frames in (scan.darks, scan.flats):
        counts = frames.astype(np.float64)
        ratio = counts.var(axis=0, ddof=1) / counts.mean(axis=0)
        assert ratio.mean() == pytest.approx(1.0, abs=0.05)
    assert scan.darks.mean() == pytest.approx(50.0, rel=0.05)
    assert (scan.flats.mean() - scan.darks.mean()) == pytest.approx(500.0, rel=0.1)


def test_seed_reproducible_and_dtypes(caplog: pytest.LogCaptureFixture) -> None:
    a = simulate_scan("a", rows=2, cols=16, n_angles=4, seed=9)
    b = simulate_scan("a", rows=2, cols=16, n_angles=4, seed=9)
    np.testing.assert_array_equal(a.projections, b.projections)
    np.testing.assert_array_equal(a.flats, b.flats)
    floats = simulate_scan("f", rows=2, cols=16, n_angles=4, dtype="float32")
    assert floats.projections.dtype == np.float32
    with caplog.at_level(logging.WARNING, logger="service.sim.simulate"):
        bytes_ = simulate_scan("u8", rows=2, cols=16, n_angles=4, dtype="uint8")
    assert bytes_.flats.max() == 255 and "saturate uint8" in caplog.text
    with pytest.raises(ValueError, match="int16"):
        simulate_scan("bad", rows=2, cols=16, n_angles=4, dtype="int16")


def test_center_moves_the_axis_on_the_detector() -> None:
    centred = simulate_scan("c0", rows=2, cols=40, n_angles=6, seed=4)
    shifted = simulate_scan("c1", rows=2, cols=40, n_angles=6, seed=4, center=23.0)
    assert shifted.start.center == 23.0 and shifted.start.rotation_center() == 23.0
    np.testing.assert_allclose(
        shifted.line_integrals[..., 3:], centred.line_integrals[..., :-3], atol=1e-5
    )


def test_write_truth(tmp_path: Path) -> None:
    scan = simulate_scan("truth-1", rows=4, cols=32, n_angles=8, seed=5)
    path = tmp_path / "truth.h5"
    write_truth(path, scan)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["truth/volume"][()], scan.truth)
        table = f["truth/spheres"][()]
        assert json.loads(f["truth/spheres"].attrs["columns"]) == ["x", "y", "z", "radius"]
        assert f["truth"].attrs["scan_id"] == "truth-1"
        assert f["truth"].attrs["mu"] == pytest.approx(scan.phantom.mu)
        np.testing.assert_allclose(f["truth/theta"][()], scan.theta)
    assert table.shape == (len(scan.phantom.spheres), 4)
    np.testing.assert_allclose(table[:, 3], [s.radius for s in scan.phantom.spheres])


def test_write_dxchange_layout(tmp_path: Path) -> None:
    scan = simulate_scan(
        "dx-1", rows=3, cols=16, n_angles=12, n_dark=2, n_flat=4, seed=6, center=8.5
    )
    path = tmp_path / "scan.h5"
    write_dxchange(path, scan)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["exchange/data"][()], scan.projections)
        np.testing.assert_array_equal(f["exchange/data_dark"][()], scan.darks)
        np.testing.assert_array_equal(f["exchange/data_white"][()], scan.flats)
        np.testing.assert_allclose(f["exchange/theta"][()], np.arange(12) * 15.0)  # degrees
        assert f["exchange"].attrs["center"] == 8.5
        assert f["exchange"].attrs["scan_id"] == "dx-1"


def test_pacer_keeps_the_rate_without_drift() -> None:
    pacer = ScanPacer(100.0)
    started = time.monotonic()
    for _ in range(20):
        pacer.wait(1)
        time.sleep(0.004)  # work between frames is absorbed, not added to the period
    elapsed = time.monotonic() - started
    # frame 20 is due at 19/100 s after the first; the sender's own work must not add 20*4 ms
    assert 0.19 <= elapsed < 0.19 + 0.06


def test_pacer_counts_frames_per_call_and_catches_up() -> None:
    pacer = ScanPacer(50.0)
    assert pacer.wait(5) == 0.0  # the first chunk goes at once
    assert pacer.wait(5) == pytest.approx(0.1, abs=0.03)  # 5 frames at 50 Hz
    time.sleep(0.15)  # the sender fell behind (a blocked socket) ...
    assert pacer.wait(5) == 0.0  # ... and is not made to wait again
    assert ScanPacer(None).wait(1000) == 0.0
    with pytest.raises(ValueError, match="rate_hz"):
        ScanPacer(0.0)
