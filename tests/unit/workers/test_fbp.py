"""FBP against scikit-image's iradon and analytic disk phantoms, and the recon() API.

Conventions. Ours: pixel (row, col) at x = col - (N-1)/2, y = (N-1)/2 - row; detector column
u = x cos + y sin + center - 0.5. scikit-image's iradon puts pixel (row, col) at
x = col - N//2, y = N//2 - row and reads detector index x cos + y sin + N//2 at the same angle
in degrees. So for odd N, skimage == ours with theta = radians(degrees) and center = N/2; for any
N, skimage's own geometry is ours with its axis at pixel N//2 and center = N//2 + 0.5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from workers.backproject import BackProjectionGeometry, backproject_geometry
from workers.fbp import FBP, default_work_bytes
from workers.filters import FILTER_NAMES, angle_weights, fourier_filter
from workers.gridding import GriddingFBP
from workers.protocols import Reconstructor
from workers.recon import default_device, recon

# (x0, y0, radius, attenuation per pixel): off-centre, overlapping, of different contrasts
DISKS = (
    (10.3, 20.7, 15.2, 1.0),
    (-25.1, -5.4, 8.6, 0.5),
    (0.0, 0.0, 40.0, 0.2),
    (20.0, -24.0, 5.0, -0.3),
)


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


def disk_image(
    n: int,
    origin: float | None = None,
    disks: tuple[tuple[float, float, float, float], ...] = DISKS,
) -> np.ndarray:
    """The disks rasterised with 8 x 8 samples per pixel, axis at pixel (origin, origin)."""
    origin = (n - 1) / 2 if origin is None else origin
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    x = (np.arange(n) - origin)[None, :, None, None] + sub[None, None, None, :]
    y = (origin - np.arange(n))[:, None, None, None] - sub[None, None, :, None]
    out = np.zeros((n, n))
    for x0, y0, r, mu in disks:
        out += mu * ((x - x0) ** 2 + (y - y0) ** 2 <= r * r).mean(axis=(2, 3))
    return out


def inside(n: int, radius: float, origin: float | None = None) -> np.ndarray:
    origin = (n - 1) / 2 if origin is None else origin
    c = np.arange(n) - origin
    return c[:, None] ** 2 + c[None, :] ** 2 <= radius**2


def rel_error(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    return float(np.linalg.norm((image - truth)[mask]) / np.linalg.norm(truth[mask]))


def ours(sinogram: np.ndarray, theta: np.ndarray, center: float, **kwargs: object) -> np.ndarray:
    fbp = FBP(**kwargs)  # type: ignore[arg-type]
    batch = torch.from_numpy(np.ascontiguousarray(sinogram, dtype=np.float32))[None]
    return fbp.reconstruct(batch, torch.from_numpy(theta), center)[0].numpy()


def skimage_error(n: int, theta: np.ndarray, filter_name: str, radius: float) -> float:
    """iradon's error on the same disks, with data made in its own geometry (see module doc)."""
    origin = n // 2
    sinogram = disk_sinogram(theta, n, origin + 0.5)
    image = iradon(sinogram.T, np.rad2deg(theta), circle=True, filter_name=filter_name)
    mask = inside(n, radius, origin)
    return rel_error(image, disk_image(n, origin), mask)


@pytest.fixture(scope="module")
def shepp_logan() -> np.ndarray:
    n = 129
    image = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)
    image[~inside(n, (n - 1) / 2)] = 0.0  # radon(circle=True) wants nothing outside the circle
    return image


