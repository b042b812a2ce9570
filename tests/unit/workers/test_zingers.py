"""Zingers against scipy's median filter (the replacement) and the done-criterion on a foam
scan with 0.02% zinger pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter

from tests.unit.workers.foam_scans import counts, foam_scan, minus_log, recon_error
from workers.preprocess.zingers import remove_zingers


def _zinged(frames: np.ndarray, fraction: float, photons: float, seed: int) -> np.ndarray:
    """Add a zinger (0.5 to 4 open-beam counts more) to `fraction` of the pixels."""
    rng = np.random.default_rng(seed)
    hit = rng.random(frames.shape) < fraction
    return frames + hit * rng.uniform(0.5, 4.0, frames.shape) * photons


def test_zingers_are_found_and_replaced_by_their_median() -> None:
    photons = 2000.0
    scan = foam_scan(128, 64, rows=16, seed=1)
    frames = counts(scan.line_integrals, photons, 1)  # (angles, rows, cols) raw counts
    zinged = _zinged(frames, 1e-3, photons, 2)
    planted = zinged != frames
    cleaned, count = remove_zingers(zinged.astype(np.float32))
    assert isinstance(cleaned, np.ndarray) and cleaned.dtype == np.float32
    found = cleaned != zinged.astype(np.float32)
    assert found[planted].all()  # every planted zinger (>= 0.5 open beam: >= 11 sigma)
    assert count == found.sum() and count - planted.sum() <= 2  # next to no false alarms
    median = median_filter(zinged.astype(np.float32), size=(1, 3, 3), mode="nearest")
    np.testing.assert_array_equal(cleaned[found], median[found])
    np.testing.assert_array_equal(cleaned[~found], zinged.astype(np.float32)[~found])
    # in place (frames tested a few at a time): the same pixels, in the caller's own tensor
    own = torch.from_numpy(zinged.astype(np.float32))
    same, same_count = remove_zingers(own, in_place=True)
    assert same_count == count and same.data_ptr() == own.data_ptr()
    np.testing.assert_array_equal(own.numpy(), cleaned)


def test_transmission_and_torch_and_clean_frames() -> None:
    photons = 5000.0
    scan = foam_scan(128, 16, rows=8, seed=2)
    frames = counts(scan.line_integrals, photons, 3)
    zinged = torch.from_numpy(_zinged(frames, 1e-3, photons, 4) / photons)  # transmission
    cleaned, count = remove_zingers(zinged)
    assert isinstance(cleaned, torch.Tensor) and cleaned.dtype == torch.float64
    from_counts, count_counts = remove_zingers(zinged.numpy() * photons)
    assert count == count_counts  # the threshold is in noise units: any scale finds the same
    np.testing.assert_allclose(cleaned.numpy() * photons, from_counts, rtol=1e-9)
    _, none = remove_zingers(scan.line_integrals[0] * 0 + np.exp(-scan.line_integrals[0]))
    assert none == 0  # noiseless, smooth frames: nothing stands out
    empty, none = remove_zingers(np.zeros((0, 8, 128), np.float32))
    assert empty.shape == (0, 8, 128) and none == 0
    with pytest.raises(ValueError, match="threshold"):
        remove_zingers(zinged, threshold=0)


def test_zinger_removal_restores_the_reconstruction() -> None:
    """The done-criterion: with 0.02% zinger pixels, within 1.15x the zinger-free error."""
    photons = 1e4
    scan = foam_scan(256, 384, rows=4, seed=3)
    frames = counts(scan.line_integrals, photons, 5)
    zinged = _zinged(frames, 2e-4, photons, 6)

    def error(raw: np.ndarray) -> float:
        return recon_error(minus_log(raw, photons), scan.theta, scan.center, scan.phantom)

    clean_error = error(frames)
    assert error(zinged) > 1.5 * clean_error  # the fault: streaks from a few hundred pixels
    cleaned, count = remove_zingers(zinged / photons)
    assert count >= (zinged != frames).sum()
    assert error(cleaned * photons) <= 1.15 * clean_error
