"""`tomocast simulate`'s detector faults: each one present in the data as a detector makes it,
and each found again by the repair in workers/preprocess."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from service.sim.simulate import Faults, simulate_scan, write_truth
from workers.phantoms import make_phantom
from workers.preprocess import (
    find_center_vo,
    find_half_acquisition_center,
    normalize,
    remove_zingers,
)
from workers.recon import recon


def line_integrals(scan_faults: Faults | None, **kwargs: object) -> tuple[object, np.ndarray]:
    import torch

    scan = simulate_scan(
        "s", rows=2, cols=96, n_angles=120, photons=2e4, faults=scan_faults, **kwargs
    )  # type: ignore[arg-type]
    dark = torch.from_numpy(scan.darks.astype(np.float32).mean(axis=0))
    flat = torch.from_numpy(scan.flats.astype(np.float32).mean(axis=0))
    values, _ = normalize(torch.from_numpy(scan.projections.astype(np.float32)), dark, flat)
    return scan, values.numpy()


def test_no_fault_leaves_the_scan_bit_for_bit_as_before() -> None:
    plain = simulate_scan("s", rows=2, cols=64, n_angles=30, seed=4)
    none = simulate_scan("s", rows=2, cols=64, n_angles=30, seed=4, faults=Faults())
    for name in ("darks", "flats", "projections", "truth"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(none, name))
    assert none.start.center is None and none.start.theta is None


def test_center_offset_moves_the_axis_and_declares_no_centre() -> None:
    scan, values = line_integrals(Faults(center_offset=6.5))
    assert scan.start.center is None  # type: ignore[attr-defined]
    sinograms = values.transpose(1, 0, 2)
    found = find_center_vo(sinograms)
    assert found == pytest.approx(96 / 2 + 6.5, abs=0.25)
    with pytest.raises(ValueError, match="declares no centre"):
        simulate_scan("s", rows=1, cols=32, n_angles=8, center=16.0, faults=Faults(center_offset=1))


def test_rings_are_a_per_pixel_gain_the_flats_do_not_see() -> None:
    clean_scan, clean = line_integrals(None, seed=1)
    ringed_scan, ringed = line_integrals(Faults(rings=0.02), seed=1)
    np.testing.assert_array_equal(clean_scan.flats, ringed_scan.flats)  # type: ignore[attr-defined]
    # -log(gain) ~ -(gain - 1): constant over the angles in every pixel, spread ~ 0.02
    stripes = (ringed - clean).mean(axis=0)
    assert 0.015 < float(stripes.std()) < 0.025
    # the same pattern in the first and the second half of the angles: a stripe, not noise
    first, second = (ringed - clean)[:60].mean(axis=0), (ringed - clean)[60:].mean(axis=0)
    assert float(np.corrcoef(first.ravel(), second.ravel())[0, 1]) > 0.9


def test_zingers_saturate_the_asked_fraction_and_are_found_again() -> None:
    scan = simulate_scan("s", rows=8, cols=64, n_angles=60, faults=Faults(zingers=0.002), seed=2)
    hit = scan.projections == np.iinfo(np.uint16).max
    assert hit.sum() == pytest.approx(0.002 * scan.projections.size, rel=0.3)
    _, found = remove_zingers(scan.projections.astype(np.float32))
    assert found >= hit.sum()
    assert found <= hit.sum() + 0.001 * scan.projections.size


def test_half_acquisition_is_a_full_turn_about_an_axis_near_the_edge() -> None:
    scan, values = line_integrals(Faults(half_acquisition=True))
    start = scan.start  # type: ignore[attr-defined]
    theta = start.theta_array()
    assert start.center is None and theta[-1] > 1.9 * np.pi
    overlap = 96 // 8
    assert scan.truth.shape[1:] == (2 * (96 - overlap),) * 2  # type: ignore[attr-defined]
    found = find_half_acquisition_center(values.transpose(1, 0, 2))
    assert found == pytest.approx(96 - overlap, abs=0.5)


@pytest.mark.parametrize("family", ["granular", "fibres"])
def test_other_families_simulate_as_the_foam_does(family: str, tmp_path: Path) -> None:
    scan, values = line_integrals(None, family=family, attenuation=0.5)
    np.testing.assert_array_equal(
        scan.truth,  # type: ignore[attr-defined]
        make_phantom(family, 2, 96, seed=0, attenuation=0.5).voxelize(),
    )
    slices = recon(values, scan.theta)  # type: ignore[attr-defined]
    error = np.linalg.norm(slices - scan.truth) / np.linalg.norm(scan.truth)  # type: ignore[attr-defined]
    assert error < 0.5
    write_truth(tmp_path / "truth.h5", scan)  # type: ignore[arg-type]
    with h5py.File(tmp_path / "truth.h5") as f:
        assert f["truth"].attrs["family"] == family and "spheres" not in f["truth"]
    with pytest.raises(ValueError, match="choose one of foam"):
        simulate_scan("s", rows=1, cols=16, n_angles=4, family="sponge")


def test_the_cli_offers_every_phantom_family() -> None:
    from service.cli import PHANTOM_FAMILIES, build_parser
    from workers.phantoms import FAMILIES

    assert tuple(FAMILIES) == PHANTOM_FAMILIES
    args = build_parser().parse_args(["demo", "--phantom", "granular", "--attenuation", "3"])
    assert (args.phantom, args.attenuation) == ("granular", 3.0)