@pytest.mark.parametrize(
    ("filter_name", "atol"),
    [
        ("ramp", 1e-5),
        ("shepp-logan", 1e-5),
        ("cosine", 1e-5),
        # our hamming/hann windows are the symmetric ones; skimage's are one sample off (O(1/P))
        ("hamming", 2e-3),
        ("hann", 2e-3),
    ],
)
def test_matches_skimage_iradon_pixel_for_pixel(
    shepp_logan: np.ndarray, filter_name: str, atol: float
) -> None:
    n = shepp_logan.shape[0]
    degrees = np.arange(180) * 1.0
    sinogram = radon(shepp_logan, degrees, circle=True)  # (cols, angles)
    reference = iradon(sinogram, degrees, circle=True, filter_name=filter_name)
    image = ours(sinogram.T, np.deg2rad(degrees), n / 2, filter_name=filter_name)
    # skimage zeroes outside its circle and interpolates to 0 at the detector edge differently
    mask = inside(n, (n - 1) / 2 - 1)
    np.testing.assert_allclose(image[mask], reference[mask], rtol=0, atol=atol)


def centroid_xy(image: np.ndarray) -> tuple[float, float]:
    """(x, y) of the centroid of the pixels above half the maximum, in our geometry."""
    n = image.shape[0]
    rows, cols = np.nonzero(image > 0.5 * image.max())
    return float(cols.mean() - (n - 1) / 2), float((n - 1) / 2 - rows.mean())


def test_orientation_matches_skimage_and_the_geometry() -> None:
    """A single disk at (x, y) = (-30, 20) (left, top) comes back where both say it is."""
    n = 101
    disk = ((-30.0, 20.0, 4.0, 1.0),)
    degrees = np.arange(0, 180, 2.0)
    theta = np.deg2rad(degrees)
    from_skimage = ours(radon(disk_image(n, disks=disk), degrees, circle=True).T, theta, n / 2)
    from_analytic = ours(disk_sinogram(theta, n, n / 2, disk), theta, n / 2)
    np.testing.assert_allclose(centroid_xy(from_skimage), (-30.0, 20.0), atol=0.1)
    np.testing.assert_allclose(centroid_xy(from_analytic), (-30.0, 20.0), atol=0.1)


@pytest.mark.parametrize(("n", "angles"), [(128, 180), (129, 180), (96, 256), (129, 30)])
@pytest.mark.parametrize("filter_name", ["ramp", "shepp-logan"])
def test_analytic_disks_no_worse_than_skimage(n: int, angles: int, filter_name: str) -> None:
    theta = np.arange(angles) * np.pi / angles  # 30 angles: sparse view
    radius = 0.45 * n
    image = ours(disk_sinogram(theta, n, n / 2), theta, n / 2, filter_name=filter_name)
    error = rel_error(image, disk_image(n), inside(n, radius))
    reference = skimage_error(n, theta, filter_name, radius)
    assert error <= 1.1 * reference, (error, reference)
    assert error < (0.2 if angles >= 180 else 0.45)


def test_non_uniform_angles_are_weighted_by_their_spacing() -> None:
    """Randomly jittered angles: per-angle quadrature weights beat skimage's uniform pi/A."""
    n = 129
    rng = np.random.default_rng(3)
    theta = np.sort(rng.uniform(0, np.pi, 120))
    image = ours(disk_sinogram(theta, n, n / 2), theta, n / 2)
    error = rel_error(image, disk_image(n), inside(n, 0.45 * n))
    reference = skimage_error(n, theta, "ramp", 0.45 * n)
    assert error <= 1.1 * reference, (error, reference)
    assert error < 0.25


