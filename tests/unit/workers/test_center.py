"""The rotation centre from the data (Vo's method, mirror registration) against the centre the
foam phantom was projected with (analytic projections), and the TomoPy convention against the
geometry of DESIGN.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.workers.foam_scans import counts, foam_scan, minus_log, recon_error
from workers.conventions import from_tomopy_center, to_tomopy_center
from workers.phantom import FoamPhantom
from workers.preprocess.center import (
    find_center,
    find_center_360,
    find_center_pair,
    find_center_vo,
)
from workers.recon import project

# The done-criterion: within a quarter pixel.
TOLERANCE = 0.25
OFFSETS = (-20.0, -7.3, 0.0, 0.4, 13.6, 20.0)
PHOTONS = 2000.0  # a noisy scan: the longest chord lets through 13.5% of them


def test_tomopy_convention_is_the_axis_pixel_index() -> None:
    """A disk on the axis projects symmetrically about pixel index center - 0.5, in the
    analytic phantom and in our projector alike (DESIGN.md: u = s + center - 0.5)."""
    cols, theta = 64, np.array([0.0, 1.0])
    disk = FoamPhantom(rows=1, size=cols, cylinder_radius=20.0, mu=0.05, spheres=())
    for center in (32.0, 35.25, 29.5):
        for profile in (
            disk.project(theta, cols=cols, center=center)[:, 0],
            project(disk.voxelize(), theta, center=center, device="cpu")[:, 0],
        ):
            centroid = (profile * np.arange(cols)).sum(axis=1) / profile.sum(axis=1)
            np.testing.assert_allclose(centroid, to_tomopy_center(center), atol=0.02)
    assert from_tomopy_center(to_tomopy_center(12.3)) == pytest.approx(12.3)
    assert to_tomopy_center(cols / 2) == (cols - 1) / 2  # a centred axis: 31.5 on 64 columns


def _sinograms(cols: int, angles: int, offset: float, noisy: bool, seed: int) -> np.ndarray:
    scan = foam_scan(cols, angles, rows=1, offset=offset, seed=seed)
    tomo = scan.line_integrals
    if noisy:
        tomo = minus_log(counts(tomo, PHOTONS, seed), PHOTONS)
    return tomo.transpose(1, 0, 2)


@pytest.mark.parametrize(("cols", "offsets"), [(128, OFFSETS), (256, OFFSETS[::2])])
def test_vo_finds_the_centre_within_a_quarter_pixel(cols: int, offsets: tuple[float]) -> None:
    errors = []
    for seed, offset in enumerate(offsets):
        truth = cols / 2 + offset
        for noisy in (False, True):
            found = find_center_vo(_sinograms(cols, cols, offset, noisy, seed))
            errors.append(abs(found - truth))
    assert max(errors) < TOLERANCE, errors


@pytest.mark.slow
@pytest.mark.parametrize("cols", [512, 1024, 2048])
def test_vo_finds_the_centre_on_wide_detectors(cols: int) -> None:
    angles = min(cols, 900)
    for seed, offset in enumerate((-20.0, 6.7, 20.0)):
        for noisy in (False, True):
            found = find_center_vo(_sinograms(cols, angles, offset, noisy, seed))
            assert abs(found - (cols / 2 + offset)) < TOLERANCE, (cols, offset, noisy, found)


def test_vo_accepts_numpy_and_torch_and_several_rows() -> None:
    scan = foam_scan(128, 128, rows=2, offset=5.5)
    sinograms = scan.line_integrals.transpose(1, 0, 2)
    from_numpy = find_center_vo(sinograms)
    from_torch = find_center_vo(torch.from_numpy(np.ascontiguousarray(sinograms)))
    assert from_numpy == pytest.approx(from_torch, abs=1e-6)
    assert abs(from_numpy - scan.center) < TOLERANCE
    assert abs(find_center_vo(sinograms[0]) - scan.center) < TOLERANCE  # one (angles, cols)
    with pytest.raises(ValueError, match="at least 8"):
        find_center_vo(sinograms[:, :4])


def test_estimated_centre_reconstructs_as_well_as_the_true_one() -> None:
    """The done-criterion end to end: FBP about the estimate within 1.15x the error about the
    true centre, where the protocol's default (the detector's middle) is far worse."""
    cols, offset = 256, 6.3
    scan = foam_scan(cols, 384, rows=2, offset=offset, seed=4)
    tomo = minus_log(counts(scan.line_integrals, PHOTONS, 4), PHOTONS)
    estimate = find_center_vo(tomo.transpose(1, 0, 2))
    true_error = recon_error(tomo, scan.theta, scan.center, scan.phantom)
    estimated_error = recon_error(tomo, scan.theta, estimate, scan.phantom)
    default_error = recon_error(tomo, scan.theta, cols / 2, scan.phantom)
    assert estimated_error <= 1.15 * true_error, (estimated_error, true_error)
    assert default_error > 2 * true_error  # the fault the estimate repairs


@pytest.mark.parametrize("offset", [-15.3, 0.0, 8.5])
def test_360_degree_scan_by_mirror_registration(offset: float) -> None:
    cols, angles = 128, 256
    scan = foam_scan(cols, angles, rows=1, offset=offset, turn=2 * np.pi, seed=2)
    tomo = minus_log(counts(scan.line_integrals, PHOTONS, 2), PHOTONS)
    assert abs(find_center_360(tomo.transpose(1, 0, 2)) - scan.center) < TOLERANCE
    opposite = (tomo[0], tomo[angles // 2])  # (rows, cols) projections 180 degrees apart
    assert abs(find_center_pair(*opposite) - scan.center) < TOLERANCE
    assert abs(find_center_pair(opposite[0][0], opposite[1][0]) - scan.center) < TOLERANCE
    with pytest.raises(ValueError, match="even number"):
        find_center_360(tomo[:-1].transpose(1, 0, 2))


def test_find_center_picks_the_method_from_theta() -> None:
    half = foam_scan(128, 128, rows=1, offset=-3.2, seed=7)
    full = foam_scan(128, 256, rows=1, offset=9.7, turn=2 * np.pi, seed=7)
    for scan in (half, full):
        sinograms = scan.line_integrals.transpose(1, 0, 2)
        assert abs(find_center(sinograms, scan.theta) - scan.center) < TOLERANCE
    assert find_center(half.line_integrals.transpose(1, 0, 2)) == pytest.approx(
        find_center_vo(half.line_integrals.transpose(1, 0, 2))
    )
    with pytest.raises(ValueError, match=r"covers 90\.0 degrees"):
        find_center(half.line_integrals.transpose(1, 0, 2), half.theta / 2)
    with pytest.raises(ValueError, match="evenly spaced"):
        find_center(half.line_integrals.transpose(1, 0, 2), half.theta**2)


@pytest.mark.gpu
def test_cuda_gives_the_cpus_results() -> None:
    """The same code on CUDA: every step against its CPU result."""
    from workers.preprocess import (
        paganin_filter,
        remove_stripes,
        remove_zingers,
        stitch_half_acquisition,
    )

    scan = foam_scan(128, 128, rows=4, offset=2.5)
    sinograms = torch.from_numpy(np.ascontiguousarray(scan.line_integrals.transpose(1, 0, 2)))
    cuda = sinograms.cuda()
    assert find_center_vo(cuda) == pytest.approx(find_center_vo(sinograms), abs=0.02)
    full = torch.cat([sinograms, sinograms.flip(-1)], dim=1)  # a 360-degree scan, mirrored
    assert find_center_360(full.cuda()) == pytest.approx(find_center_360(full), abs=0.02)
    stitched_cpu, _ = stitch_half_acquisition(full, 100.0)
    stitched_gpu, _ = stitch_half_acquisition(full.cuda(), 100.0)
    np.testing.assert_allclose(stitched_gpu.cpu().numpy(), stitched_cpu.numpy(), atol=1e-5)
    for method in ("auto", "sorting", "vo-all", "fourier-wavelet"):
        np.testing.assert_allclose(
            remove_stripes(cuda, method).cpu().numpy(),
            remove_stripes(sinograms, method).numpy(),
            atol=1e-4,
        )
    transmission = torch.exp(-torch.from_numpy(scan.line_integrals.copy()))
    transmission[3, 1, 40] += 2.0
    cleaned_cpu, count_cpu = remove_zingers(transmission)
    cleaned_gpu, count_gpu = remove_zingers(transmission.cuda())
    assert count_gpu == count_cpu >= 1
    np.testing.assert_allclose(cleaned_gpu.cpu().numpy(), cleaned_cpu.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        paganin_filter(transmission.cuda(), 20.0, 0.1, 1e-6, 300.0).cpu().numpy(),
        paganin_filter(transmission, 20.0, 0.1, 1e-6, 300.0).numpy(),
        atol=1e-5,
    )
