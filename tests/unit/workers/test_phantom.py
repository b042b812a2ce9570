"""The foam phantom: analytic projections against independent references."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from skimage.transform import radon

from workers.phantom import WALL, FoamPhantom, Sphere


def _pixel_averaged_chord(s: np.ndarray, radius: float, samples: int = 4001) -> np.ndarray:
    """Reference: 2*sqrt(R^2 - s^2) averaged over [s - 0.5, s + 0.5] by brute-force sampling."""
    offsets = (np.arange(samples) + 0.5) / samples - 0.5
    t = s[:, None] + offsets[None, :]
    return (2 * np.sqrt(np.clip(radius**2 - t**2, 0, None))).mean(axis=1)


def test_cylinder_projection_is_the_disk_chord() -> None:
    radius, mu, cols = 25.0, 0.04, 64
    phantom = FoamPhantom(rows=3, size=cols, cylinder_radius=radius, mu=mu, spheres=())
    theta = np.linspace(0, np.pi, 7, endpoint=False)
    projection = phantom.project(theta)
    s = np.arange(cols) - (cols - 1) / 2  # default center = cols/2: axis at (cols-1)/2
    expected = mu * _pixel_averaged_chord(s, radius)
    np.testing.assert_allclose(
        projection, np.broadcast_to(expected, projection.shape), rtol=1e-4, atol=1e-6
    )
    # away from the rim, the pixel average is the point value 2*mu*sqrt(R^2 - s^2)
    middle = np.abs(s) < radius / 2
    np.testing.assert_allclose(
        projection[0, 0, middle], 2 * mu * np.sqrt(radius**2 - s[middle] ** 2), rtol=2e-4
    )


def test_center_shifts_the_projection() -> None:
    phantom = FoamPhantom.random(4, 48, seed=2)
    theta = np.array([0.0, 1.0, 2.5])
    centred = phantom.project(theta, cols=64)
    shifted = phantom.project(theta, cols=64, center=32 + 5)
    # u = s + center - 0.5: moving the axis 5 pixels right moves the picture with it
    np.testing.assert_allclose(shifted[..., 5:], centred[..., :-5], atol=1e-5)


def test_default_mu_gives_line_integrals_of_about_two() -> None:
    phantom = FoamPhantom.random(8, 128, seed=0)
    assert phantom.cylinder_radius == pytest.approx(0.42 * 128)
    assert phantom.mu == pytest.approx(1 / phantom.cylinder_radius)
    peak = phantom.project(np.array([0.0, 0.7])).max()
    assert 1.5 < peak <= 2.0 + 1e-6


@pytest.mark.parametrize(("supersample", "rtol"), [(3, 2e-3), (9, 3e-4)])
def test_projection_conserves_mass(supersample: int, rtol: float) -> None:
    phantom = FoamPhantom.random(8, 64, seed=1)
    assert phantom.spheres
    volume = phantom.voxelize(supersample)
    projection = phantom.project(np.linspace(0, np.pi, 9, endpoint=False), supersample=supersample)
    # every angle sees the whole slice: sum over the detector row == slice sum. They differ
    # only by the voxels' in-plane supersampling of partial-volume edges (the projection
    # integrates exactly across a pixel's width), so the gap shrinks with `supersample`.
    np.testing.assert_allclose(
        projection.sum(axis=2),
        np.broadcast_to(volume.sum(axis=(1, 2)), projection.shape[:2]),
        rtol=rtol,
    )


def test_spheres_do_not_overlap_and_stay_inside() -> None:
    phantom = FoamPhantom.random(32, 128, seed=5)
    assert len(phantom.spheres) > 20
    for a, b in itertools.combinations(phantom.spheres, 2):
        gap = np.linalg.norm([a.x - b.x, a.y - b.y, a.z - b.z])
        assert gap >= a.radius + b.radius + WALL - 1e-9
    for s in phantom.spheres:
        assert np.hypot(s.x, s.y) + s.radius <= phantom.cylinder_radius - WALL + 1e-9
        assert -0.5 <= s.z <= 31.5


def test_seeds_are_reproducible() -> None:
    a = FoamPhantom.random(16, 64, seed=7)
    assert a == FoamPhantom.random(16, 64, seed=7)
    assert a != FoamPhantom.random(16, 64, seed=8)
    np.testing.assert_array_equal(a.voxelize(), FoamPhantom.random(16, 64, seed=7).voxelize())


def test_explicit_sphere_count_is_honoured_or_refused() -> None:
    assert len(FoamPhantom.random(8, 64, n_spheres=5, seed=0).spheres) == 5
    with pytest.raises(ValueError, match="could place only"):
        FoamPhantom.random(4, 32, n_spheres=500, radius_range=(5, 6))


def test_random_is_fast() -> None:
    started = time.perf_counter()
    FoamPhantom.random(64, 256, seed=0)
    assert time.perf_counter() - started < 1.0


def test_voxelize_partial_volume() -> None:
    sphere = Sphere(x=0.0, y=0.0, z=4.0, radius=3.0)
    phantom = FoamPhantom(rows=9, size=32, cylinder_radius=12.0, mu=1.0, spheres=(sphere,))
    volume = phantom.voxelize(supersample=5)
    assert volume.dtype == np.float32 and volume.shape == (9, 32, 32)
    assert volume.max() == pytest.approx(1.0) and volume.min() == pytest.approx(0.0)
    solid = np.pi * 12.0**2 * 9 - 4 / 3 * np.pi * 3.0**3
    assert volume.sum() == pytest.approx(solid, rel=2e-3)
    # the pore's centre (x=0, y=0 sits between pixels 15 and 16) is empty
    assert volume[4, 15:17, 15:17].max() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("row", [0, 2])
def test_projection_matches_a_numeric_projection_of_the_voxels(row: int) -> None:
    size = 65  # odd: skimage's rotation centre (size // 2) is then ours ((size - 1) / 2)
    phantom = FoamPhantom.random(4, size, seed=3)
    volume = phantom.voxelize()[row].astype(np.float64)
    degrees = np.array([0.0, 30.0, 60.0, 90.0, 135.0])
    analytic = phantom.project(np.radians(degrees))[:, row]
    peak = analytic.max()
    # theta = 0: rays run down the columns (u = x); theta = pi/2: along the rows (u = y, up)
    np.testing.assert_allclose(analytic[0], volume.sum(axis=0), atol=0.015 * peak)
    np.testing.assert_allclose(analytic[3], volume.sum(axis=1)[::-1], atol=0.015 * peak)
    # skimage rotates the image by theta and sums the rows: detector bin k = our column k
    reference = radon(volume, theta=degrees, circle=True).T
    for a in range(len(degrees)):
        error = np.linalg.norm(reference[a] - analytic[a]) / np.linalg.norm(analytic[a])
        assert error < 0.02, f"theta={degrees[a]} deg: relative L2 error {error:.4f}"


def test_detector_wider_than_the_slice() -> None:
    phantom = FoamPhantom.random(2, 32, seed=0)
    narrow = phantom.project(np.array([0.3]))
    wide = phantom.project(np.array([0.3]), cols=48)
    np.testing.assert_allclose(wide[..., 8:40], narrow, atol=1e-5)
    assert np.abs(wide[..., :4]).max() == 0 and np.abs(wide[..., -4:]).max() == 0
