"""Training end to end on a tiny synthesised data set: dataset -> train -> checkpoint/resume ->
export (TorchScript and torch.export) -> the service's engine -> `tomocast infer`/`evaluate`."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models.training.dataset import PatchSampler, load_one_file
from models.training.evaluate import evaluate, format_table
from models.training.export import export_checkpoint
from models.training.losses import ssim_loss
from models.training.synthesize import EVALUATION_SEED, conditions, synthesize
from models.training.train import TrainConfig, Trainer, resume
from service.cli import main
from service.errors import DataError, ModelError
from workers.denoise import adjacent_stack, load_denoiser

TINY = {"patch": 16, "batch": 4, "val_slices": 2, "val_every": 1000, "checkpoint_every": 1000}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    return synthesize(
        path,
        conditions(sparse=[4], photons=[1000]),
        phantoms=2,
        test_phantoms=1,
        rows=4,
        size=32,
        angles=48,
        progress=False,
        families=("foam",),
    )


@pytest.fixture(scope="module")
def checkpoint(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    trainer = Trainer(
        TrainConfig(steps=2, lambda_adv=0.0, **TINY), load_one_file(tiny), "cpu", command="pytest"
    )
    trainer.step()
    trainer.step()
    trainer.validate()
    return trainer.save(tmp_path_factory.mktemp("run") / "checkpoint.pt")


def test_dataset_is_the_one_file_form(tiny: Path) -> None:
    with h5py.File(tiny) as file:
        assert {"train_ns", "train_gt", "test_ns", "test_gt"} <= set(file)
        assert file["train_ns"].shape == (16, 32, 32)  # 2 phantoms x 2 conditions x 4 rows
        assert list(file["train_ns"].attrs["volume_rows"]) == [4, 4, 4, 4]
        assert list(file["test_ns"].attrs["seeds"]) == [2, 2]
    data = load_one_file(tiny)
    assert data.input_offset == pytest.approx(0.0, abs=1e-6)
    assert data.input_scale == pytest.approx(1 / (0.42 * 32), rel=0.02)  # the foam's mu
    assert data.reference_width == 32  # attenuation per pixel: the scale follows the width


def test_a_few_steps_lower_the_loss(tiny: Path) -> None:
    data = load_one_file(tiny)
    trainer = Trainer(
        TrainConfig(steps=12, lr=1e-3, lambda_adv=0.0, lambda_mse=1.0, **TINY), data, "cpu"
    )
    inputs, targets = PatchSampler(
        data.train, 3, 16, np.random.default_rng(7), augment=False
    ).batch(8)
    x = (torch.from_numpy(inputs) - data.input_offset) / data.input_scale
    y = (torch.from_numpy(targets) - data.input_offset) / data.input_scale

    def loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(trainer.generator(x), y))

    before = loss()
    losses = [trainer.step()["mse"] for _ in range(12)]
    assert loss() < 0.85 * before
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_ssim_term_trains_the_generator_towards_structure(tiny: Path) -> None:
    data = load_one_file(tiny)
    inputs, targets = PatchSampler(
        data.train, 3, 16, np.random.default_rng(7), augment=False
    ).batch(8)
    x = (torch.from_numpy(inputs) - data.input_offset) / data.input_scale
    y = (torch.from_numpy(targets) - data.input_offset) / data.input_scale

    def trained(lambda_ssim: float) -> tuple[float, list[dict[str, float]]]:
        config = TrainConfig(steps=12, lr=1e-3, lambda_adv=0.0, lambda_ssim=lambda_ssim, **TINY)
        trainer = Trainer(config, data, "cpu")
        steps = [trainer.step() for _ in range(12)]
        with torch.no_grad():
            return float(ssim_loss(trainer.generator(x), y)), steps

    mse_only, plain = trained(0.0)
    with_ssim, steps = trained(2.0)
    assert all("ssim" not in losses for losses in plain)
    for losses in steps:  # the step's loss is the weighted sum of its terms
        assert losses["loss"] == pytest.approx(losses["mse"] + 2.0 * losses["ssim"], rel=1e-5)
    # same seed, same batches: only the SSIM term makes the difference
    assert with_ssim < mse_only - 0.03
    with pytest.raises(ValueError, match="lambda_ssim"):
        TrainConfig(lambda_ssim=-1.0)


def test_a_flag_out_of_range_is_a_message(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flag, value in (("--lambda-ssim", "-1"), ("--depth", "2")):
        args = ["train", "--data", str(tiny), flag, value, "--out", str(tmp_path / "run")]
        assert main([*args, "--steps", "1", "--no-progress"]) != 0
        err = capsys.readouterr().err
        assert f"{flag.lstrip('-').replace('-', '_')}=" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_continues_exactly(tiny: Path, tmp_path: Path) -> None:
    """A step, checkpoint, resume, a step == two steps (WGAN-GP, D steps included)."""
    data = load_one_file(tiny)
    config = TrainConfig(steps=2, lambda_adv=1.0, lambda_mse=1.0, **TINY)
    straight = Trainer(config, data, "cpu")
    straight.step()
    straight.step()
    broken = Trainer(config, data, "cpu")
    broken.step()
    resumed = resume(broken.save(tmp_path / "c.pt"), data, "cpu")
    resumed.step()
    for name, value in straight.generator.state_dict().items():
        torch.testing.assert_close(resumed.generator.state_dict()[name], value, rtol=0, atol=0)
    assert resumed.discriminator is not None and straight.discriminator is not None
    torch.testing.assert_close(
        resumed.discriminator.state_dict(), straight.discriminator.state_dict(), rtol=0, atol=0
    )


def test_mixed_precision_step_on_cpu(tiny: Path) -> None:
    trainer = Trainer(
        TrainConfig(
            steps=1, precision="mixed", arch="unet", lambda_adv=1.0, adv="bce", d_steps=1, **TINY
        ),
        load_one_file(tiny),
        "cpu",
    )
    assert trainer.autocast_dtype == torch.bfloat16
    losses = trainer.step()
    assert all(np.isfinite(list(losses.values())))


@pytest.mark.gpu
@pytest.mark.parametrize("adv", ["wgan-gp", "bce"])
def test_mixed_precision_steps_on_cuda(tiny: Path, adv: str) -> None:
    """fp16 autocast with a GradScaler per network; under WGAN-GP the critic's gradient penalty
    is a double backward through fp16 activations. The penalty is taken of scaled gradients:
    while the scale is too high for fp16 it is inf, the scaler skips that critic step and
    halves the scale (PyTorch's AMP recipe), so only the last step's must be finite."""
    steps = 8
    trainer = Trainer(
        TrainConfig(
            steps=steps,
            precision="mixed",
            lambda_adv=1.0,
            lambda_mse=1.0,
            adv=adv,
            d_steps=1,
            **TINY,
        ),
        load_one_file(tiny),
        "cuda",
    )
    assert trainer.autocast_dtype == torch.float16
    assert trainer.g_scaler.is_enabled() and trainer.d_scaler.is_enabled()
    assert trainer.discriminator is not None
    networks = {"generator": trainer.generator, "discriminator": trainer.discriminator}
    before = {
        (net, name): value.detach().clone()
        for net, module in networks.items()
        for name, value in module.state_dict().items()
    }
    losses = [trainer.step() for _ in range(steps)]
    for step in losses:
        assert {"d", "gp", "loss", "mse", "adv"} <= set(step)
        assert all(np.isfinite(value) for name, value in step.items() if name != "gp"), step
    assert all(np.isfinite(list(losses[-1].values()))), losses[-1]
    assert losses[-1]["gp"] > 0 if adv == "wgan-gp" else losses[-1]["gp"] == 0
    for scaler in (trainer.g_scaler, trainer.d_scaler):
        assert np.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    for net, module in networks.items():
        state = module.state_dict()
        changed = [
            name
            for name, value in state.items()
            if value.is_floating_point() and not torch.equal(value, before[net, name])
        ]
        assert changed, f"no {net} weight changed in {steps} steps"
        assert all(
            bool(torch.isfinite(value).all())
            for value in state.values()
            if value.is_floating_point()
        )


def test_resume_refuses_other_data(checkpoint: Path, tmp_path: Path) -> None:
    other = synthesize(
        tmp_path / "other.h5",
        conditions(sparse=[2]),
        phantoms=1,
        test_phantoms=1,
        rows=2,
        size=16,
        angles=16,
        progress=False,
    )
    with pytest.raises(ModelError, match="was trained on"):
        resume(checkpoint, load_one_file(other), "cpu")


def test_export_load_infer_matches_the_eager_model(
    tiny: Path, checkpoint: Path, tmp_path: Path
) -> None:
    written = export_checkpoint(checkpoint, tmp_path / "out", name="tiny")
    assert [p.name for p in written] == ["tiny.pt", "tiny-fp16.pt", "tiny-fp16.pt2"]
    state = torch.load(checkpoint, weights_only=True)
    data = load_one_file(tiny)
    trainer = resume(checkpoint, data, "cpu")
    volume = torch.from_numpy(data.test.noisy[:4])
    stack = adjacent_stack(volume, 0, 4, 3)
    eager = trainer.predict(stack)[:, 0]
    for path in written:
        engine = load_denoiser(path)
        assert engine.metadata.arch == "tomogan" and engine.metadata.trained
        assert engine.metadata.input_scale == pytest.approx(state["input_scale"])
        assert engine.metadata.reference_width == data.train.shape[2] == state["reference_width"]
        assert "pytest" in engine.metadata.training.command
        assert engine.metadata.reference_level == pytest.approx(data.reference_level)
        # Factor 1: the training level, where the trainer's fixed mapping applies.
        np.testing.assert_allclose(
            engine.denoise(stack, scale=1.0).numpy(),
            eager.numpy(),
            rtol=1e-4,
            atol=1e-6 * data.input_scale,
        )
    out = tmp_path / "dn.h5"
    assert (
        main(
            [
                "infer",
                "--ld",
                str(tiny),
                "--model",
                str(written[2]),
                "-o",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with h5py.File(out) as file:
        np.testing.assert_array_equal(file["ns"][()], data.test.noisy)
        np.testing.assert_array_equal(file["gt"][()], data.test.target)
        # infer maps each volume by its own factor: the trainer's mapping scaled by it.
        factor = load_denoiser(written[2]).scale_for(volume)
        expected = trainer.predict(stack / factor)[:, 0] * factor
        np.testing.assert_allclose(
            file["dn"][:4], expected.numpy(), rtol=1e-4, atol=1e-6 * data.input_scale
        )


def test_two_file_form_trains_and_infers(tiny: Path, tmp_path: Path) -> None:
    data = load_one_file(tiny)
    low, normal = tmp_path / "low.h5", tmp_path / "normal.h5"
    for path, images in ((low, data.train.noisy), (normal, data.train.target)):
        with h5py.File(path, "w") as file:
            file.create_dataset("images", data=images)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "-ld",
                str(low),
                "-nd",
                str(normal),
                "--patch",
                "16",
                "--batch",
                "2",
                "--steps",
                "1",
                "--lambda-adv",
                "0",
                "--val-slices",
                "1",
                "--device",
                "cpu",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "export",
                str(run / "checkpoint.pt"),
                "-o",
                str(tmp_path),
                "--name",
                "two",
                "--formats",
                "fp32",
            ]
        )
        == 0
    )
    out = tmp_path / "dn.h5"
    assert (
        main(
            [
                "infer",
                "-ld",
                str(low),
                "-nd",
                str(normal),
                "--model",
                str(tmp_path / "two.pt"),
                "-o",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    with h5py.File(out) as file:
        assert file["dn"].shape == file["gt"].shape == data.train.noisy.shape
    # The images declare no units: their normalisation stays absolute at any width...
    assert load_denoiser(tmp_path / "two.pt").metadata.reference_width is None
    # ...unless the export says at which width it was fitted.
    assert (
        main(
            [
                "export",
                str(run / "checkpoint.pt"),
                "-o",
                str(tmp_path),
                "--name",
                "two-w",
                "--formats",
                "fp32",
                "--reference-width",
                "32",
            ]
        )
        == 0
    )
    assert load_denoiser(tmp_path / "two-w.pt").metadata.reference_width == 32


def test_export_reference_width_override(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for given, expected in ((None, 32), ("64", 64), ("0", None)):
        flag = [] if given is None else ["--reference-width", given]
        assert (
            main(
                [
                    "export",
                    str(checkpoint),
                    "-o",
                    str(tmp_path),
                    "--name",
                    "w",
                    "--formats",
                    "fp32",
                    *flag,
                ]
            )
            == 0
        )
        assert load_denoiser(tmp_path / "w.pt").metadata.reference_width == expected
    with pytest.raises(SystemExit) as refused:
        main(["export", str(checkpoint), "-o", str(tmp_path), "--reference-width", "-1"])
    assert refused.value.code == 2
    assert "--reference-width: -1 must be >= 0" in capsys.readouterr().err


def test_infer_output_scales_with_its_input(tiny: Path, checkpoint: Path, tmp_path: Path) -> None:
    # The same sample 4x as opaque (or imaged with pixels 4x as large): 4x the output.
    (artifact,) = export_checkpoint(checkpoint, tmp_path, name="tiny", formats=["fp32"])
    assert load_denoiser(artifact).metadata.reference_level is not None
    data = load_one_file(tiny)
    brighter = tmp_path / "brighter.h5"
    with h5py.File(tiny) as source, h5py.File(brighter, "w") as file:
        for name in ("test_ns", "test_gt"):
            file[name] = 4.0 * source[name][()]
            file[name].attrs["volume_rows"] = source[name].attrs["volume_rows"]
    outputs = []
    for low_dose in (tiny, brighter):
        out = tmp_path / f"dn-{low_dose.stem}.h5"
        # --field-width is accepted for old scripts and changes nothing.
        flags = ["--ld", str(low_dose), "--model", str(artifact), "-o", str(out)]
        flags += ["--field-width", "64"]
        assert main(["infer", *flags, "--no-progress", "--device", "cpu"]) == 0
        with h5py.File(out) as file:
            outputs.append(file["dn"][()])
    np.testing.assert_allclose(
        outputs[1], 4.0 * outputs[0], rtol=1e-4, atol=1e-5 * data.input_scale
    )


def test_init_starts_from_trained_weights(
    tiny: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = torch.load(checkpoint, weights_only=True)["generator"]
    (artifact,) = export_checkpoint(checkpoint, tmp_path, name="tiny", formats=["fp32"])
    data = load_one_file(tiny)
    for source in (checkpoint, artifact):  # a training checkpoint or a shipped-style artifact
        trainer = Trainer(
            TrainConfig(steps=1, lambda_adv=0.0, init=str(source), **TINY), data, "cpu"
        )
        for name, value in trainer.generator.state_dict().items():
            torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
        assert trainer.step_count == 0  # a new run: its own steps, optimiser and scale
    fresh = Trainer(TrainConfig(steps=1, lambda_adv=0.0, **TINY), data, "cpu")
    assert not torch.equal(fresh.generator.state_dict()["stem.0.weight"], trained["stem.0.weight"])
    with pytest.raises(
        ModelError, match="holds tomogan with depth 3; this run trains tomogan with depth 5"
    ):
        Trainer(TrainConfig(depth=5, init=str(artifact), **TINY), data, "cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="neither a model artifact"):
        Trainer(TrainConfig(init=str(junk), **TINY), data, "cpu")
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny),
                "--init",
                str(artifact),
                "--resume",
                str(checkpoint),
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--init" in capsys.readouterr().err


def test_infer_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("a", data=np.zeros((2, 8, 8), np.float32))
        file.create_dataset("b", data=np.zeros((2, 8, 8), np.float32))
    assert main(["infer", "-ld", str(path), "-o", str(tmp_path / "o.h5"), "--no-progress"]) == 2
    assert "no data set test_ns or images" in capsys.readouterr().err
    with pytest.raises(DataError, match="no data set 'c'"):
        from models.training.infer import read_noisy

        read_noisy(path, "c")


def test_evaluate_scores_fbp_and_the_denoiser(checkpoint: Path, tmp_path: Path) -> None:
    (artifact,) = export_checkpoint(checkpoint, tmp_path, name="tiny", formats=["fp32"])
    rows = evaluate(
        [artifact],
        seeds=[EVALUATION_SEED],
        rows=2,
        size=32,
        angles=32,
        sparse=[4],
        photons=[1000.0],
        progress=False,
    )
    assert [(r.condition, r.model) for r in rows] == [
        ("1/4 views", "tiny"),
        ("1,000 photons", "tiny"),
    ]
    assert all(np.isfinite([r.fbp_psnr, r.psnr, r.fbp_ssim, r.ssim]).all() for r in rows)
    assert "| 1/4 views | tiny |" in format_table(rows)


def test_level_per_volume_trains_every_volume_at_one_level(tmp_path: Path) -> None:
    import itertools

    from models.training.dataset import level_normalised
    from workers.intensity import intensity_level

    path = synthesize(
        tmp_path / "mixed.h5",
        conditions(sparse=[4], photons=[1000]),
        phantoms=2,
        test_phantoms=1,
        rows=4,
        size=32,
        angles=48,
        progress=False,
        families=("foam", "granular"),
        attenuation=(0.1, 10.0),
    )
    data = load_one_file(path)
    level = data.reference_level
    assert level is not None
    scaled = level_normalised(data)
    assert scaled.source == data.source  # a resumed run still recognises its data
    for pairs in (scaled.train, scaled.test):
        starts = np.cumsum((0, *pairs.volume_rows))
        for first, last in itertools.pairwise(starts):
            volume = torch.from_numpy(pairs.noisy[first:last])
            assert intensity_level(volume) == pytest.approx(level, rel=1e-4)
    config = TrainConfig(steps=2, lambda_adv=0.0, level_per_volume=True, **TINY)
    trainer = Trainer(config, data, "cpu", command="pytest")
    trainer.step()
    checkpoint = trainer.save(tmp_path / "run" / "checkpoint.pt")
    resumed = resume(checkpoint, data, "cpu", steps=3)
    assert resumed.config.level_per_volume and resumed.step_count == 1
    resumed.step()
    (artifact,) = export_checkpoint(
        resumed.save(checkpoint), tmp_path / "out", name="mixed", formats=["fp32"]
    )
    assert load_denoiser(artifact).metadata.reference_level == pytest.approx(level, rel=1e-4)


def test_the_retraining_recipe_runs(tmp_path: Path) -> None:
    # docs/model-card.md "Retraining the default": the same commands at toy sizes.
    data, run = tmp_path / "beamline.h5", tmp_path / "run"
    dataset = ["dataset", "-o", str(data), "--phantoms", "5", "--test-phantoms", "1"]
    dataset += ["--rows", "3", "--size", "32", "--angles", "48", "--sparse", "2,8,32"]
    dataset += ["--photons", "200,3000", "--combined", "--attenuation", "0.1,10"]
    dataset += ["--dark", "5", "--blur", "0.7", "--rings", "0.005", "--zingers", "0.0005"]
    dataset += ["--center-error", "0.3", "--effects-alone", "--seed", "0", "--no-progress"]
    assert main(dataset) == 0
    common = ["--data", str(data), "--device", "cpu", "--threads", "1", "--out", str(run)]
    common += ["--no-progress", "--val-every", "2", "--checkpoint-every", "2"]
    train = ["train", *common, "--arch", "tomogan", "--depth", "3", "--patch", "16"]
    train += ["--batch", "2", "--steps", "2", "--lr", "5e-4", "--lr-schedule", "cosine"]
    train += ["--lambda-adv", "0", "--lambda-mse", "1", "--precision", "fp32", "--seed", "0"]
    assert main([*train, "--level-per-volume"]) == 0
    checkpoint = run / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    assert main(["train", *common, "--resume", str(checkpoint), "--steps", "4"]) == 0
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 4 and state["config"]["level_per_volume"]
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), "-o", str(out), "--name", "beamline-d3"]) == 0
    assert load_denoiser(out / "beamline-d3.pt").metadata.reference_level is not None
