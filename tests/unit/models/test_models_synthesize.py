"""Training-data synthesis: conditions, the low-dose models, targets and held-out seeds."""

from __future__ import annotations

import json
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


# ---- families, attenuation and detector effects --------------------------------------------------


def _old_low_dose(seed: int, chosen: list[Condition]) -> list[np.ndarray]:
    """The foam volumes as `tomocast dataset` computed them before families and effects
    (commit fb6f2be's workers.lowdose, inlined): the reference for number-for-number equality."""
    from workers.phantom import FoamPhantom
    from workers.recon import recon

    phantom = FoamPhantom.random(3, 32, seed=seed, attenuation=1.0)
    theta = np.linspace(0.0, np.pi, 48, endpoint=False)
    line_integrals = phantom.project(theta)
    volumes = []
    for index, condition in enumerate(chosen):
        rng = np.random.default_rng((seed, index))
        views = line_integrals[:: condition.sparse]
        if condition.photons is not None:
            counts = rng.poisson(condition.photons * np.exp(-views.astype(np.float64)))
            views = -np.log(np.maximum(counts, 1) / condition.photons)
        # recon's "auto" was the direct method for stacks this small then
        angles = theta[:: condition.sparse]
        volumes.append(recon(views.astype(np.float32), angles, device="cpu", method="direct"))
    return volumes


def test_the_foam_data_set_is_unchanged(tmp_path: Path) -> None:
    import h5py

    chosen = conditions(sparse=[4], photons=[1000], combined=True)
    path = synthesize(
        tmp_path / "foam.h5",
        chosen,
        phantoms=2,
        test_phantoms=1,
        rows=3,
        size=32,
        angles=48,
        progress=False,
        command="x",
        families=("foam",),
    )
    with h5py.File(path) as file:
        for split, seeds in (("train", (0, 1)), ("test", (2,))):
            expected = np.concatenate([v for s in seeds for v in _old_low_dose(s, chosen)])
            np.testing.assert_array_equal(file[f"{split}_ns"][()], expected)
            assert set(file[f"{split}_ns"].attrs) == {"volume_rows", "seeds", "conditions", "units"}
        assert dict(file.attrs) == {
            "description": "foam phantoms 32x32x3, 48 views; low dose: 1/4 views; 1,000 photons; "
            "1/4 views, 1,000 photons; target: phantom; train seeds 0-1, test seeds 2-2",
            "command": "x",
        }


def test_families_take_turns_and_the_held_out_one_is_refused(tmp_path: Path) -> None:
    import h5py

    from models.training.cli import cmd_dataset  # noqa: F401  (the CLI path below)
    from service.cli import main
    from workers.phantoms import HELD_OUT, TRAINING_FAMILIES

    assert HELD_OUT not in TRAINING_FAMILIES
    path = synthesize(
        tmp_path / "mixed.h5",
        [Condition(sparse=4)],
        phantoms=3,
        test_phantoms=1,
        rows=2,
        size=32,
        angles=32,
        progress=False,
        families=("granular", "fibres"),
        attenuation=(0.1, 10.0),
    )
    with h5py.File(path) as file:
        assert json.loads(file["train_ns"].attrs["families"]) == ["granular", "fibres", "granular"]
        assert json.loads(file["test_ns"].attrs["families"]) == ["fibres"]
        assert "granular+fibres phantoms" in file.attrs["description"]
        assert all(0.1 <= a <= 10 for a in file["train_ns"].attrs["attenuations"])
    with pytest.raises(DataError, match=r"held out of training.*--allow-held-out"):
        synthesize(tmp_path / "cells.h5", [Condition(sparse=4)], families=(HELD_OUT,))
    with pytest.raises(DataError, match="family 'rocks'"):
        synthesize(tmp_path / "r.h5", [Condition(sparse=4)], families=("rocks",))
    flags = ["--phantoms", "1", "--test-phantoms", "1", "--rows", "1", "--size", "16"]
    flags += ["--angles", "16", "--sparse", "4", "--photons", "", "--no-progress"]
    out = tmp_path / "cli.h5"
    assert main(["dataset", "-o", str(out), "--families", HELD_OUT, *flags]) == 2
    assert not out.exists()
    assert (
        main(["dataset", "-o", str(out), "--families", HELD_OUT, "--allow-held-out", *flags]) == 0
    )
    assert main(["dataset", "-o", str(tmp_path / "d.h5"), *flags]) == 0  # default families
    with h5py.File(tmp_path / "d.h5") as file:
        assert HELD_OUT not in file.attrs["description"]


