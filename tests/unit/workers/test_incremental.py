"""Incremental FBP (workers.incremental): blocks of angles added in any order, plus the
remainder at the end, give the whole-sinogram FBP of the same method (float rounding apart),
and that agrees with scikit-image's iradon on a disk phantom."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.workers.test_fbp import disk_sinogram
from workers.fbp import FBP
from workers.gridding import GriddingFBP
from workers.incremental import accumulator_bytes, angle_sum


def _sinograms(rows: int, angles: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    theta = np.linspace(0, np.pi, angles, endpoint=False)
    base = np.stack(
        [
            disk_sinogram(theta, cols, cols / 2, ((2.0 * r, -1.0, 0.2 * cols, 1.0 + 0.1 * r),))
            for r in range(rows)
        ]
    )
    rng = np.random.default_rng(1)
    data = base + 0.01 * rng.standard_normal(base.shape)
    return torch.from_numpy(data.astype(np.float32)), torch.as_tensor(theta, dtype=torch.float32)


@pytest.mark.parametrize(
    ("method", "whole", "circle"),
    [("direct", FBP, False), ("gridding", GriddingFBP, True), ("gridding", GriddingFBP, False)],
)
@pytest.mark.parametrize("rows", [3, 4])
def test_blocks_in_any_order_plus_remainder_equal_the_whole_fbp(
    method: str, whole: type, circle: bool, rows: int
) -> None:
    angles, cols, block, center = 90, 48, 16, 24.7
    sinograms, theta = _sinograms(rows, angles, cols)
    engine = angle_sum(method, torch.device("cpu"), "shepp-logan", circle)
    plan = engine.plan(theta.double(), center, cols, block)
    assert plan.blocks == 6 and plan.span(5) == (80, 90)
    accumulator = engine.accumulator(plan, rows)
    for b in (4, 0, 2):  # arrival order is free
        a0, a1 = plan.span(b)
        engine.add(plan, b, sinograms[:, a0:a1], accumulator)
    result = engine.finish(plan, accumulator, sinograms, [1, 3, 5])
    expected = whole("cpu", filter_name="shepp-logan", circle_mask=circle).reconstruct(
        sinograms, theta, center
    )
    assert result.shape == (rows, cols, cols)
    scale = float(expected.abs().max())
    np.testing.assert_allclose(result.numpy(), expected.numpy(), atol=2e-5 * scale, rtol=0)
    # and all blocks in the accumulator, none left: the same
    for b in (1, 3, 5):
        a0, a1 = plan.span(b)
        engine.add(plan, b, sinograms[:, a0:a1], accumulator)
    done = engine.finish(plan, accumulator, sinograms, [])
    np.testing.assert_allclose(done.numpy(), expected.numpy(), atol=2e-5 * scale, rtol=0)


def test_finish_of_a_row_range_reads_the_accumulators_rows() -> None:
    """The worker finishes a scan a batch of rows at a time: rows [2, 4) of the accumulator
    with rows [2, 4) of the sinogram are rows [2, 4) of the whole result."""
    rows, angles, cols, block = 6, 60, 32, 25
    sinograms, theta = _sinograms(rows, angles, cols)
    for method in ("direct", "gridding"):
        engine = angle_sum(method, torch.device("cpu"), "ramp", False)
        plan = engine.plan(theta.double(), cols / 2, cols, block)
        accumulator = engine.accumulator(plan, rows)
        engine.add(plan, 1, sinograms[:, 25:50], accumulator)
        whole = engine.finish(plan, accumulator, sinograms, [0, 2])
        rows_2_4 = engine.rows_of(accumulator, 2, 4)
        part = engine.finish(plan, rows_2_4, sinograms[2:4], [0, 2])
        np.testing.assert_allclose(part.numpy(), whole[2:4].numpy(), atol=1e-6, rtol=0)


def test_accumulator_bytes() -> None:
    """What `incremental.max_bytes` is checked against is what the accumulators take."""
    for method, grid in (("direct", 32), ("gridding", GriddingFBP().grid_size(32))):
        engine = angle_sum(method, torch.device("cpu"), "ramp", False)
        theta = torch.linspace(0, 3, 10, dtype=torch.float64)
        accumulator = engine.accumulator(engine.plan(theta, 16.0, 32, 5), 3)
        nbytes = accumulator.numel() * accumulator.element_size()
        assert nbytes == accumulator_bytes(method, 3, 32, grid)
    assert accumulator_bytes("direct", 3, 10, 16) == 3 * 10 * 10 * 4
    assert accumulator_bytes("gridding", 3, 10, 16) == 4 * 16 * 16 * 4
