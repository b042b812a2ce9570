"""The forward projector against analytic line integrals, scikit-image's radon and the
back-projector (adjointness), and the numpy `project` API.

Geometry: pixel (row, col) at x = col - (N-1)/2, y = (N-1)/2 - row; detector column u sees the
line x cos + y sin = u - (center - 0.5). For odd N, skimage's radon(image, degrees) is the same
geometry with theta = radians(degrees) and center = N/2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.transform import radon

from workers.backproject import backproject_tensor
from workers.project import project_tensor
from workers.recon import project

DISKS = ((10.3, 20.7, 15.2, 1.0), (-25.1, -5.4, 8.6, 0.5), (0.0, 0.0, 40.0, 0.2))


def disk_sinogram(
    theta: np.ndarray,
    cols: int,
    center: float,
    disks: tuple[tuple[float, float, float, float], ...] = DISKS,
) -> np.ndarray:
    """Exact line integrals (angles, cols): chord 2 sqrt(r^2 - s^2) at each detector column."""
    s = np.arange(cols) - (center - 0.5)
    out = np.zeros((len(theta), cols))
    for x0, y0, r, mu in disks:
        offset = s[None, :] - (x0 * np.cos(theta) + y0 * np.sin(theta))[:, None]
        out += 2 * mu * np.sqrt(np.clip(r * r - offset**2, 0, None))
    return out


def disk_image(n: int, disks: tuple[tuple[float, float, float, float], ...] = DISKS) -> np.ndarray:
    """The disks rasterised with 8 x 8 samples per pixel."""
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    x = (np.arange(n) - (n - 1) / 2)[None, :, None, None] + sub[None, None, None, :]
    y = ((n - 1) / 2 - np.arange(n))[:, None, None, None] - sub[None, None, :, None]
    out = np.zeros((n, n))
    for x0, y0, r, mu in disks:
        out += mu * ((x - x0) ** 2 + (y - y0) ** 2 <= r * r).mean(axis=(2, 3))
    return out


def forward(image: np.ndarray, theta: np.ndarray, center: float, cols: int) -> np.ndarray:
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return project_tensor(volume, torch.from_numpy(theta), center, cols)[0].numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    ("n", "cols", "center", "angles"),
    [
        (128, 128, 64.0, 180),  # even
        (129, 129, 64.5, 180),  # odd
        (128, 128, 70.3, 45),  # off-centre axis, sparse view
        (96, 128, 61.8, 90),  # detector wider than the slice
    ],
)
def test_matches_analytic_line_integrals(n: int, cols: int, center: float, angles: int) -> None:
    theta = np.arange(angles) * np.pi / angles + 0.01  # avoid only-axis-aligned special cases
    sinogram = forward(disk_image(n), theta, center, cols)
    expected = disk_sinogram(theta, cols, center)
    # the rasterised disks' stair-step edges cost about 1%; a half-pixel shift would cost 10%
    assert rel(sinogram, expected) < 0.02
    np.testing.assert_allclose(sinogram.sum(axis=1), expected.sum(axis=1), rtol=2e-3)


def test_random_angles_and_a_full_turn() -> None:
    n = 96
    theta = np.random.default_rng(1).uniform(-np.pi, 2 * np.pi, 50)
    sinogram = forward(disk_image(n), theta, n / 2 - 2.5, n)
    assert rel(sinogram, disk_sinogram(theta, n, n / 2 - 2.5)) < 0.02


def test_matches_skimage_radon_and_its_orientation() -> None:
    n = 101
    disks = ((-30.0, 20.0, 6.0, 1.0), (15.0, 5.0, 12.0, 0.3))  # top left, right of centre
    image = disk_image(n, disks)
    degrees = np.arange(0, 180, 3.0)
    reference = radon(image, degrees, circle=True).T
    sinogram = forward(image, np.deg2rad(degrees), n / 2, n)
    assert rel(sinogram, reference) < 0.01
    # both interpolate the same stair-stepped disks; neither is much closer to the exact chords
    exact = disk_sinogram(np.deg2rad(degrees), n, n / 2, disks)
    assert rel(sinogram, exact) <= 1.1 * rel(reference, exact)


def test_is_the_adjoint_of_the_back_projector() -> None:
    """<P x, y> = <x, P^T y> to discretisation error, for smooth x and y, off-centre axis."""
    n, cols, angles, center = 64, 80, 37, 41.3
    rng = np.random.default_rng(0)
    x = gaussian_filter(rng.standard_normal((n, n)), 3)
    y = gaussian_filter(rng.standard_normal((angles, cols)), (0, 3))
    # the back-projector works on a cols x cols grid; embed x in its centre
    big = np.zeros((cols, cols))
    pad = (cols - n) // 2
    big[pad : pad + n, pad : pad + n] = x
    theta = rng.uniform(0, np.pi, angles)
    lhs = float((forward(big, theta, center, cols) * y).sum())
    back = backproject_tensor(
        torch.from_numpy(y.astype(np.float32))[None], torch.from_numpy(theta), center
    )[0].numpy()
    rhs = float((big * back).sum())
    assert lhs == pytest.approx(rhs, rel=5e-3)


def test_batch_and_numpy_api() -> None:
    rows, n, angles = 3, 48, 30
    theta = np.arange(angles) * np.pi / angles
    volume = np.stack([disk_image(n, ((5.0, 3.0, 10.0, 0.1 * (k + 1)),)) for k in range(rows)])
    projections = project(volume, theta, device="cpu")
    assert projections.shape == (angles, rows, n) and projections.dtype == np.float32
    for k in range(rows):
        np.testing.assert_allclose(
            projections[:, k], forward(volume[k], theta, n / 2, n), rtol=1e-6, atol=1e-6
        )
    wider = project(volume, theta, center=40.0, cols=80)
    assert wider.shape == (angles, rows, 80)
    np.testing.assert_allclose(wider[:, 0], forward(volume[0], theta, 40.0, 80), atol=1e-6)
    chunked = project_tensor(
        torch.from_numpy(volume.astype(np.float32)),
        torch.from_numpy(theta),
        n / 2,
        n,
        max_work_bytes=1 << 14,
    )
    np.testing.assert_allclose(chunked.numpy().transpose(1, 0, 2), projections, atol=1e-5)
    with pytest.raises(ValueError, match="N, N"):
        project(volume[:, :, :-1], theta)
