"""recon() keeps its reconstructors and geometry between calls (a loop over chunks of rows runs
at the service's speed: its time is measured beside the service path's by the `tomocast recon()`
row of `tomocast bench recon`, docs/benchmarks.md), and takes a centre in TomoPy's pixel-index
convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.workers.foam_scans import counts, foam_scan, minus_log, recon_error
from workers.conventions import to_tomopy_center
from workers.preprocess.center import find_center_vo
from workers.recon import AutoFBP, ReconSession, recon, resolve_center


def test_a_loop_over_rows_builds_the_geometry_once() -> None:
    scan = foam_scan(64, 96, rows=4)
    session = ReconSession()
    chunks = [
        recon(scan.line_integrals[:, r : r + 2], scan.theta, device="cpu", session=session)
        for r in (0, 2)
    ]
    reconstructor = session.reconstructor("auto", torch.device("cpu"), "ramp", False)
    assert isinstance(reconstructor, AutoFBP)
    assert reconstructor.gridding.geometries.builds == 1  # the second chunk built nothing
    whole = recon(scan.line_integrals, scan.theta, device="cpu", session=ReconSession())
    # equal but for rounding: gridding pairs slices as the two halves of a complex sinogram
    np.testing.assert_allclose(np.concatenate(chunks), whole, rtol=1e-5, atol=1e-6)
    # a different filter is another reconstructor; the first stays (capacity 2)
    recon(scan.line_integrals[:, :1], scan.theta, filter_name="hann", device="cpu", session=session)
    assert session.reconstructor("auto", torch.device("cpu"), "ramp", False) is reconstructor
    session.clear()
    assert session.reconstructor("auto", torch.device("cpu"), "ramp", False) is not reconstructor


def test_tomopy_centre_convention() -> None:
    """A centre in TomoPy's convention (the axis' pixel index, as find_center_vo returns)
    reconstructs exactly as the same axis in ours, and as well as the true centre."""
    photons = 5000.0
    scan = foam_scan(128, 192, rows=2, offset=-4.6, seed=6)
    tomo = minus_log(counts(scan.line_integrals, photons, 6), photons)
    index = to_tomopy_center(find_center_vo(tomo.transpose(1, 0, 2)))  # a TomoPy-style centre
    ours = recon(tomo, scan.theta, center=index + 0.5, device="cpu")
    theirs = recon(tomo, scan.theta, center=index, center_convention="tomopy", device="cpu")
    np.testing.assert_array_equal(theirs, ours)
    true_error = recon_error(tomo, scan.theta, scan.center, scan.phantom)
    slices = recon(tomo, scan.theta, center=index, center_convention="tomopy", device="cpu")
    truth = scan.phantom.voxelize()
    c = np.arange(128) - 63.5
    inside = c[:, None] ** 2 + c[None, :] ** 2 < (0.45 * 128) ** 2
    error = float(np.sqrt(np.mean((slices - truth)[:, inside] ** 2)))
    assert error <= 1.15 * true_error
    # the index passed as our centre is half a pixel off: measurably worse
    assert recon_error(tomo, scan.theta, index, scan.phantom) > 1.3 * true_error
    assert resolve_center(None, 100, "tomopy") == 50.0 == resolve_center(None, 100)
    with pytest.raises(ValueError, match="center_convention"):
        recon(tomo, scan.theta, center=60.0, center_convention="astra")
