"""PSNR and SSIM agree with scikit-image (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models.training.metrics import DETAIL_SIGMA, SUPPORT_FRACTION, detail_snr, psnr, ssim


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    reference = np.zeros((40, 56))
    reference[8:30, 10:40] = 0.01
    noisy = reference + 0.002 * rng.standard_normal(reference.shape)
    return noisy, reference


def test_psnr_matches_scikit_image(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, reference = pair
    expected = peak_signal_noise_ratio(reference, noisy, data_range=0.01)
    got = psnr(torch.from_numpy(noisy), torch.from_numpy(reference), 0.01)
    np.testing.assert_allclose(got.numpy(), [expected], rtol=1e-10)


def test_ssim_matches_scikit_image(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, reference = pair
    expected = structural_similarity(reference, noisy, data_range=0.01)
    got = ssim(torch.from_numpy(noisy), torch.from_numpy(reference), 0.01)
    np.testing.assert_allclose(got.numpy(), [expected], rtol=1e-9)


def test_batches_score_each_image() -> None:
    images = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    batch = ssim(images, images.flip(0), 1.0)
    single = torch.stack([ssim(images[i, 0], images.flip(0)[i, 0], 1.0)[0] for i in range(3)])
    torch.testing.assert_close(batch, single)
    assert ssim(images, images, 1.0).tolist() == pytest.approx([1.0] * 3)


def test_ssim_refuses_images_smaller_than_its_window() -> None:
    with pytest.raises(ValueError, match="SSIM window"):
        ssim(torch.zeros(5, 5), torch.zeros(5, 5), 1.0)


def _detail_snr_reference(image: np.ndarray, reference: np.ndarray, sigma: float) -> float:
    """The detail SNR written with scipy.ndimage, independently of the torch code."""
    from scipy import ndimage

    def detail(x: np.ndarray) -> np.ndarray:
        return x - ndimage.gaussian_filter(x, sigma, mode="mirror", truncate=4.0)

    support = np.abs(reference) > SUPPORT_FRACTION * np.abs(reference).max()
    margin = int(np.ceil(2 * sigma))
    outside = ndimage.binary_dilation(~support, np.ones((2 * margin + 1,) * 2, bool))
    inside = ~outside
    signal = (detail(reference)[inside] ** 2).sum()
    error = ((detail(image) - detail(reference))[inside] ** 2).sum()
    return float(10 * np.log10(signal / error))


def test_detail_snr_matches_a_scipy_reference(pair: tuple[np.ndarray, np.ndarray]) -> None:
    rng = np.random.default_rng(1)
    reference = np.zeros((48, 52))
    reference[4:44, 6:48] = 1.0
    reference[10:20, 12:22] += 0.05 * rng.random((10, 10))
    image = reference + 0.01 * rng.standard_normal(reference.shape)
    expected = _detail_snr_reference(image, reference, DETAIL_SIGMA)
    got = detail_snr(torch.from_numpy(image), torch.from_numpy(reference))
    np.testing.assert_allclose(got.numpy(), [expected], rtol=1e-9)


def test_erasing_low_contrast_cells_scores_zero_detail_where_psnr_is_high() -> None:
    from workers.phantoms import make_phantom
    from workers.phantoms.solids import SolidPhantom

    phantom = make_phantom("cells", 2, 96, seed=1_000_000)
    truth = torch.from_numpy(phantom.voxelize()[:1].astype(np.float64))
    erased = torch.from_numpy(
        SolidPhantom(2, 96, phantom.ellipsoids[:1]).voxelize()[:1].astype(np.float64)
    )
    data_range = float(truth.max() - truth.min())
    assert psnr(erased, truth, data_range).item() > 30  # whole-slice PSNR: "excellent"
    assert abs(detail_snr(erased, truth).item()) < 0.5  # the detail is gone: ~0 dB
    rng = np.random.default_rng(2)
    kept = truth + 0.002 * data_range * torch.from_numpy(rng.standard_normal(truth.shape))
    assert detail_snr(kept, truth).item() > 10
