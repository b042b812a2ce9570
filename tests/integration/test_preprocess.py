"""`[preprocess]` through a real service over loopback TCP (denoiser off, so topic `slice` is
the FBP): each detector fault of `tomocast simulate` repaired, measured as the reconstruction's
error against the phantom, beside an offline reference (numpy flat-field, `workers.recon`) of
the same data with nothing removed."""

from __future__ import annotations

import dataclasses
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from service.app import Service
from service.client import Detector, Subscriber
from service.events import ScanCompleted
from service.sim.simulate import Faults, SimulatedScan, simulate_scan
from tests.support.helpers import GatedGridding
from workers.preprocess import paganin_filter, stitch_half_acquisition
from workers.recon import recon

ROWS, COLS, ANGLES = 16, 256, 360
# photons per open-beam pixel: enough that a 3% gain's rings, not the noise, dominate the error
PHOTONS = 6e4
OFFSET = 6.0


def scan_of(
    faults: Faults | None = None, center: float | None = COLS / 2, **kw: Any
) -> SimulatedScan:
    """A simulated scan; `center` is declared in scan_start (None: not declared)."""
    scan = simulate_scan(
        "s", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=PHOTONS, faults=faults, **kw
    )
    return dataclasses.replace(scan, start=dataclasses.replace(scan.start, center=center))


def through(
    service: Service, endpoints: Any, scan: SimulatedScan, scan_id: str
) -> tuple[np.ndarray, ScanCompleted]:
    """`scan` sent as `scan_id`; its slices (rows, N, N) and its `scan_completed`."""
    slices: dict[int, np.ndarray] = {}
    start = scan.start
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan(
            scan_id,
            scan.projections,
            darks=scan.darks,
            flats=scan.flats,
            chunk=16,
            center=start.center,
            theta=None if start.theta is None else list(start.theta),
            meta=start.meta,
        )
        while True:
            message = viewer.recv(timeout=120.0)
            assert message is not None, "nothing published for 120 s"
            event = message.event()
            if isinstance(event, ScanCompleted) and event.scan_id == scan_id:
                break
            if message.topic == "slice" and message.header["scan_id"] == scan_id:
                assert message.data is not None
                slices[message.header["index"]] = message.data
    assert sorted(slices) == list(range(start.rows))
    return np.stack([slices[i] for i in range(start.rows)]), event


def line_integrals(scan: SimulatedScan) -> np.ndarray:
    """Flat-field correction in float64 numpy, nothing removed."""
    dark = scan.darks.astype(np.float64).mean(axis=0)
    flat = scan.flats.astype(np.float64).mean(axis=0)
    ratio = (scan.projections.astype(np.float64) - dark) / (flat - dark)
    return (-np.log(np.clip(ratio, 1e-6, None))).astype(np.float32)


def error(slices: np.ndarray, truth: np.ndarray) -> float:
    """RMS error against the phantom inside 0.45 of the slice (the foam and a margin)."""
    n = truth.shape[-1]
    c = np.arange(n) - (n - 1) / 2
    inside = c[:, None] ** 2 + c[None, :] ** 2 < (0.45 * n) ** 2
    return float(np.sqrt(np.mean((slices - truth)[:, inside] ** 2)))


def offline_error(scan: SimulatedScan, center: float) -> float:
    return error(recon(line_integrals(scan), scan.theta, center=center, device="cpu"), scan.truth)


@pytest.fixture(scope="module")
def clean() -> SimulatedScan:
    return scan_of()


@pytest.fixture
def repairing(start_service: Any) -> tuple[Service, Any]:
    """A service with every repair on (the centre is "auto" by default)."""
    return start_service(  # type: ignore[no-any-return]
        model={"enabled": False},
        preprocess={"stripe_removal": "auto", "zingers": "auto"},
    )


