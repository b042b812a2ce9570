"""The evaluation matrix on a tiny case set: scores against scikit-image's PSNR/SSIM on the same
arrays, tuning on validation phantoms only, verdicts, tables, JSON and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import models.training.matrix as matrix_module
from models.training.baselines import BASELINES, filter_slices
from models.training.evaluate import format_matrix, main, matrix_from_json, matrix_json
from models.training.infer import denoise_volumes
from models.training.matrix import VALIDATION_OFFSET, Case, Matrix, Score, evaluate_matrix
from workers.denoise import load_denoiser, placeholder_artifact_path
from workers.lowdose import EVALUATION_SEED, Condition, render
from workers.phantoms import HELD_OUT

TINY: dict[str, Any] = {
    "families": ["foam", HELD_OUT],
    "attenuations": [3.0],
    "sparse": [],
    "photons": [500.0],
    "rows": 2,
    "size": 32,
    "angles": 48,
    "validation_rows": 1,
    "baselines": ["gaussian"],
    "progress": False,
}


def _skimage_means(images: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    data_range = float(truth.max() - truth.min())
    pairs = list(zip(images, truth, strict=True))
    psnrs = [peak_signal_noise_ratio(t, i, data_range=data_range) for i, t in pairs]
    ssims = [structural_similarity(i, t, data_range=data_range) for i, t in pairs]
    return float(np.mean(psnrs)), float(np.mean(ssims))


@pytest.fixture(scope="module")
def tiny() -> tuple[Matrix, list[tuple[np.ndarray, np.ndarray]]]:
    """The tiny matrix, with the (noisy, truth) arrays of the scored and the validation phantoms
    that tune() was handed, recorded as it ran."""
    handed: list[tuple[np.ndarray, np.ndarray]] = []
    real_tune = matrix_module.tune

    def recording_tune(baseline: Any, noisy: np.ndarray, truth: np.ndarray) -> Any:
        handed.append((noisy.copy(), truth.copy()))
        return real_tune(baseline, noisy, truth)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matrix_module, "tune", recording_tune)
        matrix = evaluate_matrix([placeholder_artifact_path()], **TINY)
    return matrix, handed


def test_scores_are_scikit_images_on_the_same_arrays(tiny: tuple[Matrix, list[Any]]) -> None:
    matrix, _ = tiny
    engine = load_denoiser(placeholder_artifact_path(), "cpu")
    assert [(c.family, c.condition) for c in matrix.cases] == [
        ("foam", "500 photons"),
        (HELD_OUT, "500 photons"),
    ]
    for case in matrix.cases:
        (volume,) = render(
            EVALUATION_SEED, 2, 32, 48, [Condition(photons=500.0)], family=case.family,
            attenuation=3.0,
        )  # fmt: skip
        noisy, truth = volume.noisy, volume.target
        expected = _skimage_means(noisy, truth)
        np.testing.assert_allclose((case.fbp.psnr, case.fbp.ssim), expected, rtol=1e-5)
        (gaussian,) = case.classical
        sigma = float(gaussian.parameter.split()[-1]) if gaussian.parameter else 0.0
        blurred = filter_slices(BASELINES["gaussian"], noisy, sigma)
        np.testing.assert_allclose(
            (gaussian.psnr, gaussian.ssim), _skimage_means(blurred, truth), rtol=1e-5
        )
        denoised = denoise_volumes(engine, noisy, (2,), progress=False)
        (model,) = case.models
        assert model.method == "placeholder-smoothing"
        np.testing.assert_allclose(
            (model.psnr, model.ssim), _skimage_means(denoised, truth), rtol=1e-5
        )
        assert case.held_out == (case.family == HELD_OUT)
        assert case.attenuation == 3.0


def test_tuning_never_sees_a_scored_slice(tiny: tuple[Matrix, list[Any]]) -> None:
    matrix, handed = tiny
    assert len(handed) == len(matrix.cases)  # one baseline, tuned once per case
    for case, (noisy, truth) in zip(matrix.cases, handed, strict=True):
        assert set(case.validation_seeds).isdisjoint(case.seeds)
        assert case.validation_seeds == (EVALUATION_SEED + VALIDATION_OFFSET,)
        (scored,) = render(
            EVALUATION_SEED, 2, 32, 48, [Condition(photons=500.0)], family=case.family,
            attenuation=3.0,
        )  # fmt: skip
        (check,) = render(
            EVALUATION_SEED + VALIDATION_OFFSET, 1, 32, 48, [Condition(photons=500.0)],
            family=case.family, attenuation=3.0,
        )  # fmt: skip
        np.testing.assert_array_equal(noisy, check.noisy)
        np.testing.assert_array_equal(truth, check.target)
        for row in scored.target:
            assert not any(np.array_equal(row, t) for t in truth)


def _case(
    family: str, fbp: tuple[float, float], classical: float, model: tuple[float, float]
) -> Case:
    return Case(
        family, family == HELD_OUT, 1.0, "1/8 views", (EVALUATION_SEED,), (1,),
        Score("fbp", *fbp), (Score("gaussian", classical, 0.5, parameter="sigma 1"),),
        (Score("net", *model),),
    )  # fmt: skip


def test_verdicts_and_summary_counts() -> None:
    cases = (
        _case("foam", (10.0, 0.5), 15.0, (16.5, 0.9)),  # >= FBP, +1.5 dB over the best
        _case("foam", (10.0, 0.5), 15.0, (15.5, 0.9)),  # >= FBP, only +0.5 dB
        _case(HELD_OUT, (20.0, 0.5), 15.0, (21.5, 0.4)),  # SSIM below FBP's; FBP is the best
        _case(HELD_OUT, (20.0, 0.5), 15.0, (19.0, 0.6)),  # PSNR below FBP's
    )
    assert [c.best_classical.method for c in cases] == ["gaussian", "gaussian", "fbp", "fbp"]
    assert [c.no_worse_than_fbp("net") for c in cases] == [True, True, False, False]
    assert [c.beats_best_classical("net") for c in cases] == [True, False, True, False]
    (summary,) = Matrix(cases, {"rows": 1, "size": 8, "angles": 8, "validation_rows": 1}).summary()
    assert (summary.cases, summary.no_worse_than_fbp, summary.beats_best_classical) == (4, 2, 2)
    assert (summary.held_out_cases, summary.held_out_no_worse_than_fbp) == (2, 0)
    assert summary.held_out_beats_best_classical == 1


def test_table_and_json(tiny: tuple[Matrix, list[Any]]) -> None:
    matrix, _ = tiny
    table = format_matrix(matrix)
    assert f"| {HELD_OUT} (held out) | 3x | 500 photons |" in table
    assert "| foam | 3x | 500 photons |" in table
    assert "placeholder-smoothing: >= FBP / >= best + 1 dB" in table
    record = json.loads(json.dumps(matrix_json(matrix)))
    assert record["settings"]["held_out"] == HELD_OUT
    assert [c["family"] for c in record["cases"]] == ["foam", HELD_OUT]
    assert record["cases"][1]["held_out"] is True
    assert record["summary"][0]["cases"] == 2
    assert set(record["cases"][0]["verdicts"]["placeholder-smoothing"]) == {
        "no_worse_than_fbp",
        "beats_best_classical",
    }


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch_threads = torch.get_num_threads()
    out, record = tmp_path / "table.md", tmp_path / "scores.json"
    argv = [
        "--model", str(placeholder_artifact_path()), "--families", "layered", "--attenuations",
        "1", "--sparse", "4", "--photons", "", "--rows", "1", "--size", "32", "--angles", "32",
        "--baselines", "none", "--no-progress", "--out", str(out), "--json", str(record),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "| layered | 1x | 1/4 views |" in capsys.readouterr().out
    assert "| layered | 1x | 1/4 views |" in out.read_text()
    assert len(json.loads(record.read_text())["cases"]) == 1
    assert main(["--families", "bone", "--no-progress"]) == 2
    assert "choose from" in capsys.readouterr().err
    assert main(["--seeds", "5", "--no-progress"]) == 2
    assert "training data" in capsys.readouterr().err
    assert torch.get_num_threads() == torch_threads


def test_runs_over_split_families_merge_into_one_matrix(
    tiny: tuple[Matrix, list[Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    matrix, _ = tiny
    whole = matrix_json(matrix)
    parts = []
    for family in ("foam", HELD_OUT):  # as two processes would have written them
        part = json.loads(json.dumps(whole))
        part["cases"] = [c for c in part["cases"] if c["family"] == family]
        part["settings"]["families"] = [family]
        parts.append(part)
    merged = matrix_from_json(parts)
    # as text: NaN (no detail score) is not equal to itself
    assert json.dumps(matrix_json(merged)) == json.dumps(whole)
    assert merged.summary() == matrix.summary()
    assert format_matrix(merged) == format_matrix(matrix)
    files = []
    for n, part in enumerate(parts):
        files.append(tmp_path / f"part{n}.json")
        files[-1].write_text(json.dumps(part))
    assert main(["--merge", *map(str, files), "--json", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["summary"] == whole["summary"]
    assert format_matrix(matrix) in capsys.readouterr().out
    parts[1]["settings"]["rows"] = 99  # another run's settings: not one matrix
    with pytest.raises(ValueError, match="rows"):
        matrix_from_json(parts)
