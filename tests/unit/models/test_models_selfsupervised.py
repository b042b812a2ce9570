"""Self-supervised adaptation (Noise2Inverse): the angle split, the pairs, one fine-tuning step,
and `tomocast train --self-supervised` on a real DXchange file, resumed and exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifact import load_artifact
from models.training.selfsupervised import (
    FBPChoice,
    adaptation_data,
    adapter,
    noise2inverse_pairs,
    read_scan,
    split_angles,
    subset_reconstructions,
)
from models.training.train import load_checkpoint
from service.cli import main
from service.errors import DataError
from service.sim.simulate import simulate_scan, write_dxchange
from workers.denoise import default_artifact_path, load_denoiser
from workers.intensity import intensity_level
from workers.recon import recon

SHIPPED = default_artifact_path("cpu")
TINY = {"patch": 16, "batch": 2, "val_slices": 2, "val_every": 1000, "checkpoint_every": 1000}


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw DXchange scan (darks, flats, uint16 counts) of a small foam."""
    scan = simulate_scan("tiny", rows=4, cols=32, n_angles=48, photons=500.0, seed=3)
    path = tmp_path_factory.mktemp("scan") / "scan.h5"
    write_dxchange(path, scan)
    return path


def test_split_angles_interleaves_every_angle_once() -> None:
    subsets = split_angles(11, 3)
    assert [s.tolist() for s in subsets] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(np.concatenate(subsets).tolist()) == list(range(11))
    with pytest.raises(ValueError, match="at least 2"):
        split_angles(10, 1)
    with pytest.raises(DataError, match="lower the subsets"):
        split_angles(5, 3)


def test_pairs_are_the_mean_of_the_others_and_the_held_out_one() -> None:
    rng = np.random.default_rng(0)
    reconstructions = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    inputs, targets = noise2inverse_pairs(reconstructions, field_of_view=False)
    for j in range(3):
        others = [reconstructions[i] for i in range(3) if i != j]
        np.testing.assert_allclose(inputs[j], (others[0] + others[1]) / 2, rtol=1e-6)
        np.testing.assert_array_equal(targets[j], reconstructions[j])


def test_targets_are_zero_outside_the_field_of_view_only() -> None:
    """The corners beyond the circle every angle sees get target 0 (what supervised training
    taught there); inside it the target is the held-out subset's FBP, and the inputs are the
    engine's, untouched."""
    n = 16
    rng = np.random.default_rng(1)
    reconstructions = rng.uniform(1.0, 2.0, (2, 3, n, n)).astype(np.float32)
    inputs, targets = noise2inverse_pairs(reconstructions)
    centre = (n - 1) / 2
    rows, cols = np.mgrid[:n, :n]
    inside = np.hypot(rows - centre, cols - centre) <= n / 2  # pixel centres within n/2
    assert 0 < (~inside).sum() < inside.sum()
    np.testing.assert_array_equal(targets[:, :, inside], reconstructions[:, :, inside])
    assert not targets[:, :, ~inside].any()
    np.testing.assert_array_equal(inputs[0], reconstructions[1])  # K = 2: the other one


def test_the_subsets_reconstruct_the_full_scan_between_them(scan_file: Path) -> None:
    # FBP is linear and weighs each angle by pi / the angles it has: the mean of two
    # half-scans' FBPs is the full scan's FBP.
    scan = read_scan(scan_file)
    halves = subset_reconstructions(scan, 2)
    full = recon(scan.sinogram, scan.theta, scan.center, device="cpu")
    assert halves.shape == (2, *full.shape)
    peak = float(np.abs(full).max())
    np.testing.assert_allclose(halves.mean(axis=0), full, atol=2e-3 * peak)
    # and each half is a reconstruction on its own, noisier than the full one
    assert np.std(halves[0] - full) > 0.01 * peak


def test_the_subsets_are_reconstructed_as_the_service_is_set_to(scan_file: Path) -> None:
    # the service's [worker] fbp_method, filter_name and circle_mask (service/adapt.py)
    scan = read_scan(scan_file)
    chosen = FBPChoice(method="direct", filter_name="shepp-logan", circle_mask=True)
    halves = subset_reconstructions(scan, 2, fbp=chosen)
    even = split_angles(len(scan.theta), 2)[0]
    expected = recon(
        scan.sinogram[even],
        scan.theta[even],
        scan.center,
        filter_name="shepp-logan",
        device="cpu",
        circle_mask=True,
        method="direct",
    )
    np.testing.assert_array_equal(halves[0], expected)
    plain = subset_reconstructions(scan, 2)[0]
    assert not np.allclose(plain, expected)  # the choice made a difference
    assert np.all(halves[:, :, 0, 0] == 0)  # outside the circle


def test_read_scan_flat_fields_raw_counts(scan_file: Path) -> None:
    truth = simulate_scan("tiny", rows=4, cols=32, n_angles=48, photons=500.0, seed=3)
    scan = read_scan(scan_file, rows=(1, 3))
    assert scan.shape == (48, 2, 32)
    assert scan.center == 16.0
    # Poisson at 500 photons: the line integrals are the phantom's within the counting noise
    error = scan.sinogram - truth.line_integrals[:, 1:3]
    assert abs(float(error.mean())) < 0.02
    assert float(error.std()) < 0.15
    with pytest.raises(DataError, match="not within"):
        read_scan(scan_file, rows=(3, 9))


