"""The shipped trained TomoGANs: load, say what they are, the fp16 and torch.export files are the
same network, and each denoises held-out phantoms (seeds no data set may use) better than plain
FBP by the margin its model card claims. The default (`workers.denoise.DEFAULT_MODEL`) is the
model trained on every training family; the foam model is kept beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.placeholder import shipped_weights_dir
from models.training.metrics import psnr, ssim
from tests.support.helpers import cudnn_flags
from workers.denoise import DEFAULT_MODEL, DenoiseEngine, adjacent_stack
from workers.lowdose import EVALUATION_SEED, Condition, render

FOAM = "tomogan-foam-d3"
TRAINED = (DEFAULT_MODEL, FOAM)


@pytest.fixture(scope="module")
def engines() -> dict[tuple[str, str], DenoiseEngine]:
    folder = shipped_weights_dir()
    return {
        (name, precision): DenoiseEngine(folder / f"{name}{suffix}")
        for name in TRAINED
        for precision, suffix in (("fp32", ".pt"), ("fp16", "-fp16.pt"))
    }


def test_the_default_is_the_model_trained_on_every_family() -> None:
    assert DEFAULT_MODEL == "tomogan-beamline-d3"


@pytest.mark.parametrize("name", TRAINED)
def test_metadata_says_what_it_is(engines: dict[tuple[str, str], DenoiseEngine], name: str) -> None:
    for precision in ("fp32", "fp16"):
        engine = engines[(name, precision)]
        metadata = engine.metadata
        assert (metadata.arch, metadata.depth, metadata.trained) == ("tomogan", 3, True)
        assert metadata.precision == precision
        assert metadata.name == Path(engine.path).stem
        assert metadata.input_offset == pytest.approx(0.0, abs=1e-4)
        assert metadata.reference_width == 256
        assert "tomocast train" in metadata.training.command
    metadata = engines[(name, "fp32")].metadata
    if name == FOAM:
        # Normalised by the foam's attenuation at 256 px: mu = 1 / (0.42 * 256); written before
        # the intensity level was recorded.
        assert metadata.input_scale == pytest.approx(1 / (0.42 * 256), rel=0.02)
        assert metadata.reference_level is None
    else:
        # Trained with --level-per-volume: every volume at one intensity level, recorded.
        assert metadata.reference_level is not None and metadata.reference_level > 0
        assert "--level-per-volume" in metadata.training.command


def test_convolutions_autotune_on_cuda(engines: dict[tuple[str, str], DenoiseEngine]) -> None:
    # cudnn.benchmark at run time cannot reach a trace: it must be baked in on.
    for engine in engines.values():
        assert cudnn_flags(engine.path) == {("1", "0", "1", "1")}


@pytest.mark.parametrize("name", TRAINED)
def test_fp16_file_is_the_same_network(
    engines: dict[tuple[str, str], DenoiseEngine], name: str
) -> None:
    stack = torch.rand(1, 3, 40, 48) * engines[(name, "fp32")].metadata.input_scale
    torch.testing.assert_close(
        engines[(name, "fp16")].denoise(stack),
        engines[(name, "fp32")].denoise(stack),
        rtol=0,
        atol=0,
    )


def test_the_torch_export_file_is_the_same_network(
    engines: dict[tuple[str, str], DenoiseEngine],
) -> None:
    # TorchScript is deprecated upstream: the default also ships as a torch.export program
    exported = DenoiseEngine(shipped_weights_dir() / f"{DEFAULT_MODEL}-fp16.pt2")
    reference = engines[(DEFAULT_MODEL, "fp32")]
    assert exported.metadata.name == f"{DEFAULT_MODEL}-fp16"
    stack = torch.rand(2, 3, 48, 40) * reference.metadata.input_scale
    torch.testing.assert_close(exported.denoise(stack), reference.denoise(stack), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "family", "seed", "size", "angles", "condition", "min_gain_db", "min_ssim"),
    [
        (FOAM, "foam", EVALUATION_SEED + 7, 256, 360, Condition(photons=200.0), 5.0, 0.7),
        # The same kind of sample on a 512-px detector has half the attenuation per pixel: the
        # engine's per-scan intensity factor must bring it to the trained level.
        (FOAM, "foam", EVALUATION_SEED + 8, 512, 720, Condition(sparse=16), 10.0, 0.8),
        # The default on families the foam model turned into foam (docs/model-card.md)
        (DEFAULT_MODEL, "foam", EVALUATION_SEED + 7, 256, 360, Condition(photons=200.0), 5.0, 0.5),
        (DEFAULT_MODEL, "granular", EVALUATION_SEED + 7, 256, 360, Condition(sparse=8), 3.0, 0.7),
        (
            DEFAULT_MODEL,
            "inclusions",
            EVALUATION_SEED + 7,
            256,
            360,
            Condition(photons=1000.0),
            5.0,
            0.7,
        ),
        # and on the family held out of its training
        (DEFAULT_MODEL, "cells", EVALUATION_SEED + 7, 256, 360, Condition(photons=200.0), 5.0, 0.5),
    ],
    ids=[
        "foam-model-256px-200-photons",
        "foam-model-512px-1/16-views",
        "default-foam-200-photons",
        "default-granular-1/8-views",
        "default-inclusions-1000-photons",
        "default-cells-held-out-200-photons",
    ],
)
def test_denoises_a_held_out_phantom(
    engines: dict[tuple[str, str], DenoiseEngine],
    name: str,
    family: str,
    seed: int,
    size: int,
    angles: int,
    condition: Condition,
    min_gain_db: float,
    min_ssim: float,
) -> None:
    (volume,) = render(seed, rows=3, size=size, angles=angles, chosen=[condition], family=family)
    noisy, truth = torch.from_numpy(volume.noisy), torch.from_numpy(volume.target)
    engine = engines[(name, "fp32")]
    denoised = engine.denoise(adjacent_stack(noisy, 1, 2, 3), scale=engine.scale_for(noisy))
    data_range = float(truth.max() - truth.min())
    gain = float(psnr(denoised, truth[1:2], data_range) - psnr(noisy[1:2], truth[1:2], data_range))
    assert gain > min_gain_db
    assert float(ssim(denoised, truth[1:2], data_range)) > min_ssim
    assert np.isfinite(denoised.numpy()).all()