def test_attenuation_is_log_uniform_over_the_range() -> None:
    from models.training.synthesize import attenuation_for

    draws = np.array([attenuation_for(seed, (0.1, 10.0)) for seed in range(400)])
    assert draws.min() >= 0.1 and draws.max() <= 10.0
    logs = np.log10(draws)
    assert abs(logs.mean()) < 0.1  # centred on 1x in log
    assert np.histogram(logs, bins=4, range=(-1, 1))[0].min() > 70  # about 100 per quarter
    assert attenuation_for(7, (1.0, 1.0)) == 1.0
    assert attenuation_for(7, (0.1, 10.0)) == attenuation_for(7, (0.1, 10.0))
    with pytest.raises(DataError, match="attenuation"):
        attenuation_for(0, (2.0, 1.0))


def test_with_effects_alone_and_combined() -> None:
    from models.training.synthesize import with_effects

    base = conditions(sparse=[8], photons=[1000])
    assert with_effects(base, {"rings": 0.0}) == base  # off: today's conditions
    chosen = with_effects(base, {"rings": 0.01, "dark": 5.0, "blur": 1.0}, alone=True)
    labels = [c.label for c in chosen]
    assert labels[:2] == ["1/8 views", "1,000 photons"]
    assert "1/8 views, blur 1 px, rings 1 %" in labels  # no dark current without photons
    assert "1,000 photons, dark 5, blur 1 px, rings 1 %" in labels
    assert "1,000 photons, dark 5" in labels and "1/8 views, rings 1 %" in labels
    with pytest.raises(ValueError, match="unknown effect"):
        with_effects(base, {"halo": 1.0})
    with pytest.raises(ValueError, match=r"dark=5\.0 needs photons"):
        Condition(dark=5.0)
    with pytest.raises(ValueError, match=r"zingers=1\.5"):
        Condition(zingers=1.5)


FLAT = np.full((64, 4, 32), 0.5)  # (angles, rows, cols) line integrals of a uniform slab


def test_rings_are_a_gain_per_column() -> None:
    from workers.lowdose import detector_line_integrals

    out = detector_line_integrals(FLAT, Condition(rings=0.02), np.random.default_rng(0))
    offset = out - FLAT  # -log(gain): the same in every view and row, different per column
    np.testing.assert_allclose(offset, np.broadcast_to(offset[0, 0], offset.shape), atol=1e-12)
    assert 0.01 < offset[0, 0].std() < 0.04


def test_blur_spreads_an_edge_over_its_psf() -> None:
    from workers.lowdose import detector_line_integrals

    edge = np.zeros((2, 4, 64))
    edge[..., 32:] = 1.0
    out = detector_line_integrals(edge, Condition(blur=2.0), np.random.default_rng(0))
    np.testing.assert_allclose(out[..., :20], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 44:], 1.0, atol=1e-6)
    # On the intensity exp(-p): the 16-84 % rise spans about 2 sigma = 4 pixels.
    intensity = np.exp(-out[0, 0])
    rise = np.flatnonzero(
        (intensity < 1 - 0.16 * (1 - np.exp(-1.0)))
        & (intensity > np.exp(-1.0) + 0.16 * (1 - np.exp(-1.0)))
    )
    assert 3 <= len(rise) <= 5


def test_zingers_hit_the_asked_fraction_of_pixels() -> None:
    from workers.lowdose import ZINGER_GAIN, detector_line_integrals

    out = detector_line_integrals(FLAT, Condition(zingers=0.01), np.random.default_rng(0))
    hit = np.isclose(out, FLAT - np.log(ZINGER_GAIN))
    assert np.all(hit | np.isclose(out, FLAT))
    assert 0.005 < hit.mean() < 0.015


def test_dark_current_adds_noise_without_bias() -> None:
    from workers.lowdose import detector_line_integrals

    rng = np.random.default_rng(0)
    clean = detector_line_integrals(FLAT, Condition(photons=1000.0, blur=1e-9), rng)
    dark = detector_line_integrals(FLAT, Condition(photons=1000.0, dark=200.0), rng)
    assert abs(dark.mean() - 0.5) < 0.01
    assert dark.std() > 1.1 * clean.std()  # (606 + 200) / 606 the variance


def test_a_centre_error_shows_in_the_fbp_at_the_declared_centre() -> None:
    from workers.phantoms import make_phantom
    from workers.recon import recon

    size, angles = 48, 96
    clean, half, whole = render(
        3,
        2,
        size,
        angles,
        [Condition(), Condition(center_error=0.5), Condition(center_error=1.0)],
        family="granular",
    )
    half_error = np.abs(half.noisy - clean.noisy).mean()
    assert half_error > 0.05 * np.abs(clean.noisy).mean()  # half a pixel shows
    assert np.abs(whole.noisy - clean.noisy).mean() > 1.5 * half_error
    # Reconstructed about the true axis, the same projections give the clean slice back
    # (exactly but for the detector's edge at a whole pixel: no interpolation differs).
    theta = np.linspace(0.0, np.pi, angles, endpoint=False)
    phantom = make_phantom("granular", 2, size, seed=3)
    axis = size / 2 + 1.0
    true_axis = recon(phantom.project(theta, center=axis), theta, center=axis)
    assert np.abs(true_axis - clean.noisy).mean() < 0.2 * half_error
