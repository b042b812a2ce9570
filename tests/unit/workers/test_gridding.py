"""Gridding FBP: against the exact sum it approximates, analytic disks, scikit-image, and the
direct method (same geometry, orientation and scale), plus the method choice in workers.recon.

Phantom helpers and the scikit-image geometry note are those of tests/unit/workers/test_fbp.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import workers.spreading as spreading
from tests.unit.workers.test_fbp import (
    DISKS,
    centroid_xy,
    disk_image,
    disk_sinogram,
    inside,
    ours,
    rel_error,
    skimage_error,
)
from workers.fbp import FBP
from workers.gridding import GriddingFBP
from workers.protocols import Reconstructor
from workers.recon import AutoFBP, make_reconstructor, recon
from workers.spreading import kaiser_bessel, kaiser_bessel_transform, kernel_beta


def grid(sinogram: np.ndarray, theta: np.ndarray, center: float, **kwargs: object) -> np.ndarray:
    fbp = GriddingFBP(**kwargs)  # type: ignore[arg-type]
    batch = torch.from_numpy(np.ascontiguousarray(sinogram, dtype=np.float32))[None]
    return fbp.reconstruct(batch, torch.from_numpy(theta), center)[0].numpy()


def exact_sum(
    sinograms: np.ndarray, theta: np.ndarray, center: float, period: int, most: int
) -> np.ndarray:
    """What gridding approximates, summed directly in float64: the direct method's filtered and
    weighted projections, as a Fourier series of `period` pixels with frequencies |j| <= most,
    tapered by sinc^2, evaluated at every pixel's u."""
    n = sinograms.shape[-1]
    fbp = FBP()
    geometry = fbp._geometry(torch.from_numpy(theta), center, n)
    filtered = fbp.filter_sinograms(torch.from_numpy(sinograms), geometry).double().numpy()
    j = np.arange(-most, most + 1)
    spectrum = np.fft.fft(filtered, n=period, axis=-1)[..., j % period]
    spectrum *= np.sinc(j / period) ** 2 / period
    x = np.arange(n) - (n - 1) / 2
    u = (
        x[None, None, :] * np.cos(theta)[:, None, None]
        - x[None, :, None] * np.sin(theta)[:, None, None]
        + center
        - 0.5
    )  # (A, row, col)
    waves = np.exp(2j * np.pi * j * u[..., None] / period)
    return np.einsum("baj,arcj->brc", spectrum, waves).real


@pytest.mark.parametrize(
    ("n", "angles", "center", "uniform"),
    [(32, 24, 15.3, True), (33, 17, 17.9, False), (48, 40, 24.0, True)],
)
@pytest.mark.parametrize(("width", "oversampling", "tolerance"), [(5, 1.5, 1e-3), (6, 2.0, 5e-5)])
def test_matches_the_exact_sum_it_approximates(
    n: int,
    angles: int,
    center: float,
    uniform: bool,
    width: int,
    oversampling: float,
    tolerance: float,
) -> None:
    rng = np.random.default_rng(n)
    theta = np.arange(angles) * np.pi / angles if uniform else rng.uniform(0, np.pi, angles)
    sinograms = rng.random((3, angles, n), dtype=np.float32)  # odd batch: one pairs with zeros
    fbp = GriddingFBP(width=width, oversampling=oversampling)
    images = fbp.reconstruct(torch.from_numpy(sinograms), torch.from_numpy(theta), center)
    geometry = fbp._geometry(torch.from_numpy(theta), center, n)
    expected = exact_sum(
        sinograms, theta, center, geometry.period, (geometry.factor.shape[1] - 1) // 2
    )
    error = np.abs(images.double().numpy() - expected).max() / np.abs(expected).max()
    assert error < tolerance


def test_kernel_transform_matches_quadrature() -> None:
    width, beta = 5, kernel_beta(5, 1.5)
    t = torch.linspace(-width / 2, width / 2, 20001, dtype=torch.float64)
    for frequency in (0.0, 0.1, 1 / 3):
        quadrature = float(
            (kaiser_bessel(t, width, beta) * torch.cos(2 * math.pi * frequency * t)).sum()
            * (t[1] - t[0])
        )
        closed = float(
            kaiser_bessel_transform(torch.tensor(frequency, dtype=torch.float64), width, beta)
        )
        assert closed == pytest.approx(quadrature, rel=1e-6)
    assert float(kaiser_bessel(torch.tensor([width / 2]), width, beta)[0]) == 0.0