def test_pairs_are_mapped_to_the_artifact_level(scan_file: Path) -> None:
    scan = read_scan(scan_file)
    data = adaptation_data(scan, SHIPPED)
    _, metadata = load_artifact(SHIPPED, "cpu")
    assert data.reference_level == metadata.level
    assert data.reference_width == metadata.reference_width
    assert (data.input_offset, data.input_scale) == (metadata.input_offset, metadata.input_scale)
    assert data.train.volume_rows == (4, 4)
    full = (data.train.noisy[:4] + data.train.target[:4]) / 2  # K = 2: input + target = 2 full
    level = intensity_level(torch.from_numpy(full))
    assert level == pytest.approx(metadata.level, rel=1e-4)


def test_one_step_fine_tunes_the_given_weights(scan_file: Path) -> None:
    scan = read_scan(scan_file)
    trainer = adapter(scan, SHIPPED, "cpu", steps=1, **TINY)
    _, metadata = load_artifact(SHIPPED, "cpu")
    start = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    shipped = load_artifact(SHIPPED, "cpu")[0].state_dict()
    assert all(torch.equal(start[k], shipped[k]) for k in start)
    losses = trainer.step()
    assert np.isfinite(losses["loss"]) and losses["loss"] > 0
    after = trainer.generator.state_dict()
    assert any(not torch.equal(start[k], after[k]) for k in start)
    assert trainer.config.arch == metadata.arch and trainer.config.lambda_adv == 0


def test_cli_adapts_resumes_and_exports(scan_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--self-supervised", str(scan_file), "--device", "cpu", "--no-progress"]
    common += ["--out", str(out), "--patch", "16", "--batch", "2", "--val-slices", "2"]
    assert main(["train", *common, "--init", str(SHIPPED), "--steps", "2", "--seconds", "60"]) == 0
    first = load_checkpoint(out / "checkpoint.pt")
    assert first["step"] == 2 and "self-supervised" in first["data"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["cpu_seconds"] > 0
    # resumed: the total grows, the record keeps both commands
    assert main(["train", *common, "--resume", str(out / "checkpoint.pt"), "--steps", "3"]) == 0
    resumed = load_checkpoint(out / "checkpoint.pt")
    assert resumed["step"] == 3 and resumed["command"].count(" && ") == 1
    assert main(["export", str(out / "checkpoint.pt"), "-o", str(tmp_path), "--name", "tiny",
                 "--formats", "fp32"]) == 0  # fmt: skip
    engine = load_denoiser(tmp_path / "tiny.pt", "cpu")
    _, shipped = load_artifact(SHIPPED, "cpu")
    assert engine.metadata.level == shipped.level
    assert engine.metadata.input_scale == shipped.input_scale
    stack = torch.from_numpy(recon(read_scan(scan_file).sinogram, np.linspace(0, np.pi, 48,
                             endpoint=False), 16.0, device="cpu"))[None, :3]  # fmt: skip
    assert torch.isfinite(engine.denoise(stack)).all()


def test_cli_refuses_training_data_with_a_scan(scan_file: Path, tmp_path: Path) -> None:
    flags = ["train", "--self-supervised", str(scan_file), "--data", str(scan_file)]
    assert main([*flags, "--out", str(tmp_path), "--no-progress"]) == 2


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_a_budget_of_seconds_stops_the_run(scan_file: Path, tmp_path: Path, clock: str) -> None:
    from models.training.selfsupervised import adapt

    trainer = adapter(read_scan(scan_file), SHIPPED, "cpu", steps=10_000, **TINY)
    summary = adapt(trainer, tmp_path, seconds=0.5, progress=False, clock=clock)
    assert 1 <= summary["steps"] < 10_000
    spent = summary["train_seconds"] if clock == "wall" else summary["cpu_seconds"]
    assert spent >= 0.5
    assert summary["validation"]["step"] == summary["total_steps"]


def test_head_only_tuning_freezes_the_rest(scan_file: Path) -> None:
    trainer = adapter(read_scan(scan_file), SHIPPED, "cpu", steps=1, tune="head", **TINY)
    before = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    trainer.step()
    after = trainer.generator.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed)


def test_nxtomo_and_dxchange_give_the_same_line_integrals(scan_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("nxtomo")
    from tests.integration.test_replay_nxtomo import write_nxtomo

    scan = simulate_scan("tiny", rows=4, cols=32, n_angles=48, photons=500.0, seed=3)
    write_nxtomo(tmp_path / "scan.nx", scan)
    nexus, exchange = read_scan(tmp_path / "scan.nx"), read_scan(scan_file)
    np.testing.assert_allclose(nexus.theta, exchange.theta, atol=1e-9)
    # the flats are averaged in another order: float32 rounding apart, the same
    np.testing.assert_allclose(nexus.sinogram, exchange.sinogram, atol=1e-5)
    assert nexus.center == exchange.center == 16.0
