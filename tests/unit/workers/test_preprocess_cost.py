"""The per-slice cost report runs and says what it measured."""

from __future__ import annotations

from workers.preprocess.cost import measure_costs


def test_costs_are_reported_per_slice_next_to_fbp() -> None:
    costs = measure_costs(cols=64, rows=2, repeat=1)
    steps = [cost.step for cost in costs]
    assert steps[0] == "fbp" and costs[0].fbp_ratio == 1.0
    assert {"zingers", "stripes (auto)", "phase (paganin)", "center (vo)"} <= set(steps)
    fbp = costs[0].seconds
    for cost in costs:
        assert cost.seconds > 0 and cost.per in ("slice", "estimate")
        assert abs(cost.fbp_ratio - cost.seconds / fbp) < 1e-9
