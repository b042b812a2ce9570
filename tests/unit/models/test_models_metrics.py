"""PSNR and SSIM agree with scikit-image (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models.training.metrics import psnr, ssim


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
