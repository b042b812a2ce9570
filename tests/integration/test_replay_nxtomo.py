"""`tomocast replay FILE.nx`: NXtomo files written by the `nxtomo` package (darks, flats before
and after the projections, angles in degrees) replay through a real service to every slice, as
accurate as an FBP of the same data computed here; compressed data sets open with hdf5plugin."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from service.cli import main
from service.client import Published, Subscriber
from service.errors import DataError
from service.events import ScanCompleted, ScanEnded
from service.sim.nxtomo import is_nxtomo, iter_nxtomo_chunks, read_nxtomo
from service.sim.simulate import SimulatedScan, simulate_scan
from workers.recon import recon

nxtomo = pytest.importorskip("nxtomo", reason="the nxtomo package (test extra) writes the files")
pint = pytest.importorskip("pint")

ROWS, COLS, ANGLES = 6, 64, 90


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan("nx", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=3000.0, seed=11)


def write_nxtomo(path: Path, scan: SimulatedScan, entry: str = "entry0000") -> None:
    """What a beamline writes: darks, half the flats, the projections, the other flats; angles
    in degrees; pixel size, distance and energy with their units."""
    from nxtomo.nxobject.nxdetector import ImageKey

    units = pint.get_application_registry()
    half = len(scan.flats) // 2
    frames = [scan.darks, scan.flats[:half], scan.projections, scan.flats[half:]]
    keys = (
        [ImageKey.DARK_FIELD] * len(scan.darks)
        + [ImageKey.FLAT_FIELD] * half
        + [ImageKey.PROJECTION] * len(scan.projections)
        + [ImageKey.FLAT_FIELD] * (len(scan.flats) - half)
    )
    degrees = np.degrees(scan.theta)
    angles = np.concatenate(
        [np.zeros(len(scan.darks) + half), degrees, np.full(len(scan.flats) - half, 180.0)]
    )
    tomo = nxtomo.NXtomo()
    tomo.instrument.detector.data = np.concatenate(frames)
    tomo.instrument.detector.image_key_control = keys
    tomo.sample.rotation_angle = angles * units.degree
    tomo.instrument.detector.x_pixel_size = 6.5 * units.micrometer
    tomo.instrument.detector.distance = 120.0 * units.millimeter
    tomo.instrument.beam.incident_energy = 19.0 * units.keV
    tomo.save(str(path), entry)


def test_reads_frames_angles_and_physics(tmp_path: Path, scan: SimulatedScan) -> None:
    path = tmp_path / "scan.nx"
    write_nxtomo(path, scan)
    assert is_nxtomo(path)
    replay = read_nxtomo(path)
    start = replay.scan_start()
    assert (start.rows, start.cols, start.n_angles) == (ROWS, COLS, ANGLES)
    assert (start.n_dark, start.n_flat) == (len(scan.darks), len(scan.flats))
    np.testing.assert_allclose(replay.theta, scan.theta, atol=1e-12)
    np.testing.assert_array_equal(replay.projections, scan.projections)
    np.testing.assert_array_equal(np.sort(replay.flats, axis=0), np.sort(scan.flats, axis=0))
    assert replay.meta["pixel_size_m"] == pytest.approx(6.5e-6)
    assert replay.meta["distance_m"] == pytest.approx(0.12)
    assert replay.meta["energy_kev"] == pytest.approx(19.0)
    chunks = list(iter_nxtomo_chunks(path, 7, replay.dtype))
    assert [first for first, _ in chunks] == list(range(0, ANGLES, 7))
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), scan.projections)


def test_several_entries_need_a_choice(tmp_path: Path, scan: SimulatedScan) -> None:
    path = tmp_path / "two.nx"
    write_nxtomo(path, scan, "entry0000")
    write_nxtomo(path, scan, "entry0001")
    with pytest.raises(DataError, match=r"2 NXtomo entries .*choose one \(--entry\)"):
        read_nxtomo(path)
    assert read_nxtomo(path, "entry0001").meta["entry"] == "entry0001"
    with pytest.raises(DataError, match="no NXtomo entry 'entry9'"):
        read_nxtomo(path, "entry9")


def test_compressed_frames_open_with_hdf5plugin(tmp_path: Path, scan: SimulatedScan) -> None:
    hdf5plugin = pytest.importorskip("hdf5plugin")
    path = tmp_path / "scan.nx"
    write_nxtomo(path, scan)
    with h5py.File(path, "r+") as f:
        detector = f["entry0000/instrument/detector"]
        frames = detector["data"][()]
        del detector["data"]
        detector.create_dataset(
            "data", data=frames, chunks=(1, ROWS, COLS), **hdf5plugin.Bitshuffle(cname="lz4")
        )
    np.testing.assert_array_equal(read_nxtomo(path).projections, scan.projections)


def test_replay_through_the_service_matches_an_offline_fbp(
    start_service: Any, tmp_path: Path, scan: SimulatedScan
) -> None:
    path = tmp_path / "scan.nx"
    write_nxtomo(path, scan)
    _, endpoints = start_service(model={"enabled": False})
    slices: dict[int, np.ndarray] = {}
    ended: list[ScanEnded] = []
    with Subscriber(endpoints.publish, ("slice", "event")) as viewer:
        viewer.wait_ready()
        code: list[int] = []
        sender = threading.Thread(
            target=lambda: code.append(
                main(["replay", str(path), "--connect", endpoints.ingest, "--scan-id", "nx"])
            )
        )
        sender.start()
        while not ended:
            message: Published | None = viewer.recv(timeout=60.0)
            assert message is not None, "nothing published for 60 s"
            event = message.event()
            if isinstance(event, ScanEnded):
                ended.append(event)
            elif event is None and message.data is not None:
                slices[int(message.header["index"])] = message.data
        sender.join(60)
    assert code == [0]
    assert isinstance(ended[0], ScanCompleted) and sorted(slices) == list(range(ROWS))
    # the same data reconstructed here: flat-field in float64 numpy, FBP by workers.recon
    dark = scan.darks.astype(np.float64).mean(axis=0)
    flat = scan.flats.astype(np.float64).mean(axis=0)
    ratio = (scan.projections.astype(np.float64) - dark) / (flat - dark)
    reference = recon((-np.log(np.clip(ratio, 1e-6, None))).astype(np.float32), scan.theta)
    for row in range(ROWS):
        replayed = np.linalg.norm(slices[row] - scan.truth[row])
        offline = np.linalg.norm(reference[row] - scan.truth[row])
        assert replayed <= 1.2 * offline, (row, replayed, offline)
