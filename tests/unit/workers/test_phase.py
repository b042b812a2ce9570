"""Paganin phase retrieval against an independent numpy implementation of the paper's eq. (8)
and against a homogeneous sphere propagated through free space (Fresnel, in numpy)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from workers.preprocess.phase import attenuation_coefficient, paganin_filter, wavelength

ENERGY, PIXEL, DELTA, BETA = 20.0, 1e-6, 1e-6, 1e-9  # keV, m, a light material's delta, beta


def paganin_reference(
    intensity: np.ndarray, energy_kev: float, distance: float, pixel: float, pad: int
) -> np.ndarray:
    """Paganin et al. 2002 eq. (8) written from the paper, in float64: returns exp(-mu T)."""
    lam = 12.398419843320026e-10 / energy_kev  # h c = 12.398 keV Angstrom
    mu = 4 * np.pi * BETA / lam
    padded = np.pad(intensity, [(0, 0), (pad, pad), (pad, pad)], mode="edge")
    ky = 2 * np.pi * np.fft.fftfreq(padded.shape[1], pixel)
    kx = 2 * np.pi * np.fft.fftfreq(padded.shape[2], pixel)
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    retrieved = np.fft.ifft2(mu * np.fft.fft2(padded) / (distance * DELTA * k2 + mu)).real
    thickness = -np.log(retrieved) / mu
    return np.exp(-mu * thickness)[:, pad:-pad, pad:-pad]


@pytest.mark.parametrize("distance", [0.05, 0.5])
def test_matches_the_paper_formula(distance: float) -> None:
    rng = np.random.default_rng(0)
    intensity = np.exp(-np.abs(rng.normal(0.2, 0.05, (3, 40, 56))))
    expected = paganin_reference(intensity, ENERGY, distance, PIXEL, pad=16)
    result = paganin_filter(intensity, ENERGY, distance, PIXEL, DELTA / BETA, pad=16)
    assert isinstance(result, np.ndarray) and result.shape == intensity.shape
    np.testing.assert_allclose(result, expected, rtol=1e-10)
    as_tensor = paganin_filter(
        torch.from_numpy(intensity[0]).float(), ENERGY, distance, PIXEL, 1e3, pad=16
    )
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32
    np.testing.assert_allclose(as_tensor.numpy(), expected[0], rtol=1e-5)


def test_a_stack_of_many_frames_is_filtered_frame_by_frame_alike() -> None:
    """More frames than are transformed at a time (the last batch shorter), at the default
    padding: each frame as on its own, and the paper's formula at that padding."""
    rng = np.random.default_rng(1)
    intensity = np.exp(-np.abs(rng.normal(0.2, 0.05, (30, 64, 64))))
    stack = paganin_filter(intensity, ENERGY, 0.5, PIXEL, DELTA / BETA)
    single = paganin_filter(intensity[-1:], ENERGY, 0.5, PIXEL, DELTA / BETA)
    np.testing.assert_allclose(stack[-1:], single, rtol=1e-12)
    # the kernel's decay (50 px here) asks for more padding than the frame: 64 a side, 192 in
    # all, a fast FFT length already
    expected = paganin_reference(intensity, ENERGY, 0.5, PIXEL, pad=64)
    np.testing.assert_allclose(stack, expected, rtol=1e-10)
    empty = paganin_filter(intensity[:0], ENERGY, 0.5, PIXEL, DELTA / BETA)
    assert empty.shape == (0, 64, 64)


def test_in_place_and_reused_buffers_give_the_same_frames() -> None:
    """The service filters each chunk it owns in place, chunk after chunk, in the buffers of the
    previous call; another shape between two calls, and another thread, change nothing."""
    rng = np.random.default_rng(2)
    chunks = [
        torch.from_numpy(np.exp(-np.abs(rng.normal(0.2, 0.05, (n, 40, 48))))).float()
        for n in (3, 3, 1)
    ]
    expected = [paganin_reference(c.double().numpy(), ENERGY, 0.5, PIXEL, pad=16) for c in chunks]
    other = torch.ones(2, 24, 30)
    for chunk, reference in zip(chunks, expected, strict=True):
        own = chunk.clone()
        result = paganin_filter(own, ENERGY, 0.5, PIXEL, DELTA / BETA, pad=16, in_place=True)
        assert result.data_ptr() == own.data_ptr() and torch.equal(result, own)  # no copy
        np.testing.assert_allclose(result.numpy(), reference, rtol=2e-5)
        copy = paganin_filter(chunk, ENERGY, 0.5, PIXEL, DELTA / BETA, pad=16)
        assert copy is not chunk and torch.equal(copy, result)
        paganin_filter(other, ENERGY, 0.5, PIXEL, DELTA / BETA, pad=8)  # another shape
    results: list[torch.Tensor] = []
    thread = threading.Thread(
        target=lambda: results.append(
            paganin_filter(chunks[0], ENERGY, 0.5, PIXEL, DELTA / BETA, pad=16)
        )
    )
    thread.start()
    thread.join(timeout=30)
    np.testing.assert_allclose(results[0].numpy(), expected[0], rtol=2e-5)


def test_recovers_a_homogeneous_spheres_thickness() -> None:
    """A sphere of 40 um radius at 20 keV, 10 cm downstream: raw -log is dominated by edge
    fringes; Paganin's filter gives back its thickness."""
    distance, n, radius = 0.1, 256, 40e-6
    lam = wavelength(ENERGY)
    y, x = (np.mgrid[:n, :n] - (n - 1) / 2) * PIXEL
    thickness = 2 * np.sqrt(np.clip(radius**2 - x**2 - y**2, 0, None))
    k = 2 * np.pi / lam
    exit_wave = np.exp(-k * (BETA + 1j * DELTA) * thickness)
    f2 = np.fft.fftfreq(n, PIXEL)[:, None] ** 2 + np.fft.fftfreq(n, PIXEL)[None, :] ** 2
    propagated = np.fft.ifft2(np.fft.fft2(exit_wave) * np.exp(-1j * np.pi * lam * distance * f2))
    intensity = np.abs(propagated) ** 2
    mu = attenuation_coefficient(ENERGY, BETA)
    inside = x**2 + y**2 < (0.8 * radius) ** 2
    raw_error = np.abs(-np.log(intensity) / mu - thickness)[inside].max()
    retrieved = paganin_filter(intensity, ENERGY, distance, PIXEL, DELTA / BETA)
    error = np.abs(-np.log(retrieved) / mu - thickness)[inside].max()
    assert raw_error > thickness.max()  # without retrieval, no thickness to speak of
    assert error < 0.03 * thickness.max()
    assert mu == pytest.approx(4 * math.pi * BETA / lam)


def test_zero_distance_is_the_identity_and_bad_input_is_refused() -> None:
    data = np.random.default_rng(1).uniform(0.2, 1.0, (2, 16, 16))
    np.testing.assert_allclose(paganin_filter(data, ENERGY, 0.0, PIXEL, 100.0), data, rtol=1e-12)
    with pytest.raises(ValueError, match="pixel_size"):
        paganin_filter(data, ENERGY, 0.1, 0.0, 100.0)
    with pytest.raises(ValueError, match="energy"):
        paganin_filter(data, -1.0, 0.1, PIXEL, 100.0)
