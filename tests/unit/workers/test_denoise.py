"""The denoise engine: adjacent-slice stacks, the Denoiser protocol, padding, normalisation,
precisions against fp32, batching and the memory limit (tiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import workers.denoise as denoise_module
from models.artifact import ModelMetadata, save_artifact
from models.placeholder import PlaceholderSmoothing, placeholder_metadata
from models.tomogan import TomoGANGenerator
from models.training.metrics import psnr
from service.errors import ModelError
from workers.denoise import (
    DenoiseEngine,
    adjacent_stack,
    cpu_has_bf16,
    default_artifact_path,
    load_denoiser,
    placeholder_artifact_path,
    resolve_precision,
)
from workers.lowdose import EVALUATION_SEED
from workers.protocols import Denoiser
from workers.quantize import CONDITIONS, QuantizationError, calibration_units, foam_stacks


class CentrePlus(nn.Module):
    """Centre slice plus a constant, in the network's (normalised) units."""

    def __init__(self, depth: int, add: float) -> None:
        super().__init__()
        self.centre, self.add = depth // 2, add

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return stack[:, self.centre : self.centre + 1] + self.add


def _metadata(**changes: object) -> ModelMetadata:
    return placeholder_metadata().model_copy(update={"name": "test-model", **changes})


def _numpy_adjacent(volume: np.ndarray, start: int, stop: int, depth: int) -> np.ndarray:
    half = depth // 2
    rows = volume.shape[0]
    out = [
        [volume[min(max(r + k, 0), rows - 1)] for k in range(-half, half + 1)]
        for r in range(start, stop)
    ]
    return np.asarray(out, dtype=volume.dtype).reshape(stop - start, depth, *volume.shape[1:])


@pytest.mark.parametrize("depth", [1, 3, 5, 9])
@pytest.mark.parametrize(("start", "stop"), [(0, 7), (0, 1), (2, 5), (6, 7), (3, 3)])
def test_adjacent_stack_replicates_edges(depth: int, start: int, stop: int) -> None:
    volume = np.random.default_rng(0).normal(size=(7, 4, 5)).astype(np.float32)
    got = adjacent_stack(torch.from_numpy(volume), start, stop, depth)
    assert got.shape == (stop - start, depth, 4, 5)
    np.testing.assert_array_equal(got.numpy(), _numpy_adjacent(volume, start, stop, depth))


def test_adjacent_stack_centre_channel_is_the_row() -> None:
    volume = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 2, 2).contiguous()
    stack = adjacent_stack(volume, 0, 5, 3)
    assert stack[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]