def test_an_undeclared_off_centre_axis_is_found_and_used(
    repairing: tuple[Service, Any],
) -> None:
    service, endpoints = repairing
    off = scan_of(Faults(center_offset=OFFSET), center=None)
    declared = dataclasses.replace(
        off, start=dataclasses.replace(off.start, center=COLS / 2 + OFFSET)
    )
    found, estimated = through(service, endpoints, off, "estimated")
    told, known = through(service, endpoints, declared, "declared")
    assert estimated.center_source == "estimated" and known.center_source == "declared"
    assert estimated.center == pytest.approx(COLS / 2 + OFFSET, abs=0.25)
    assert known.center == COLS / 2 + OFFSET
    ratio = error(found, off.truth) / error(told, off.truth)
    print(f"off-centre axis, estimated / declared error: {ratio:.3f}")
    assert ratio <= 1.15
    # the protocol's old default, the detector's middle, would have been far worse
    assert offline_error(off, COLS / 2) > 2 * error(found, off.truth)
    registry = service.metrics.registry
    assert registry.get_sample_value("tomocast_center_pixels") == known.center
    for source in ("estimated", "declared"):
        assert registry.get_sample_value("tomocast_centers_total", {"source": source}) == 1


def test_stripe_removal_cuts_the_rings_and_spares_a_ring_free_scan(
    repairing: tuple[Service, Any], clean: SimulatedScan
) -> None:
    service, endpoints = repairing
    ringed = scan_of(Faults(rings=0.03))
    repaired, event = through(service, endpoints, ringed, "rings")
    assert event.preprocessing["stripe_removal"] == "auto"
    ratio = error(repaired, ringed.truth) / offline_error(ringed, COLS / 2)
    kept, _ = through(service, endpoints, clean, "ring-free")
    change = error(kept, clean.truth) / offline_error(clean, COLS / 2)
    print(f"rings removed / unremoved error: {ratio:.3f}; ring-free scan changed {change:.3f}x")
    assert ratio <= 0.6
    assert 0.9 <= change <= 1.1


def test_zingers_are_replaced_before_log_and_counted(
    repairing: tuple[Service, Any], clean: SimulatedScan
) -> None:
    service, endpoints = repairing
    hit = scan_of(Faults(zingers=0.0002))
    saturated = int((hit.projections == np.iinfo(np.uint16).max).sum())
    repaired, event = through(service, endpoints, hit, "zingers")
    ratio = error(repaired, hit.truth) / offline_error(clean, COLS / 2)
    print(f"zingers removed / zinger-free error: {ratio:.3f}")
    assert ratio <= 1.15
    assert offline_error(hit, COLS / 2) > 1.3 * offline_error(clean, COLS / 2)  # they matter
    assert saturated <= event.zinger_pixels <= saturated + 0.0005 * hit.projections.size
    assert event.preprocessing["zingers"] == "auto"
    counted = service.metrics.registry.get_sample_value("tomocast_zinger_pixels_total")
    assert counted == event.zinger_pixels


def test_a_configured_centre_is_used_and_prepared_ahead(start_service: Any) -> None:
    gridding = GatedGridding()
    service, endpoints = start_service(
        gridding, model={"enabled": False}, preprocess={"center": 64.5}
    )
    small = simulate_scan("s", rows=2, cols=128, n_angles=96, photons=1e4, seed=1)
    _, configured = through(service, endpoints, small, "configured")
    assert (configured.center, configured.center_source) == (64.5, "config")
    assert 64.5 in gridding.built  # prepared at scan start with the configured centre
    declared = dataclasses.replace(small, start=dataclasses.replace(small.start, center=63.0))
    _, told = through(service, endpoints, declared, "told")
    assert (told.center, told.center_source) == (63.0, "declared")


def test_an_estimated_centre_gets_its_own_geometry(start_service: Any) -> None:
    """The preparer cannot know an estimated centre: it builds nothing ahead, and the scan's
    first batch builds the geometry at the estimate (the cache is keyed by the centre)."""
    gridding = GatedGridding()
    service, endpoints = start_service(gridding, model={"enabled": False})
    small = simulate_scan(
        "s", rows=2, cols=128, n_angles=96, photons=1e4, seed=1, faults=Faults(center_offset=3)
    )
    built = len(gridding.built)
    _, event = through(service, endpoints, small, "auto")
    assert event.center_source == "estimated" and event.center == pytest.approx(67, abs=0.25)
    assert gridding.built[built:] == [event.center]
    assert (
        service.metrics.registry.get_sample_value(
            "tomocast_geometry_prepares_total", {"outcome": "deferred"}
        )
        == 1
    )


