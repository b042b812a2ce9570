"""The shipped trained TomoGAN: loads, says what it is, and denoises a held-out foam phantom
(a seed no data set may use) better than plain FBP by the margin its model card claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.placeholder import shipped_weights_dir
from models.training.metrics import psnr, ssim
from tests.support.helpers import cudnn_flags
from workers.denoise import DenoiseEngine, adjacent_stack
from workers.lowdose import EVALUATION_SEED, Condition, render

TRAINED = "tomogan-foam-d3"


@pytest.fixture(scope="module")
def engines() -> dict[str, DenoiseEngine]:
    folder = shipped_weights_dir()
    return {
        precision: DenoiseEngine(folder / f"{TRAINED}{suffix}.pt")
        for precision, suffix in (("fp32", ""), ("fp16", "-fp16"))
    }


def test_metadata_says_what_it_is(engines: dict[str, DenoiseEngine]) -> None:
    for precision, engine in engines.items():
        metadata = engine.metadata
        assert (metadata.arch, metadata.depth, metadata.trained) == ("tomogan", 3, True)
        assert metadata.precision == precision
        assert metadata.name == Path(engine.path).stem
        # Normalised by the foam's attenuation at 256 px: mu = 1 / (0.42 * 256).
        assert metadata.input_offset == pytest.approx(0.0, abs=1e-4)
        assert metadata.input_scale == pytest.approx(1 / (0.42 * 256), rel=0.02)
        assert metadata.reference_width == 256  # and scaled as 256 / width at other widths
        assert "tomocast train" in metadata.training.command


def test_convolutions_autotune_on_cuda(engines: dict[str, DenoiseEngine]) -> None:
    # cudnn.benchmark at run time cannot reach a trace: it must be baked in on.
    for engine in engines.values():
        assert cudnn_flags(engine.path) == {("1", "0", "1", "1")}


def test_fp16_file_is_the_same_network(engines: dict[str, DenoiseEngine]) -> None:
    stack = torch.rand(1, 3, 40, 48) * engines["fp32"].metadata.input_scale
    torch.testing.assert_close(
        engines["fp16"].denoise(stack), engines["fp32"].denoise(stack), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("seed", "size", "angles", "condition", "min_gain_db", "min_ssim"),
    [
        (EVALUATION_SEED + 7, 256, 360, Condition(photons=200.0), 5.0, 0.7),
        # The same kind of sample on a 512-px detector has half the attenuation per pixel: the
        # engine must rescale its normalisation to the width, or the output is about zero.
        (EVALUATION_SEED + 8, 512, 720, Condition(sparse=16), 10.0, 0.8),
    ],
    ids=["256px-200-photons", "512px-1/16-views"],
)
def test_denoises_a_held_out_phantom(
    engines: dict[str, DenoiseEngine],
    seed: int,
    size: int,
    angles: int,
    condition: Condition,
    min_gain_db: float,
    min_ssim: float,
) -> None:
    (volume,) = render(seed, rows=3, size=size, angles=angles, chosen=[condition])
    noisy, truth = torch.from_numpy(volume.noisy), torch.from_numpy(volume.target)
    denoised = engines["fp32"].denoise(adjacent_stack(noisy, 1, 2, 3))
    mu = float(truth.max())
    gain = float(psnr(denoised, truth[1:2], mu) - psnr(noisy[1:2], truth[1:2], mu))
    assert gain > min_gain_db
    assert float(ssim(denoised, truth[1:2], mu)) > min_ssim
    assert np.isfinite(denoised.numpy()).all()