def test_full_rotation_equals_half_rotation() -> None:
    """Over [0, 2 pi) each line is seen twice (mirrored); weights pi/A give the same slice."""
    n, angles = 64, 90
    theta = np.arange(angles) * np.pi / angles
    half = disk_sinogram(theta, n, n / 2, DISKS[:2])
    full_theta = np.concatenate((theta, theta + np.pi))
    full = np.concatenate((half, half[:, ::-1]))  # p(theta + pi, u) = p(theta, cols - 1 - u)
    np.testing.assert_allclose(angle_weights(full_theta), np.pi / (2 * angles), rtol=1e-12)
    np.testing.assert_allclose(
        ours(full, full_theta, n / 2), ours(half, theta, n / 2), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("n", [128, 129])
def test_off_centre_axis_puts_the_disks_where_the_geometry_says(n: int) -> None:
    theta = np.arange(180) * np.pi / 180
    center = n / 2 + 5.3
    sinogram = disk_sinogram(theta, n, center)  # the axis sits 5.3 pixels right of the middle
    truth, mask = disk_image(n), inside(n, 0.4 * n)
    aligned = rel_error(ours(sinogram, theta, center), truth, mask)
    centred = rel_error(ours(disk_sinogram(theta, n, n / 2), theta, n / 2), truth, mask)
    wrong = rel_error(ours(sinogram, theta, n / 2), truth, mask)
    assert aligned <= 1.05 * centred
    assert wrong > 3 * aligned
    # the centroid of one disk lands at its (x, y), for a fractional centre too
    disk = ((12.0, -7.0, 6.0, 1.0),)
    x, y = centroid_xy(ours(disk_sinogram(theta, n, center, disk), theta, center))
    np.testing.assert_allclose([x, y], [12.0, -7.0], atol=0.1)


@pytest.mark.parametrize(
    ("n", "angles", "span", "center"),
    [
        (64, 180, np.pi, 32.0),
        (65, 180, np.pi, 30.3),
        (64, 360, 2 * np.pi, 35.7),
        (33, 100, np.pi, 16.5),
    ],
)
def test_symmetry_folding_changes_nothing(n: int, angles: int, span: float, center: float) -> None:
    """Regular angles are folded onto [0, pi/4] (one index computation per 4 or 8 angles); the
    result must be the plain per-angle back-projection's."""
    theta = np.arange(angles) * span / angles
    sinograms = torch.from_numpy(np.random.default_rng(1).random((2, angles, n), dtype=np.float32))
    cpu = torch.device("cpu")
    folded = BackProjectionGeometry.build(theta, center, n, cpu)
    plain = BackProjectionGeometry.build(theta, center, n, cpu, fold=False)
    assert folded.angles <= angles // 3 and plain.angles == angles
    expected = backproject_geometry(sinograms, plain)
    torch.testing.assert_close(
        backproject_geometry(sinograms, folded),
        expected,
        rtol=0,
        atol=2e-6 * float(expected.abs().max()),
    )
    irregular = np.random.default_rng(2).uniform(0, np.pi, angles)
    assert BackProjectionGeometry.build(irregular, center, n, cpu).slot is None


def test_angle_weights() -> None:
    uniform = np.arange(7) * np.pi / 7
    np.testing.assert_allclose(angle_weights(uniform), np.pi / 7, rtol=1e-12)
    np.testing.assert_allclose(angle_weights(uniform[::-1] - 3 * np.pi), np.pi / 7, rtol=1e-12)
    closed = np.linspace(0, np.pi, 5)  # TomoPy's angles(): 0 and pi are one view, shared
    np.testing.assert_allclose(angle_weights(closed), [np.pi / 8, *[np.pi / 4] * 3, np.pi / 8])
    wedge = np.deg2rad(np.arange(0, 120.0))  # a 60 degree missing wedge counts as one step
    np.testing.assert_allclose(angle_weights(wedge), np.deg2rad(1.0), rtol=1e-9)
    golden = np.mod(np.arange(50) * np.pi * (np.sqrt(5) - 1) / 2, np.pi)
    assert angle_weights(golden).sum() == pytest.approx(np.pi)


def test_fourier_filters() -> None:
    ramp = fourier_filter("ramp", 256)
    assert ramp[0] == pytest.approx(
        0.25 - 2 * sum(1 / (np.pi * k) ** 2 for k in range(1, 128, 2)), abs=1e-12
    )  # the sampled kernel's DC, not 0
    np.testing.assert_allclose(ramp[1:], np.fft.rfftfreq(256)[1:], rtol=0.05, atol=2e-3)
    for name in FILTER_NAMES:
        response = fourier_filter(name, 256)
        assert response.shape == (129,) and response[1] == pytest.approx(ramp[1], rel=1e-3)
    assert np.array_equal(fourier_filter("ramlak", 64), fourier_filter("ramp", 64))
    with pytest.raises(ValueError, match="shepp-logan"):
        FBP(filter_name="butterfly")


def test_reconstructor_contract_batch_chunking_and_cache() -> None:
    fbp = FBP("cpu", circle_mask=True, max_work_bytes=1 << 16)  # forces row and angle chunks
    assert isinstance(fbp, Reconstructor) and fbp.device == torch.device("cpu")
    n, angles = 65, 100
    theta = torch.from_numpy(np.arange(angles) * np.pi / angles)
    rng = np.random.default_rng(0)
    sinograms = torch.from_numpy(rng.random((3, angles, n), dtype=np.float32))
    chunked = fbp.reconstruct(sinograms, theta, 31.7)
    whole = FBP("cpu", circle_mask=True).reconstruct(sinograms, theta, 31.7)
    assert chunked.shape == (3, n, n) and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    single = FBP(circle_mask=True).reconstruct(sinograms[1:2], theta, 31.7)
    torch.testing.assert_close(single[0], whole[1], rtol=0, atol=1e-5)
    assert bool((whole[:, ~torch.from_numpy(inside(n, n / 2))] == 0).all())
    # the geometry is built once per (theta, center, cols) and reused
    first = fbp._geometry(theta, 31.7, n)
    assert fbp._geometry(theta.clone(), 31.7, n) is first
    assert fbp._geometry(theta, 31.0, n) is not first
    with pytest.raises(ValueError, match="angles"):
        fbp.reconstruct(sinograms, theta[:-1], 31.7)


def test_work_budget_defaults_by_device() -> None:
    # the CPU's is what it always was, whatever memory the machine has
    assert default_work_bytes("cpu") == default_work_bytes("cpu", 1 << 40) == 256 << 20
    assert FBP("cpu").max_work_bytes == GriddingFBP("cpu").max_work_bytes == 256 << 20
    # CUDA: 1/8 of the device, never below the CPU's, capped at 8 GiB
    assert default_work_bytes("cuda", 16 << 30) == 2 << 30
    assert default_work_bytes("cuda", 80 * 10**9) == 8 << 30  # an H100: capped
    assert default_work_bytes("cuda", 141 * 10**9) == 8 << 30
    assert default_work_bytes("cuda", 1 << 30) == 256 << 20
    # a given budget wins, and constructing one asks nothing of the device
    assert FBP("cuda", max_work_bytes=1 << 20).max_work_bytes == 1 << 20
    assert GriddingFBP("cuda", max_work_bytes=1 << 20).max_work_bytes == 1 << 20
    with pytest.raises(ValueError, match="64 KiB"):
        FBP(max_work_bytes=1 << 10)


def test_recon_api_matches_the_reconstructor() -> None:
    angles, rows, cols = 60, 3, 48
    theta = np.arange(angles) * np.pi / angles
    sinogram = disk_sinogram(theta, cols, cols / 2, ((3.0, -2.0, 10.0, 0.1),))
    tomo = np.stack([sinogram * (k + 1) for k in range(rows)], axis=1)  # (angles, rows, cols)
    slices = recon(tomo, theta, device="cpu", method="direct")
    assert slices.shape == (rows, cols, cols) and slices.dtype == np.float32
    expected = ours(sinogram, theta, cols / 2)
    for k in range(rows):
        np.testing.assert_allclose(slices[k], (k + 1) * expected, rtol=1e-5, atol=1e-5)
    masked = recon(tomo, theta, center=cols / 2, filter_name="ramp", circle_mask=True)
    assert masked[0, 0, 0] == 0.0
    assert default_device().type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="fbp, gridrec"):
        recon(tomo, theta, algorithm="sirt")
    with pytest.raises(ValueError, match="angles"):
        recon(tomo, theta[:-1])


def test_gridrec_needs_tomopy() -> None:
    try:
        import tomopy  # noqa: F401
    except ImportError:
        tomo = np.zeros((8, 1, 16), dtype=np.float32)
        with pytest.raises(RuntimeError, match="TomoPy"):
            recon(tomo, np.linspace(0, math.pi, 8, endpoint=False), algorithm="gridrec")
    else:
        pytest.skip("TomoPy is installed: gridrec is TomoPy's own")