def test_half_acquisition_is_stitched_to_a_wider_slice(start_service: Any) -> None:
    service, endpoints = start_service(
        model={"enabled": False}, preprocess={"half_acquisition": True}
    )
    scan = simulate_scan(
        "s", rows=2, cols=96, n_angles=240, photons=1e4, faults=Faults(half_acquisition=True)
    )
    slices, event = through(service, endpoints, scan, "offset-axis")
    axis = 96 - 96 // 8  # where the simulation put it (tomocast's convention)
    assert event.preprocessing["half_acquisition"] == f"stitched to {2 * axis} columns"
    assert event.center_source == "estimated"
    assert event.center == pytest.approx(axis, abs=0.25)
    # the same stitch offline about the true axis: the sample, twice the detector's reach
    stitched, center = stitch_half_acquisition(line_integrals(scan).transpose(1, 0, 2), float(axis))
    reference = recon(stitched.transpose(1, 0, 2), scan.theta[:120], center=center, device="cpu")
    assert slices.shape == reference.shape == scan.truth.shape
    ratio = error(slices, scan.truth) / error(reference, scan.truth)
    print(f"half-acquisition, estimated / true axis error: {ratio:.3f}")
    assert ratio <= 1.15


def test_paganin_phase_retrieval_with_parameters_from_meta(start_service: Any) -> None:
    service, endpoints = start_service(
        model={"enabled": False},
        preprocess={"phase_retrieval": "paganin", "distance_m": 0.2, "delta_beta": 200.0},
    )
    meta = {"energy_kev": 25.0, "pixel_size_m": 1e-6}
    scan = simulate_scan("s", rows=8, cols=64, n_angles=90, photons=1e4, meta=meta)
    slices, event = through(service, endpoints, scan, "phase")
    assert event.preprocessing["phase_retrieval"] == "paganin"
    dark = scan.darks.astype(np.float32).mean(axis=0)
    flat = scan.flats.astype(np.float32).mean(axis=0)
    transmission = (scan.projections.astype(np.float32) - dark) / (flat - dark)
    filtered = paganin_filter(transmission, 25.0, 0.2, 1e-6, 200.0)
    reference = recon(
        -np.log(np.clip(filtered, 1e-6, None)), scan.theta, center=event.center, device="cpu"
    )
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(slices, reference, rtol=0, atol=1e-3 * scale)
    # without its parameters, the scan is reconstructed without phase retrieval, and says why
    _, skipped = through(
        service,
        endpoints,
        dataclasses.replace(scan, start=dataclasses.replace(scan.start, meta={})),
        "no-energy",
    )
    assert skipped.preprocessing["phase_retrieval"].startswith("skipped: no energy_kev")


def test_the_archive_records_the_centre(start_service: Any, tmp_path: Any) -> None:
    service, endpoints = start_service(model={"enabled": False}, archive={"directory": tmp_path})
    scan = simulate_scan("s", rows=2, cols=64, n_angles=60, photons=1e4, seed=2)
    _, event = through(service, endpoints, scan, "archived")
    service.stop()
    with h5py.File(tmp_path / "archived.h5") as f:
        attrs = f["process/tomocast"].attrs
        assert attrs["center"] == event.center and attrs["center_source"] == "estimated"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_the_same_repairs_on_cuda(start_service: Any) -> None:
    service, endpoints = start_service(
        worker={"device": "cuda"},
        model={"enabled": False},
        preprocess={"stripe_removal": "auto", "zingers": "auto"},
    )
    off = scan_of(Faults(center_offset=OFFSET, zingers=0.0002), center=None)
    slices, event = through(service, endpoints, off, "cuda")
    assert event.center == pytest.approx(COLS / 2 + OFFSET, abs=0.25)
    assert event.zinger_pixels > 0
    assert error(slices, off.truth) <= 1.15 * offline_error(off, COLS / 2 + OFFSET)