@pytest.mark.parametrize(
    ("start", "stop", "depth", "message"),
    [
        (0, 3, 2, "must be odd"),
        (0, 3, 0, "must be odd"),
        (-1, 3, 3, "start=-1"),
        (2, 1, 3, "start=2 stop=1"),
        (0, 8, 3, "stop=8 rows=7"),
    ],
)
def test_adjacent_stack_refuses(start: int, stop: int, depth: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        adjacent_stack(torch.zeros(7, 2, 2), start, stop, depth)


@pytest.fixture
def placeholder() -> DenoiseEngine:
    return load_denoiser(placeholder_artifact_path(), "cpu")


def test_engine_satisfies_denoiser_protocol(placeholder: DenoiseEngine) -> None:
    assert isinstance(placeholder, Denoiser)
    assert placeholder.name == "placeholder-smoothing"
    assert placeholder.depth == 3
    assert placeholder.device == torch.device("cpu")
    assert placeholder.dtype == torch.float32  # the reference on the CPU: fp32
    assert placeholder.precision == "fp32"
    assert placeholder.path == placeholder_artifact_path()


def test_the_default_is_the_shipped_trained_model() -> None:
    engine = load_denoiser(None, "cpu")
    assert engine.path == default_artifact_path("cpu")
    assert engine.metadata.trained and engine.metadata.arch == "tomogan"
    assert default_artifact_path("cuda").name.endswith("-fp16.pt")
    assert default_artifact_path("cuda").is_file()


@pytest.mark.parametrize(("height", "width"), [(37, 29), (8, 16), (3, 5), (1, 1), (64, 9)])
def test_engine_preserves_shape(placeholder: DenoiseEngine, height: int, width: int) -> None:
    stack = torch.rand(2, 3, height, width)
    out = placeholder.denoise(stack)
    assert out.shape == (2, height, width)
    assert out.dtype == torch.float32 and out.is_contiguous()
    out.mul_(2)  # an ordinary tensor: the pipeline may reuse it in place


def test_engine_matches_eager_placeholder(placeholder: DenoiseEngine) -> None:
    stack = torch.rand(4, 3, 40, 24)  # multiples of 8: no padding, so no border difference
    expected = PlaceholderSmoothing()(stack)[:, 0]
    np.testing.assert_allclose(placeholder.denoise(stack).numpy(), expected.numpy(), atol=1e-6)


def test_padding_only_touches_the_border(placeholder: DenoiseEngine) -> None:
    stack = torch.rand(1, 3, 37, 29)
    expected = PlaceholderSmoothing()(stack)[:, 0]
    got = placeholder.denoise(stack)
    # The 5x5 kernel reaches 2 px: only the bottom/right 2 px see the padding.
    np.testing.assert_allclose(got[:, :-2, :-2].numpy(), expected[:, :-2, :-2].numpy(), atol=1e-6)


@pytest.mark.parametrize(("offset", "scale"), [(0.0, 1.0), (1000.0, 50.0), (-0.02, 1e-3)])
def test_normalisation_round_trip(tmp_path: Path, offset: float, scale: float) -> None:
    path = save_artifact(
        CentrePlus(3, 0.0), _metadata(input_offset=offset, input_scale=scale), tmp_path / "i.pt"
    )
    engine = DenoiseEngine(path, "cpu")
    stack = offset + scale * torch.randn(2, 3, 21, 30)
    np.testing.assert_allclose(
        engine.denoise(stack).numpy(),
        stack[:, 1].numpy(),
        rtol=1e-5,
        atol=1e-6 * abs(offset) + 1e-6 * scale,
    )


def test_network_output_is_mapped_back_to_physical_units(tmp_path: Path) -> None:
    # +1 in the network's units must come back as +input_scale x the scan's factor.
    path = save_artifact(
        CentrePlus(3, 1.0), _metadata(input_offset=7.0, input_scale=50.0), tmp_path / "p.pt"
    )
    engine = DenoiseEngine(path, "cpu")
    stack = torch.randn(1, 3, 16, 16)
    for factor in (1.0, 0.25, 4.0):
        out = engine.denoise(stack, scale=factor)
        np.testing.assert_allclose(
            out.numpy(), (stack[:, 1] + 50.0 * factor).numpy(), rtol=1e-6, atol=1e-4
        )
    with pytest.raises(ValueError, match=r"scale=0\.0"):
        engine.denoise(stack, scale=0.0)


def test_scale_for_maps_the_scan_to_the_training_level(tmp_path: Path) -> None:
    path = save_artifact(
        CentrePlus(3, 0.0),
        _metadata(input_offset=0.0, input_scale=2.0, reference_level=0.5),
        tmp_path / "l.pt",
    )
    engine = DenoiseEngine(path, "cpu")
    volume = torch.full((4, 32, 32), 0.5)
    assert engine.scale_for(volume) == pytest.approx(1.0)
    assert engine.scale_for(3.0 * volume) == pytest.approx(3.0)
    assert engine.scale_for(torch.zeros(2, 3, 16, 16)) == 1.0  # warm-up zeros: no level
    # Files written before reference_level: offset + scale, the targets' fitted high end.
    assert _metadata(input_offset=0.5, input_scale=2.0).level == 2.5


def test_field_width_is_checked_and_no_longer_scales(tmp_path: Path) -> None:
    path = save_artifact(
        CentrePlus(3, 1.0),
        _metadata(input_offset=0.0, input_scale=50.0, reference_width=32),
        tmp_path / "f.pt",
    )
    stack = torch.randn(1, 3, 16, 32)
    out = DenoiseEngine(path, "cpu", field_width=64).denoise(stack, scale=1.0)
    np.testing.assert_allclose(out.numpy(), (stack[:, 1] + 50.0).numpy(), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="field_width=0"):
        DenoiseEngine(path, "cpu", field_width=0)


def test_engine_runs_tomogan_on_odd_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    metadata = _metadata(name="tomogan-random", arch="tomogan", depth=5)
    path = save_artifact(TomoGANGenerator(depth=5), metadata, tmp_path / "g.pt")
    engine = load_denoiser(path, "cpu", warmup_shape=(1, 16, 16))
    assert engine.depth == 5 and engine.name == "tomogan-random"
    assert engine.denoise(torch.rand(2, 5, 45, 31)).shape == (2, 45, 31)


def test_engine_refuses_wrong_stacks(placeholder: DenoiseEngine) -> None:
    with pytest.raises(ValueError, match="depth=3"):
        placeholder.denoise(torch.zeros(1, 5, 16, 16))
    with pytest.raises(ValueError, match="depth=3"):
        placeholder.denoise(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="float32"):
        placeholder.denoise(torch.zeros(1, 3, 16, 16, dtype=torch.float64))


def test_load_denoiser_names_a_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"missing\.pt does not exist"):
        load_denoiser(tmp_path / "missing.pt", "cpu")


