"""Flat-field correction and frame averaging against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.preprocess import (
    TRANSMISSION_FLOOR,
    average_frames,
    flat_field,
    minus_log,
    normalize,
)


def numpy_normalize(
    frames: np.ndarray, dark: np.ndarray, flat: np.ndarray
) -> tuple[np.ndarray, int]:
    """Reference in float64: clip transmissions outside [floor, 1/floor] (NaN too), then -log."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (frames.astype(np.float64) - dark) / (flat.astype(np.float64) - dark)
    bad = ~((ratio >= TRANSMISSION_FLOOR) & (ratio <= 1 / TRANSMISSION_FLOOR))
    ratio = np.where(np.isnan(ratio) | (ratio < TRANSMISSION_FLOOR), TRANSMISSION_FLOOR, ratio)
    ratio = np.minimum(ratio, 1 / TRANSMISSION_FLOOR)
    return -np.log(ratio), int(bad.sum())


@pytest.fixture
def scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    rows, cols = 12, 20
    dark = rng.uniform(90, 110, (rows, cols)).astype(np.float32)
    flat = (dark + rng.uniform(20000, 40000, (rows, cols))).astype(np.float32)
    transmission = rng.uniform(0.02, 1.0, (5, rows, cols))
    frames = np.round(dark + transmission * (flat - dark)).astype(np.uint16)
    frames[0, 0, :4] = 50  # below the dark: ratio < 0
    frames[1, 2, 3] = np.round(dark[2, 3])  # ratio ~ 0 (at most a rounding step above)
    flat[4, 5] = dark[4, 5]  # dead pixel: 0 / 0 or x / 0 in every frame
    return frames, dark, flat


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32])
def test_normalize_matches_numpy(
    scan: tuple[np.ndarray, np.ndarray, np.ndarray], dtype: type
) -> None:
    frames, dark, flat = scan
    if dtype is np.uint8:  # keep the values in range: scale everything down
        frames, dark, flat = frames // 200, np.floor(dark / 200), np.floor(flat / 200)
    frames = frames.astype(dtype)
    expected, expected_clipped = numpy_normalize(frames, dark, flat)
    result, clipped = normalize(
        torch.from_numpy(frames), torch.from_numpy(dark), torch.from_numpy(flat)
    )
    assert result.dtype == torch.float32 and result.shape == frames.shape
    assert torch.isfinite(result).all()
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=2e-5)
    assert clipped == expected_clipped
    assert clipped >= 4 + frames.shape[0]  # the 4 below-dark pixels and the dead pixel per frame


def test_normalize_writes_into_a_reused_buffer(
    scan: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    frames, dark, flat = scan
    buffer = torch.full(frames.shape, np.nan, dtype=torch.float32)
    result, _ = normalize(
        torch.from_numpy(frames), torch.from_numpy(dark), torch.from_numpy(flat), out=buffer
    )
    assert result is buffer
    np.testing.assert_allclose(
        buffer.numpy(), numpy_normalize(frames, dark, flat)[0], rtol=1e-5, atol=2e-5
    )
    # a chunk without bad pixels reports no clipping
    clean = frames[2:3].copy()
    clean[:, 4, 5] = np.round(dark[4, 5]) + 500
    fixed_flat = flat.copy()
    fixed_flat[4, 5] += 1000
    _, clipped = normalize(
        torch.from_numpy(clean), torch.from_numpy(dark), torch.from_numpy(fixed_flat)
    )
    assert clipped == 0
    with pytest.raises(ValueError, match="out must be float32"):
        normalize(
            torch.from_numpy(frames),
            torch.from_numpy(dark),
            torch.from_numpy(flat),
            out=torch.empty(frames.shape, dtype=torch.float64),
        )
    with pytest.raises(ValueError, match="rows, cols"):
        normalize(torch.from_numpy(frames), torch.from_numpy(dark[:, 1:]), torch.from_numpy(flat))


def test_average_frames_is_float64_accurate() -> None:
    rng = np.random.default_rng(2)
    frames = rng.integers(60000, 65536, (300, 8, 9)).astype(np.uint16)
    frames[:, 0, 0] = [65535, 65534, 65535] * 100  # mean 65534.666..., needs more than float32 sums
    mean = average_frames(torch.from_numpy(frames))
    assert mean.dtype == torch.float32 and mean.shape == (8, 9)
    np.testing.assert_allclose(mean.numpy(), frames.astype(np.float64).mean(axis=0), rtol=1e-7)
    with pytest.raises(ValueError):
        average_frames(torch.zeros((0, 4, 4)))


def test_flat_field_then_minus_log_is_normalize(
    scan: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """The two halves of `normalize`, for the steps that work on transmission between them."""
    frames, dark, flat = scan
    tensors = [torch.from_numpy(a) for a in (frames, dark, flat)]
    transmission = flat_field(*tensors)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = (frames.astype(np.float64) - dark) / (flat.astype(np.float64) - dark)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(transmission.numpy()[finite], expected[finite], rtol=1e-5)
    line_integrals, clipped = minus_log(transmission)
    reference, reference_clipped = normalize(*tensors)
    assert clipped == reference_clipped
    np.testing.assert_array_equal(line_integrals.numpy(), reference.numpy())


def test_normalize_in_chunks_matches_numpy_and_counts_every_clip() -> None:
    """More frames than one chunk of `normalize` (and pixels below the dark, clipped): the
    same values and count as numpy's formula over the whole stack."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 4000, (40, 64, 80)).astype(np.uint16)  # 204,800 pixels
    dark, flat = np.full((64, 80), 100.0), np.full((64, 80), 3000.0)
    values, clipped = normalize(
        torch.from_numpy(frames),
        torch.from_numpy(dark).float(),
        torch.from_numpy(flat).float(),
    )
    ratio = (frames - dark) / (flat - dark)
    expected = -np.log(np.clip(ratio, 1e-6, 1e6))
    assert clipped == int((ratio <= 0).sum()) > 0
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-5, atol=1e-5)
