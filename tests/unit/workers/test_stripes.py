"""Stripe removal against the done-criteria on foam scans with an uncorrected per-pixel gain,
the wavelets against their defining identities, the low-pass against an FFT reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.unit.workers.foam_scans import counts, foam_scan, minus_log, recon_error
from workers.preprocess.stripes import (
    METHODS,
    _add_interpolated,
    _lowpass_operators,
    default_window,
    remove_stripes,
)
from workers.preprocess.wavelets import daubechies, dwt2, idwt2


def test_daubechies_filters_satisfy_their_definition() -> None:
    root3 = math.sqrt(3)
    np.testing.assert_allclose(
        daubechies(2), np.array([1 + root3, 3 + root3, 3 - root3, 1 - root3]) / (4 * math.sqrt(2))
    )
    np.testing.assert_allclose(daubechies(1), [1 / math.sqrt(2)] * 2)
    for order in range(1, 11):
        low = daubechies(order)
        assert len(low) == 2 * order and low.sum() == pytest.approx(math.sqrt(2))
        for shift in range(order):  # orthonormal to its even shifts
            product = np.dot(low[2 * shift :], low[: len(low) - 2 * shift])
            assert product == pytest.approx(float(shift == 0), abs=1e-12)
        high = low[::-1] * (-1.0) ** np.arange(len(low))
        k = np.arange(len(low)) / len(low)
        for power in range(order):  # `order` vanishing moments
            assert abs(np.sum(high * k**power)) < 1e-9


@pytest.mark.parametrize("order", [1, 2, 5, 10])
def test_periodic_dwt_is_orthogonal_and_inverts(order: int) -> None:
    image = torch.rand(3, 16, 24, dtype=torch.float64)
    low = daubechies(order)
    bands = dwt2(image, low)
    assert bands.shape == (3, 4, 8, 12)
    np.testing.assert_allclose(float((bands**2).sum()), float((image**2).sum()), rtol=1e-12)
    np.testing.assert_allclose(idwt2(bands, low).numpy(), image.numpy(), atol=1e-12)
    # a constant image has no detail in any band
    flat = dwt2(torch.ones(1, 8, 8, dtype=torch.float64), low)
    assert float(flat[:, 1:].abs().max()) < 1e-12


@pytest.mark.parametrize("sigma", [0.5, 3.0])
def test_lowpass_operator_matches_an_fft_reference(sigma: float) -> None:
    angles, samples = 90, 90
    rng = np.random.default_rng(0)
    column = rng.normal(size=(angles, 5))
    mirrored = np.concatenate([column, column[::-1]])
    frequency = np.fft.rfftfreq(2 * angles, 1 / (2 * angles))
    window = np.exp(-(frequency**2) / (2 * (2 * sigma) ** 2))
    spectrum = np.fft.rfft(mirrored, axis=0) * window[:, None]
    reference = np.fft.irfft(spectrum, n=2 * angles, axis=0)[:angles]
    analysis, synthesis = _lowpass_operators(angles, samples, sigma, torch.zeros(1))
    smooth = synthesis.double().numpy() @ (analysis.double().numpy() @ column)
    np.testing.assert_allclose(smooth, reference, atol=1e-5 * np.abs(reference).max())


def test_the_correction_is_interpolated_linearly_back_to_the_angles() -> None:
    """Samples stand for blocks of angles: sample j at angle (j + 1/2) angles/samples - 1/2;
    in between linear (numpy's interp), clamped past the first and last sample."""
    angles, samples, cols = 90, 16, 3
    correction = torch.rand(2, cols, samples, dtype=torch.float64)
    base = torch.rand(2, angles, cols, dtype=torch.float64)
    result = _add_interpolated(base, correction, torch.empty_like(base)).numpy()
    at = (np.arange(samples) + 0.5) * angles / samples - 0.5
    for b in range(2):
        for c in range(cols):
            expected = np.interp(np.arange(angles), at, correction[b, c].numpy())
            np.testing.assert_allclose(result[b, :, c] - base[b, :, c].numpy(), expected)
    expected = base.numpy() + 1
    same = _add_interpolated(base, torch.ones(2, cols, angles, dtype=torch.float64), base)
    assert same is base
    np.testing.assert_allclose(base.numpy(), expected)


def _gain_scan(gain_spread: float) -> tuple[np.ndarray, np.ndarray, object]:
    """(ringed, ring-free) line integrals of one noisy foam scan, and the scan: the ringed one
    had each detector pixel's transmission scaled by its own gain ~ N(1, spread), which the
    flat-field correction (against a gain-free flat) does not capture."""
    photons = 1e5
    scan = foam_scan(512, 360, rows=2, seed=5)
    detected = counts(scan.line_integrals, photons, 1)
    gain = np.random.default_rng(2).normal(1.0, gain_spread, detected.shape[1:])
    return minus_log(detected * gain, photons), minus_log(detected, photons), scan


@pytest.mark.parametrize("spread", [0.02, 0.03])
def test_auto_repairs_gain_rings_and_spares_a_clean_scan(spread: float) -> None:
    ringed, clean, scan = _gain_scan(spread)

    def error(tomo: np.ndarray) -> float:
        return recon_error(tomo, scan.theta, scan.center, scan.phantom)  # type: ignore[attr-defined]

    def cleaned(tomo: np.ndarray) -> np.ndarray:
        return remove_stripes(tomo.transpose(1, 0, 2), "auto").transpose(1, 0, 2)

    ringed_error, clean_error = error(ringed), error(clean)
    assert ringed_error > 2 * clean_error  # the rings dominate: what removal has to fix
    assert error(cleaned(ringed)) <= 0.6 * ringed_error
    assert abs(error(cleaned(clean)) / clean_error - 1) <= 0.10


@pytest.mark.parametrize("method", [m for m in METHODS if m != "auto"])
def test_every_method_removes_an_isolated_stripe(method: str) -> None:
    """An off-axis disk (its edges move with the angle) plus one miscalibrated column: Vo's
    methods take the stripe out and leave the rest; the wavelet method takes most of it out
    but smooths the disk's low angular harmonics too (its known cost)."""
    angles, cols, stripe = 180, 96, 0.05
    theta = np.arange(angles) * np.pi / angles
    s = np.arange(cols) - (cols - 1) / 2
    offset = s[None, :] - 8 * np.cos(theta)[:, None]
    sinogram = 2 * 0.006 * np.sqrt(np.clip(32.0**2 - offset**2, 0, None))
    striped = sinogram.copy()
    striped[:, 60] += stripe
    result = remove_stripes(striped.astype(np.float32), method)
    assert isinstance(result, np.ndarray) and result.shape == striped.shape
    error = np.abs(result - sinogram)
    elsewhere = np.delete(error, np.s_[55:66], axis=1).mean()
    if method == "fourier-wavelet":
        assert error[:, 60].mean() < 0.3 * stripe and elsewhere < 0.4 * stripe
    else:
        assert error[:, 60].mean() < 0.15 * stripe and elsewhere < 0.01 * stripe


def test_batches_and_devices_agree_with_single_sinograms() -> None:
    rng = np.random.default_rng(1)
    sinograms = rng.normal(1.0, 0.1, (3, 40, 48)).astype(np.float32)
    batch = remove_stripes(torch.from_numpy(sinograms), "auto")
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
    for row in range(3):
        np.testing.assert_allclose(
            batch[row].numpy(), remove_stripes(sinograms[row], "auto"), atol=1e-5
        )
    own = torch.from_numpy(sinograms.copy())
    in_place = remove_stripes(own, "auto", in_place=True)
    assert in_place.data_ptr() == own.data_ptr()
    np.testing.assert_array_equal(in_place.numpy(), batch.numpy())
    doubled = remove_stripes(torch.from_numpy(sinograms.astype(np.float64)), "sorting")
    assert doubled.dtype == torch.float64
    with pytest.raises(ValueError, match="method"):
        remove_stripes(sinograms, "wavelet")
    with pytest.raises(ValueError, match="odd window"):
        remove_stripes(sinograms, "sorting", size=4)
    assert default_window(256) == 9 and default_window(64) == 5 and default_window(4096) == 31
