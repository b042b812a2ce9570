"""Training-data synthesis: conditions, the low-dose models, targets and held-out seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.training.synthesize import conditions, synthesize
from service.errors import DataError
from workers.lowdose import EVALUATION_SEED, Condition, low_dose_reconstruction, render


def test_conditions_and_labels() -> None:
    chosen = conditions(sparse=[8], photons=[200], combined=True)
    assert [c.label for c in chosen] == ["1/8 views", "200 photons", "1/8 views, 200 photons"]
    with pytest.raises(ValueError, match="no low-dose condition"):
        conditions()
    with pytest.raises(ValueError, match="sparse=0"):
        Condition(sparse=0)


def test_low_dose_models() -> None:
    theta = np.linspace(0, np.pi, 32, endpoint=False)
    line_integrals = np.full((32, 2, 16), 0.5, np.float32)
    rng = np.random.default_rng(0)
    sparse = low_dose_reconstruction(line_integrals, theta, Condition(sparse=4), rng)
    assert sparse.shape == (2, 16, 16)
    clean = low_dose_reconstruction(line_integrals, theta, Condition(), rng)
    noisy = low_dose_reconstruction(line_integrals, theta, Condition(photons=50.0), rng)
    # 50 photons through exp(-0.5): ~30 counts, ~18% noise per ray, which FBP spreads evenly.
    assert np.std(noisy - clean) > 0.1 * np.abs(clean).max()
    assert abs(np.mean(noisy - clean)) < 0.1 * np.std(noisy - clean)


def test_fbp_target_is_the_full_dose_reconstruction() -> None:
    (phantom_target,) = render(5, rows=2, size=32, angles=48, chosen=[Condition(sparse=2)])
    (fbp_target,) = render(
        5, rows=2, size=32, angles=48, chosen=[Condition(sparse=2)], target="fbp"
    )
    np.testing.assert_array_equal(phantom_target.noisy, fbp_target.noisy)
    assert not np.array_equal(phantom_target.target, fbp_target.target)
    # FBP of the full-dose scan is close to the phantom, in the same units.
    error = np.abs(fbp_target.target - phantom_target.target).mean()
    assert error < 0.2 * phantom_target.target.max()
    with pytest.raises(ValueError, match="target='sinogram'"):
        render(5, 2, 32, 48, [Condition(sparse=2)], target="sinogram")


def test_refuses_the_evaluation_seeds(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="evaluation seeds"):
        synthesize(
            tmp_path / "x.h5",
            [Condition(sparse=2)],
            phantoms=2,
            test_phantoms=1,
            seed=EVALUATION_SEED - 2,
            progress=False,
        )
