"""Classical baselines: filters against scikit-image/scipy, the noise estimate, and tuning that
only ever sees validation slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio

from models.training.baselines import (
    BASELINES,
    Baseline,
    filter_slices,
    gaussian_blur,
    noise_sigma,
    resolve,
    tune,
)
from models.training.matrix_defaults import DEFAULT_BASELINES
from models.training.metrics import psnr
from workers.lowdose import EVALUATION_SEED, Condition, render


def _smooth_image(size: int = 96) -> np.ndarray:
    y, x = np.mgrid[:size, :size] / size
    return (np.sin(3 * x) * np.cos(2 * y) + (np.hypot(x - 0.5, y - 0.5) < 0.25)).astype(np.float32)


def test_gaussian_blur_is_scipys() -> None:
    image = np.random.default_rng(0).normal(size=(40, 56)).astype(np.float32)
    for sigma in (0.5, 1.5, 4.0):
        reference = gaussian_filter(image.astype(np.float64), sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(gaussian_blur(image, sigma), reference, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.05, 0.2, 1.0])
def test_noise_sigma_finds_white_noise_on_structure(sigma: float) -> None:
    image = _smooth_image(256)
    noisy = image + np.random.default_rng(1).normal(0, sigma, image.shape)
    assert noise_sigma(noisy) == pytest.approx(sigma, rel=0.1)
    assert noise_sigma(image) < 0.01  # the structure alone (an edge of 1) reads as little noise


def test_tuning_picks_on_the_validation_slices_only() -> None:
    """Light noise on the validation slice, heavy on the scored one: the chosen sigma is the
    validation slice's optimum, not the scored slice's."""
    truth = np.stack([_smooth_image()] * 2)
    rng = np.random.default_rng(2)
    light = truth + rng.normal(0, 0.02, truth.shape).astype(np.float32)
    heavy = truth + rng.normal(0, 0.8, truth.shape).astype(np.float32)
    gaussian = BASELINES["gaussian"]
    tuned = tune(gaussian, light, truth)

    def best_on(noisy: np.ndarray) -> float:
        scores = [
            float(
                psnr(
                    torch.from_numpy(filter_slices(gaussian, noisy, v)),
                    torch.from_numpy(truth),
                    2.0,
                ).mean()
            )
            for v in gaussian.grid
        ]
        return gaussian.grid[int(np.argmax(scores))]

    assert tuned.value == best_on(light) == gaussian.grid[0]
    assert best_on(heavy) > tuned.value
    assert tuned.described == f"sigma {tuned.value:g}"
    with pytest.raises(ValueError, match="must be equal"):
        tune(gaussian, light, truth[:1])


@pytest.fixture(scope="module")
def photon_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """200 photons on a 64 px foam: (scored noisy, scored truth, validation noisy, truth)."""
    condition = [Condition(photons=200.0)]
    (scored,) = render(EVALUATION_SEED, 2, 64, 96, condition)
    (check,) = render(EVALUATION_SEED + 1, 1, 64, 96, condition)
    return scored.noisy, scored.target, check.noisy, check.target


@pytest.mark.parametrize(
    "name", ["gaussian", "tv", "nlm", pytest.param("bm3d", marks=pytest.mark.slow)]
)
def test_a_tuned_filter_beats_fbp_on_a_noisy_case(
    name: str, photon_case: tuple[np.ndarray, ...]
) -> None:
    if name == "bm3d":
        pytest.importorskip("bm3d")
    noisy, truth, check_noisy, check_truth = photon_case
    baseline = BASELINES[name]
    tuned = tune(baseline, check_noisy, check_truth)
    filtered = filter_slices(baseline, noisy, tuned.value)
    data_range = float(truth.max() - truth.min())
    for index in range(len(noisy)):  # skimage's PSNR as the independent reference
        before = peak_signal_noise_ratio(truth[index], noisy[index], data_range=data_range)
        after = peak_signal_noise_ratio(truth[index], filtered[index], data_range=data_range)
        assert after > before + 3, f"{name} ({tuned.described}): {before:.2f} -> {after:.2f} dB"


def test_resolve_names_and_skips() -> None:
    chosen, skipped = resolve(DEFAULT_BASELINES)
    assert [b.name for b in chosen] == list(DEFAULT_BASELINES) and not skipped
    assert {b.name for b in resolve(["all"])[0]} | {
        s.split(":")[0] for s in resolve(["all"])[1]
    } == set(BASELINES)
    with pytest.raises(ValueError, match="choose from"):
        resolve(["median"])
    missing = Baseline("x", "{:g}", (1.0,), gaussian_blur, requires="no_such_module_for_tomocast")
    assert not missing.available and BASELINES["gaussian"].available
