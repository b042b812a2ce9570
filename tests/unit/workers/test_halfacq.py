"""Half-acquisition: a simulated 360-degree offset-axis scan, its axis found from the data and
its stitch against the same foam projected onto a detector wide enough for a 180-degree scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.workers.foam_scans import counts, foam_scan, minus_log, recon_error
from workers.preprocess.halfacq import (
    find_half_acquisition_center,
    stitch_half_acquisition,
    stitched_width,
)

SIZE, COLS, ANGLES = 256, 160, 720  # a 256-pixel foam seen by a 160-column detector
RADIUS = 0.47 * SIZE  # wider than the detector: a 180-degree scan could not hold it


def _scan(axis: float, seed: int = 3):  # type: ignore[no-untyped-def]
    """The 360-degree scan with the axis at pixel index `axis` (TomoPy's convention)."""
    offset = axis + 0.5 - COLS / 2
    return foam_scan(
        COLS, ANGLES, rows=2, offset=offset, turn=2 * np.pi, radius=RADIUS, size=SIZE, seed=seed
    )


def test_stitch_equals_a_wide_detector_scan() -> None:
    """Axis at index 127.5: the mirrored half lands on whole pixels, and the stitch is the
    180-degree scan of a 256-column detector, exactly (the analytic projections of both)."""
    scan = _scan(127.5)
    sinograms = scan.line_integrals.transpose(1, 0, 2)
    stitched, center = stitch_half_acquisition(sinograms, scan.center)
    assert stitched.shape == (2, ANGLES // 2, SIZE) and center == SIZE / 2
    wide = scan.phantom.project(scan.theta[: ANGLES // 2], cols=SIZE, center=SIZE / 2)
    np.testing.assert_allclose(stitched, wide.transpose(1, 0, 2), atol=2e-5)
    as_tensor, _ = stitch_half_acquisition(torch.from_numpy(sinograms[0].copy()), scan.center)
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), stitched[0], atol=1e-6)


@pytest.mark.parametrize("axis", [126.8, 133.3, 159 - 126.8])
def test_axis_from_the_data_and_stitched_reconstruction(axis: float) -> None:
    """The axis within a quarter pixel on a noisy scan, near either edge; the stitched scan
    reconstructs within 1.15x the error of a wide detector's 180-degree scan."""
    photons = 5000.0
    scan = _scan(axis)
    tomo = minus_log(counts(scan.line_integrals, photons, 1), photons)
    found = find_half_acquisition_center(tomo.transpose(1, 0, 2))
    assert abs(found - scan.center) < 0.25, (found, scan.center)
    stitched, center = stitch_half_acquisition(tomo.transpose(1, 0, 2), found)
    width, first = stitched_width(COLS, found)
    assert stitched.shape[-1] == width and center == pytest.approx(found + first)
    half = scan.theta[: ANGLES // 2]
    error = recon_error(stitched.transpose(1, 0, 2), half, center, scan.phantom)
    wide = scan.phantom.project(half, cols=width, center=center)
    reference = recon_error(
        minus_log(counts(wide, photons, 2), photons), half, center, scan.phantom
    )
    assert error <= 1.15 * reference, (error, reference)


def test_stitch_rejects_what_it_cannot_stitch() -> None:
    with pytest.raises(ValueError, match="even number"):
        stitch_half_acquisition(np.zeros((5, 32), dtype=np.float32), 20.0)
    with pytest.raises(ValueError, match="off the"):
        stitch_half_acquisition(np.zeros((4, 32), dtype=np.float32), 40.0)