@pytest.mark.gpu
def test_cuda_fp16_engine_matches_cpu() -> None:
    cpu = load_denoiser(None, "cpu")
    cuda = load_denoiser(None, "cuda", warmup_shape=(2, 64, 64))
    assert cuda.dtype == torch.float16 and cuda.device.type == "cuda"
    stack = torch.rand(2, 3, 61, 53)
    out = cuda.denoise(stack.cuda())
    assert out.dtype == torch.float32 and out.device == cuda.device
    # fp16 keeps ~3 significant digits of the normalised values (here in [0, 1]).
    np.testing.assert_allclose(out.cpu().numpy(), cpu.denoise(stack).numpy(), atol=2e-3)


# ---- precision, batching and the memory limit ---------------------------------------------------

# What each precision promises against fp32, in units of the data range (the phantom's [0, 1]),
# on held-out foam FBP slices (workers.quantize.foam_stacks, six low-dose conditions), wherever
# fp32 denoises to at least USEFUL_DB against the phantom; inputs at the values the engine
# feeds (`workers.quantize.calibration_units`). int8 measured there (128-512 px),
# tomogan-foam-d3: rms 0.0036-0.0063, max 0.04-0.09, PSNR 0.00-0.26 dB below fp32's;
# tomogan-beamline-d3 (128, 256 px; `python tools/int8_units.py`): rms 0.006-0.008, max
# 0.05-0.09, PSNR within 0.1 dB. Below
# USEFUL_DB (noise far beyond the training data, fp32 itself at 1-7 dB) int8 strays more (rms up
# to 0.45) but was never further from the phantom than fp32. bf16 (8-bit mantissa): measured rms
# 0.002.
INT8_RMS, INT8_MAX, INT8_PSNR_LOSS_DB, USEFUL_DB = 0.01, 0.15, 0.5, 15.0
BF16_RMS, BF16_MAX = 0.01, 0.05


def _physical(engine: DenoiseEngine, stacks: torch.Tensor) -> torch.Tensor:
    """Network units -> physical units at the training level (denoise(..., scale=1.0))."""
    offset, scale = engine.metadata.scaled(1.0)
    return offset + scale * stacks


def _network_units(engine: DenoiseEngine, slices: torch.Tensor) -> torch.Tensor:
    offset, scale = engine.metadata.scaled(1.0)
    return (slices - offset) / scale


@pytest.fixture(scope="module")
def shipped() -> dict[str, DenoiseEngine]:
    return {
        "fp32": load_denoiser(None, "cpu"),
        "int8": load_denoiser(None, "cpu", precision="auto"),
    }