@pytest.mark.parametrize(("n", "angles"), [(128, 180), (129, 180), (96, 256), (129, 30)])
@pytest.mark.parametrize("filter_name", ["ramp", "shepp-logan"])
def test_analytic_disks_no_worse_than_skimage(n: int, angles: int, filter_name: str) -> None:
    theta = np.arange(angles) * np.pi / angles  # 30 angles: sparse view
    radius = 0.45 * n
    image = grid(disk_sinogram(theta, n, n / 2), theta, n / 2, filter_name=filter_name)
    error = rel_error(image, disk_image(n), inside(n, radius))
    assert error <= 1.1 * skimage_error(n, theta, filter_name, radius)
    direct = ours(disk_sinogram(theta, n, n / 2), theta, n / 2, filter_name=filter_name)
    assert error <= 1.01 * rel_error(direct, disk_image(n), inside(n, radius))


def test_non_uniform_angles_need_no_fallback() -> None:
    """Gridding takes the direct method's per-angle quadrature weights as they are."""
    n = 129
    theta = np.sort(np.random.default_rng(3).uniform(0, np.pi, 120))
    sinogram = disk_sinogram(theta, n, n / 2)
    image = grid(sinogram, theta, n / 2)
    mask = inside(n, 0.45 * n)
    assert rel_error(image, disk_image(n), mask) <= 1.1 * skimage_error(n, theta, "ramp", 0.45 * n)
    assert rel_error(image, ours(sinogram, theta, n / 2), mask) < 0.02


@pytest.mark.parametrize(
    ("n", "angles", "span", "center", "apart"),
    [
        (128, 192, np.pi, 64.0, 0.01),  # even width
        (129, 180, np.pi, 64.5, 0.01),  # odd width
        (128, 180, np.pi, 69.3, 0.01),  # the axis 5.3 pixels right of the middle
        (101, 360, 2 * np.pi, 47.2, 0.01),  # full rotation, left of the middle
        (129, 30, np.pi, 64.5, 0.03),  # sparse view
    ],
)
def test_same_slice_as_the_direct_method(
    n: int, angles: int, span: float, center: float, apart: float
) -> None:
    theta = np.arange(angles) * span / angles + 0.01
    sinogram = disk_sinogram(theta, n, center)
    image, direct = grid(sinogram, theta, center), ours(sinogram, theta, center)
    # inside the circle every ray at every angle lands on the detector
    mask = inside(n, n / 2 - abs(center - n / 2) - 1)
    assert rel_error(image, direct, mask) < apart
    np.testing.assert_allclose(image.mean(), direct.mean(), rtol=0.01)  # the same scale


@pytest.mark.parametrize(
    ("n", "center", "where"),
    [(101, 50.5, (-30.0, 20.0)), (128, 69.3, (12.0, -7.0)), (129, 60.8, (-12.0, -25.0))],
)
def test_orientation_and_centre_match_the_geometry(
    n: int, center: float, where: tuple[float, float]
) -> None:
    theta = np.deg2rad(np.arange(0, 180, 2.0))
    disk = ((*where, 4.0, 1.0),)
    image = grid(disk_sinogram(theta, n, center, disk), theta, center)
    np.testing.assert_allclose(centroid_xy(image), where, atol=0.1)


def test_reconstructor_contract_batches_and_cache() -> None:
    fbp = GriddingFBP("cpu", circle_mask=True, max_work_bytes=1 << 16)  # one pair a chunk
    assert isinstance(fbp, Reconstructor) and fbp.device == torch.device("cpu")
    n, angles = 65, 100
    theta = torch.from_numpy(np.arange(angles) * np.pi / angles)
    sinograms = torch.from_numpy(np.random.default_rng(0).random((5, angles, n), dtype=np.float32))
    chunked = fbp.reconstruct(sinograms, theta, 31.7)
    whole = GriddingFBP(circle_mask=True).reconstruct(sinograms, theta, 31.7)
    assert chunked.shape == (5, n, n) and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    # a slice comes out the same whichever slice it shares a complex sinogram with
    single = GriddingFBP(circle_mask=True).reconstruct(sinograms[3:4], theta, 31.7)
    torch.testing.assert_close(single[0], whole[3], rtol=0, atol=2e-5)
    assert bool((whole[:, ~torch.from_numpy(inside(n, n / 2))] == 0).all())
    # work buffers are kept across calls: a narrower detector with the same FFT lengths must
    # not see a wider one's leftovers in their zero padding
    fbp.reconstruct(torch.rand((5, angles, n + 5)), theta, 31.7)
    torch.testing.assert_close(fbp.reconstruct(sinograms, theta, 31.7), chunked)
    first = fbp._geometry(theta, 31.7, n)
    assert fbp._geometry(theta.clone(), 31.7, n) is first
    assert fbp._geometry(theta, 31.0, n) is not first
    assert fbp.reconstruct(sinograms[:0], theta, 31.7).shape == (0, n, n)
    with pytest.raises(ValueError, match="angles"):
        fbp.reconstruct(sinograms, theta[:-1], 31.7)
    with pytest.raises(ValueError, match="finite"):
        fbp.reconstruct(sinograms, theta, math.nan)
    with pytest.raises(ValueError, match="width"):
        GriddingFBP(width=1)


def test_spreading_matrix_is_int32_bounded_and_built_in_any_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n, angles = 64, 96
    theta = torch.from_numpy(np.arange(angles) * np.pi / angles)
    fbp = GriddingFBP()
    matrix = fbp._geometry(theta, n / 2, n).spreading
    assert matrix.indices.dtype == matrix.offsets.dtype == torch.int32
    assert matrix.nbytes == fbp.matrix_bytes(angles, n)
    assert bool((matrix.offsets[1:] >= matrix.offsets[:-1]).all())
    monkeypatch.setattr(spreading, "_BUILD_SAMPLES", 1000)  # many small placement steps
    again = GriddingFBP()._geometry(theta, n / 2, n).spreading
    assert torch.equal(again.indices, matrix.indices)
    assert torch.equal(again.weights, matrix.weights)


def test_method_choice() -> None:
    auto = AutoFBP("cpu")
    assert isinstance(auto, Reconstructor)
    assert auto.method_for(768, 512) == "gridding"  # measured faster on a CPU
    assert AutoFBP("cpu", max_matrix_bytes=1 << 20).method_for(768, 512) == "direct"
    assert AutoFBP("cuda").method_for(768, 512) == "direct"  # until measured on a GPU
    assert isinstance(make_reconstructor("direct"), FBP)
    assert isinstance(make_reconstructor("gridding"), GriddingFBP)
    with pytest.raises(ValueError, match="auto, direct, gridding"):
        make_reconstructor("fourier")
    n, angles = 64, 96
    theta = np.arange(angles) * np.pi / angles
    sinogram = disk_sinogram(theta, n, n / 2, DISKS[:2])
    torch.testing.assert_close(
        auto.reconstruct(
            torch.from_numpy(sinogram[None].astype(np.float32)), torch.from_numpy(theta), n / 2
        )[0],
        torch.from_numpy(grid(sinogram, theta, n / 2)),
    )


def test_recon_method_argument() -> None:
    angles, cols = 96, 64
    theta = np.arange(angles) * np.pi / angles
    sinogram = disk_sinogram(theta, cols, cols / 2, DISKS[:2])
    tomo = np.repeat(sinogram[:, None, :], 2, axis=1)  # (angles, rows, cols)
    direct = recon(tomo, theta, device="cpu", method="direct")
    gridded = recon(tomo, theta, device="cpu", method="gridding")
    np.testing.assert_allclose(gridded[1], grid(sinogram, theta, cols / 2), atol=1e-5)
    assert rel_error(gridded[0], direct[0], inside(cols, cols / 2 - 1)) < 0.01
    # auto is the service's choice: gridding on a CPU (recon keeps its geometry between calls)
    np.testing.assert_array_equal(recon(tomo, theta, device="cpu"), gridded)
    with pytest.raises(ValueError, match="method"):
        recon(tomo, theta, method="fourier")


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    n, angles = 256, 384
    theta = torch.from_numpy(np.arange(angles) * np.pi / angles)
    sinograms = torch.from_numpy(np.random.default_rng(0).random((4, angles, n), dtype=np.float32))
    cpu = GriddingFBP("cpu").reconstruct(sinograms, theta, n / 2 + 1.3)
    cuda = GriddingFBP("cuda").reconstruct(sinograms.cuda(), theta, n / 2 + 1.3)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-4 * float(cpu.abs().max()))