def test_precisions_on_this_cpu(
    shipped: dict[str, DenoiseEngine], placeholder: DenoiseEngine
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tomogan, smoothing = shipped["fp32"].metadata, placeholder.metadata
    # The default (artifact) is the reference: fp32 on the CPU, the artifact's on CUDA.
    assert shipped["fp32"].precision == "fp32" and shipped["fp32"].dtype == torch.float32
    assert resolve_precision("artifact", cuda, tomogan) == tomogan.precision
    # auto is the fastest within the tolerances below: int8 for TomoGAN on the CPU; bf16 for a
    # network int8 cannot take, where the CPU computes bf16 natively (not this AVX2 one).
    assert shipped["int8"].precision == "int8" and shipped["int8"].dtype == torch.qint8
    assert resolve_precision("auto", cpu, smoothing) == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("auto", cuda, tomogan) == tomogan.precision
    with pytest.raises(ModelError, match="precision='fp8'"):
        resolve_precision("fp8", torch.device("cpu"), placeholder.metadata)


def test_int8_is_refused_where_it_cannot_run(placeholder: DenoiseEngine) -> None:
    with pytest.raises(ModelError, match="no int8 graph for arch='placeholder'"):
        load_denoiser(placeholder_artifact_path(), "cpu", precision="int8")


def test_int8_calibrates_once_per_artifact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first = load_denoiser(None, "cpu", precision="int8")
    calls: list[str] = []
    real = denoise_module.quantize_int8

    def counted(module: nn.Module, arch: str, depth: int) -> tuple[nn.Module, object]:
        calls.append(arch)
        return real(module, arch, depth)

    monkeypatch.setattr(denoise_module, "quantize_int8", counted)
    again = load_denoiser(None, "cpu", precision="int8")
    copy = tmp_path / "same-weights.pt"  # another path, the same bytes
    copy.write_bytes(default_artifact_path("cpu").read_bytes())
    elsewhere = load_denoiser(copy, "cpu", precision="int8")
    assert calls == [] and again._module is first._module and elsewhere._module is first._module
    monkeypatch.setattr(denoise_module, "_INT8_CACHE", type(denoise_module._INT8_CACHE)())
    fresh = load_denoiser(copy, "cpu", precision="int8")
    assert calls == ["tomogan"] and fresh._module is not first._module


def test_a_refused_int8_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def refused(module: nn.Module, arch: str, depth: int) -> tuple[nn.Module, object]:
        calls.append(arch)
        raise QuantizationError("strays")

    monkeypatch.setattr(denoise_module, "_INT8_CACHE", type(denoise_module._INT8_CACHE)())
    monkeypatch.setattr(denoise_module, "quantize_int8", refused)
    engines = [load_denoiser(None, "cpu", precision="auto") for _ in range(2)]
    assert [e.precision for e in engines] == ["fp32", "fp32"] and calls == ["tomogan"] * 2
    assert not denoise_module._INT8_CACHE


@pytest.mark.parametrize("size", [128, 256])
def test_int8_matches_fp32_within_tolerance(shipped: dict[str, DenoiseEngine], size: int) -> None:
    stacks, truth = foam_stacks(3, seed=EVALUATION_SEED + 11, rows=3, size=size)
    # the values the engine feeds the network (a scan at the trained level), compared in units
    # of the phantom's range
    metadata = shipped["fp32"].metadata
    units = calibration_units(metadata.reference_level, metadata.input_scale)
    fp32, int8 = (
        _network_units(
            shipped[p], shipped[p].denoise(_physical(shipped[p], stacks * units), scale=1.0)
        )
        / units
        for p in ("fp32", "int8")
    )
    useful = 0
    for part in torch.arange(len(stacks)).chunk(len(CONDITIONS)):  # one condition each
        reference_db = float(psnr(fp32[part], truth[part], 1.0).mean())
        loss = reference_db - float(psnr(int8[part], truth[part], 1.0).mean())
        assert loss <= INT8_PSNR_LOSS_DB
        if reference_db >= USEFUL_DB:
            useful += 1
            difference = int8[part] - fp32[part]
            assert float(difference.pow(2).mean().sqrt()) <= INT8_RMS
            assert float(difference.abs().max()) <= INT8_MAX
    assert useful >= 4


def test_bf16_matches_fp32_within_tolerance(shipped: dict[str, DenoiseEngine]) -> None:
    bf16 = load_denoiser(None, "cpu", precision="bf16")
    assert bf16.dtype == torch.bfloat16
    stacks, _ = foam_stacks(3, seed=EVALUATION_SEED + 12, rows=3, size=64)
    reference = shipped["fp32"]
    expected = _network_units(reference, reference.denoise(_physical(reference, stacks), scale=1.0))
    got = _network_units(bf16, bf16.denoise(_physical(bf16, stacks), scale=1.0))
    assert float((got - expected).pow(2).mean().sqrt()) <= BF16_RMS
    assert float((got - expected).abs().max()) <= BF16_MAX


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_batch_is_its_slices_one_by_one(
    shipped: dict[str, DenoiseEngine], precision: str
) -> None:
    engine = shipped[precision]
    stacks = _physical(engine, torch.rand(4, 3, 40, 56, generator=torch.Generator().manual_seed(5)))
    # One scan, one factor: the batch's, handed to each slice's call.
    factor = engine.scale_for(stacks)
    batched = engine.denoise(stacks, scale=factor)
    single = torch.cat([engine.denoise(stacks[i : i + 1], scale=factor) for i in range(4)])
    np.testing.assert_allclose(
        batched.numpy(), single.numpy(), rtol=0, atol=1e-5 * engine.metadata.input_scale
    )


@pytest.mark.parametrize(
    ("precision", "limit_pixels", "atol"),
    [
        ("fp32", 2 * 64 * 64, 1e-5),  # two slices per call: batch split
        ("fp32", 120 * 120, 1e-5),  # tiles (core 8 px + 56 px halo)
        ("int8", 130 * 130, 1e-3),
    ],
)
def test_memory_limit_gives_the_whole_batch_result(
    precision: str, limit_pixels: int, atol: float
) -> None:
    from workers.denoise import BYTES_PER_PIXEL

    whole = load_denoiser(None, "cpu", precision=precision)
    limited = load_denoiser(
        None,
        "cpu",
        precision=precision,
        memory_limit_bytes=limit_pixels * BYTES_PER_PIXEL[precision],
    )
    assert limited.halo == 56  # TomoGAN's measured receptive field, on the 8 px grid
    stacks, _ = foam_stacks(3, seed=EVALUATION_SEED + 13, rows=3, size=64)
    stacks = _physical(whole, torch.cat([stacks, stacks.flip(-1)])[:5, :, :61, :59])
    expected = whole.denoise(stacks)
    got = limited.denoise(stacks)
    # In the network's units (the phantom spans [0, 1]): fp32 differs by rounding only.
    np.testing.assert_allclose(
        _network_units(whole, got).numpy(),
        _network_units(whole, expected).numpy(),
        rtol=0,
        atol=atol,
    )


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_result() -> None:
    graphs = load_denoiser(None, "cuda", warmup_shape=(2, 64, 64))
    eager = DenoiseEngine(default_artifact_path("cuda"), "cuda", (2, 64, 64), cuda_graphs=False)
    scale = eager.metadata.normalisation(64)[1]
    stack = (torch.rand(2, 3, 64, 64) * scale).cuda()
    first = graphs.denoise(stack)
    second = graphs.denoise(stack * 0.5)  # a replay must not overwrite the first result
    assert graphs.graph_cache is not None and not graphs.graph_cache.disabled
    assert graphs.graph_cache.shapes >= 1  # replayed, not fallen back to eager
    # Two engines may autotune to different cuDNN algorithms: fp16 rounding apart, no more.
    torch.testing.assert_close(first, eager.denoise(stack), rtol=0, atol=5e-3 * scale)
    torch.testing.assert_close(second, eager.denoise(stack * 0.5), rtol=0, atol=5e-3 * scale)


@pytest.mark.gpu
def test_cuda_memory_limit_tiles_give_the_whole_slice() -> None:
    whole = load_denoiser(None, "cuda", warmup_shape=(1, 256, 256))
    tiled = load_denoiser(None, "cuda", warmup_shape=(1, 256, 256), memory_limit_bytes=1 << 24)
    scale = whole.metadata.normalisation(1024)[1]
    stack = (torch.rand(1, 3, 1024, 1024) * scale).cuda()
    assert tiled.halo > 0
    difference = (tiled.denoise(stack) - whole.denoise(stack)).abs().cpu().numpy() / scale
    # fp16, with other kernels per tile shape: rounding apart (a seam would be ~0.1 or more)
    assert float(difference.max()) <= 1e-2 and float(difference.mean()) <= 1e-3


# ---- scale equivariance -------------------------------------------------------------------------

FACTORS = (0.05, 0.3, 3.0, 20.0)


@pytest.fixture(scope="module")
def family_stacks() -> dict[str, torch.Tensor]:
    """(rows, 3, 64, 64) low-dose FBP stacks (1/8 views, 1,000 photons) of one phantom per
    family, in physical units (attenuation per pixel), from evaluation seeds."""
    from workers.denoise import adjacent_stack
    from workers.lowdose import Condition, render

    stacks = {}
    for family in ("foam", "granular", "fibres", "cells"):
        (volume,) = render(EVALUATION_SEED + 21, 3, 64, 96, [Condition(8, 1000.0)], family=family)
        stacks[family] = adjacent_stack(torch.from_numpy(volume.noisy), 0, 3, 3)
    return stacks


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(rms, max) of got - expected over the range of expected."""
    span = float(expected.max() - expected.min())
    difference = (got - expected) / span
    return float(difference.pow(2).mean().sqrt()), float(difference.abs().max())


@pytest.mark.parametrize("family", ["foam", "granular", "fibres", "cells"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_denoise_is_scale_equivariant(
    shipped: dict[str, DenoiseEngine],
    family_stacks: dict[str, torch.Tensor],
    family: str,
    precision: str,
) -> None:
    engine = shipped[precision]
    stack = family_stacks[family]
    reference = engine.denoise(stack)
    factor = engine.scale_for(stack)
    for k in FACTORS:
        assert engine.scale_for(k * stack) == pytest.approx(k * factor, rel=1e-5)
        rms, largest = _relative_error(engine.denoise(k * stack) / k, reference)
        # fp32: rounding only. int8: a rounding difference may flip an activation's bin.
        if precision == "fp32":
            assert rms <= 1e-5 and largest <= 1e-4
        else:
            assert rms <= INT8_RMS and largest <= INT8_MAX


def test_equivariance_holds_with_an_offset(tmp_path: Path) -> None:
    # The offset follows the factor, so a model fitted with offset != 0 stays equivariant.
    torch.manual_seed(0)
    metadata = _metadata(arch="tomogan", input_offset=0.003, input_scale=0.01)
    engine = DenoiseEngine(save_artifact(TomoGANGenerator(depth=3), metadata, tmp_path / "o.pt"))
    stack = 0.01 * torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))
    reference = engine.denoise(stack)
    for k in FACTORS:
        # Random weights give a nearly flat output: compare with the input's level instead.
        got = engine.denoise(k * stack) / k
        np.testing.assert_allclose(got.numpy(), reference.numpy(), rtol=0, atol=1e-5 * 0.01)


def test_one_factor_per_scan_keeps_slices_apart_from_their_neighbours(
    shipped: dict[str, DenoiseEngine], family_stacks: dict[str, torch.Tensor]
) -> None:
    # A scan's factor handed to every call: a slice's result does not depend on its batch.
    engine = shipped["fp32"]
    stack = family_stacks["granular"]
    factor = engine.scale_for(stack)
    whole = engine.denoise(stack, scale=factor)
    alone = engine.denoise(stack[1:2], scale=factor)
    np.testing.assert_allclose(alone.numpy(), whole[1:2].numpy(), rtol=0, atol=1e-7)
