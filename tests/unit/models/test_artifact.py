"""The model artifact: save/load round trip, every refusal, and the shipped placeholder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from models.artifact import METADATA_FILE, ModelMetadata, load_artifact, save_artifact
from models.placeholder import (
    PLACEHOLDER_FILE,
    PlaceholderSmoothing,
    build_placeholder_artifact,
    placeholder_metadata,
    shipped_weights_dir,
)
from models.tomogan import TomoGANGenerator
from service.errors import ModelError
from tests.support.helpers import cudnn_flags


class CentreSlice(nn.Module):
    """The smallest valid network: returns the centre slice unchanged."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.centre = depth // 2

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return stack[:, self.centre : self.centre + 1]


def _metadata(**changes: Any) -> ModelMetadata:
    return placeholder_metadata().model_copy(update={"name": "test-model", **changes})


def _fields(**changes: Any) -> dict[str, Any]:
    fields = json.loads(_metadata().model_dump_json())
    fields.update(changes)
    return fields


def _write_raw(path: Path, module: nn.Module, depth: int, extra: dict[str, str]) -> Path:
    """Write TorchScript with arbitrary extra files, bypassing save_artifact's validation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit\.")
        traced = torch.jit.trace(module, torch.zeros(1, depth, 16, 16))
        torch.jit.save(traced, str(path), _extra_files=extra)
    return path


def test_round_trip_matches_eager_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    generator = TomoGANGenerator(depth=3).eval()
    metadata = _metadata(name="tomogan-random", arch="tomogan", trained=False)
    path = save_artifact(generator, metadata, tmp_path / "g.pt")
    module, loaded = load_artifact(path, "cpu")
    assert loaded == metadata
    stack = torch.randn(2, 3, 32, 48)  # another shape than the trace's 64x64 example
    with torch.inference_mode():
        expected, got = generator(stack), module(stack)
    # Same kernels on the same CPU; the slack covers any reordering by the TorchScript graph.
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert generator.training is False and next(generator.parameters()).dtype == torch.float32


def test_metadata_is_readable_json(tmp_path: Path) -> None:
    path = save_artifact(CentreSlice(3), _metadata(), tmp_path / "c.pt")
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit\.")
        torch.jit.load(str(path), _extra_files=extra)
    fields = json.loads(extra[METADATA_FILE])
    assert fields["format_version"] == 1 and fields["depth"] == 3
    assert fields["created"].startswith("2025-01-01T00:00:00")


def test_save_refuses_example_shape_of_wrong_depth(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="depth=3"):
        save_artifact(CentreSlice(3), _metadata(), tmp_path / "c.pt", example_shape=(1, 1, 64, 64))


class ShapeBranch(nn.Module):
    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        if stack.shape[-1] > 32:  # frozen by tracing: wrong for any narrower input
            return stack[:, 1:2] * 2
        return stack[:, 1:2]


def test_save_refuses_a_trace_that_froze_python_values(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="froze"):
        save_artifact(ShapeBranch(), _metadata(), tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()


def test_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.pt does not exist"):
        load_artifact(tmp_path / "nope.pt", "cpu")


def test_refuses_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is not a file"):
        load_artifact(tmp_path, "cpu")


@pytest.mark.parametrize("kind", ["random", "empty", "state_dict"])
def test_refuses_non_torchscript(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "state_dict":
        torch.save(TomoGANGenerator(1).state_dict(), path)
    else:
        path.write_bytes(np.random.default_rng(0).bytes(512) if kind == "random" else b"")
    with pytest.raises(ModelError, match=rf"{kind}\.pt is not a TorchScript model artifact"):
        load_artifact(path, "cpu")


def test_refuses_torchscript_without_metadata(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "bare.pt", CentreSlice(3), 3, {})
    with pytest.raises(ModelError, match=r"bare\.pt has no tomocast\.json metadata"):
        load_artifact(path, "cpu")


def test_trace_autotunes_on_cuda(tmp_path: Path) -> None:
    # A trace freezes cuDNN's flags into each convolution; run-time cudnn.benchmark cannot
    # reach them, so the artifact is traced with benchmark (and TF32) on.
    before = torch.backends.cudnn.benchmark
    path = save_artifact(
        TomoGANGenerator(depth=3), _metadata(arch="tomogan", trained=False), tmp_path / "t.pt"
    )
    assert cudnn_flags(path) == {("1", "0", "1", "1")}
    assert torch.backends.cudnn.benchmark == before  # the global flag is left as it was


def test_refuses_metadata_that_is_not_json(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "m.pt", CentreSlice(3), 3, {METADATA_FILE: "{depth: 3"})
    with pytest.raises(ModelError, match="not valid JSON"):
        load_artifact(path, "cpu")


@pytest.mark.parametrize("field", ["format_version", "depth", "input_scale", "trained", "created"])
def test_refuses_missing_field(tmp_path: Path, field: str) -> None:
    fields = _fields()
    del fields[field]
    path = _write_raw(tmp_path / "m.pt", CentreSlice(3), 3, {METADATA_FILE: json.dumps(fields)})
    with pytest.raises(ModelError, match=rf"m\.pt: tomocast\.json lacks field\(s\) {field}"):
        load_artifact(path, "cpu")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("format_version", 2, "Input should be 1"),
        ("depth", 2, "must be odd"),
        ("depth", 0, "greater than or equal to 1"),
        ("depth", "3", "valid integer"),
        ("arch", "gan", "'tomogan'"),
        ("precision", "int8", "'fp32' or 'fp16'"),
        ("input_scale", 0.0, "greater than 0"),
        ("input_scale", -1.0, "greater than 0"),
        ("input_offset", "NaN", "valid number"),
        ("name", "my model", "should match pattern"),
        ("trained", "yes", "valid boolean"),
        ("created", "2025-01-01T00:00:00", "timezone"),
        ("training", {"data": "x"}, "Field required"),
        ("metrics", {"ssim": "high"}, "valid number"),
        ("reference_width", 0, "greater than or equal to 1"),
        ("reference_width", 25.6, "valid integer"),
        ("reference_level", 0.0, "greater than 0"),
        ("reference_level", "Infinity", "valid number"),
    ],
)
def test_refuses_invalid_field(tmp_path: Path, field: str, value: Any, problem: str) -> None:
    text = json.dumps(_fields(**{field: value}))
    path = _write_raw(tmp_path / "m.pt", CentreSlice(3), 3, {METADATA_FILE: text})
    with pytest.raises(ModelError, match=r"m\.pt: invalid tomocast\.json") as caught:
        load_artifact(path, "cpu")
    assert field in str(caught.value) and problem in str(caught.value)


def test_metadata_without_reference_width_keeps_absolute_normalisation(tmp_path: Path) -> None:
    # Artifacts written before the field existed: the same offset and scale at every width.
    fields = _fields(input_offset=0.5, input_scale=2.0)
    del fields["reference_width"]
    path = _write_raw(tmp_path / "m.pt", CentreSlice(3), 3, {METADATA_FILE: json.dumps(fields)})
    _, metadata = load_artifact(path, "cpu")
    assert metadata.reference_width is None
    assert metadata.normalisation(256) == metadata.normalisation(2048) == (0.5, 2.0)
    fitted = metadata.model_copy(update={"reference_width": 256})
    assert fitted.normalisation(2048) == (0.5 / 8, 2.0 / 8)
    with pytest.raises(ValueError, match="width=0"):
        fitted.normalisation(0)


def test_metadata_without_reference_level_takes_the_fitted_range(tmp_path: Path) -> None:
    # Artifacts written before the field existed (the shipped ones): offset + scale, the
    # training targets' high percentile; the factor then scales offset and scale alike.
    fields = _fields(input_offset=0.5, input_scale=2.0)
    fields.pop("reference_level", None)
    path = _write_raw(tmp_path / "m.pt", CentreSlice(3), 3, {METADATA_FILE: json.dumps(fields)})
    _, metadata = load_artifact(path, "cpu")
    assert metadata.reference_level is None and metadata.level == 2.5
    assert metadata.scaled(4.0) == (2.0, 8.0)
    assert metadata.model_copy(update={"reference_level": 0.7}).level == 0.7
    with pytest.raises(ValueError, match="scale=nan"):
        metadata.scaled(float("nan"))


def test_refuses_unknown_field(tmp_path: Path) -> None:
    text = json.dumps(_fields(learning_rate=1e-4))
    path = _write_raw(tmp_path / "m.pt", CentreSlice(3), 3, {METADATA_FILE: text})
    with pytest.raises(ModelError, match="learning_rate: Extra inputs are not permitted"):
        load_artifact(path, "cpu")


@pytest.mark.parametrize(("module_depth", "stated_depth"), [(3, 1), (3, 5), (1, 3)])
def test_refuses_depth_the_network_does_not_take(
    tmp_path: Path, module_depth: int, stated_depth: int
) -> None:
    network = nn.Conv2d(module_depth, 1, 1)
    text = json.dumps(_fields(depth=stated_depth))
    path = _write_raw(tmp_path / "m.pt", network, module_depth, {METADATA_FILE: text})
    with pytest.raises(ModelError, match=rf"metadata depth={stated_depth} but the network rejects"):
        load_artifact(path, "cpu")


def test_refuses_network_with_wrong_output_shape(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "m.pt", nn.Identity(), 3, {METADATA_FILE: _fields_json()})
    with pytest.raises(ModelError, match=r"returns \(1, 3, 16, 16\).*expected \(1, 1, 16, 16\)"):
        load_artifact(path, "cpu")


def _fields_json() -> str:
    return json.dumps(_fields())


def _numpy_smoothing(stack: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Independent reference: 1-2-1 across slices, then a reflect-padded 5x5 Gaussian."""
    across = np.tensordot(np.array([0.25, 0.5, 0.25]), stack, axes=([0], [1]))
    offsets = np.arange(-2, 3)
    gaussian = np.exp(-0.5 * (offsets / sigma) ** 2)
    gaussian /= gaussian.sum()
    padded = np.pad(across, ((0, 0), (2, 2), (2, 2)), mode="reflect")
    height, width = across.shape[-2:]
    out = np.zeros_like(across)
    for i, wy in enumerate(gaussian):
        for j, wx in enumerate(gaussian):
            out += wy * wx * padded[:, i : i + height, j : j + width]
    return out


def test_placeholder_matches_numpy_reference() -> None:
    stack = np.random.default_rng(1).normal(size=(2, 3, 19, 13)).astype(np.float32)
    got = PlaceholderSmoothing()(torch.from_numpy(stack))[:, 0].numpy()
    np.testing.assert_allclose(got, _numpy_smoothing(stack.astype(np.float64)), atol=1e-5)


def test_shipped_placeholder_is_the_freshly_built_one(tmp_path: Path) -> None:
    shipped, shipped_metadata = load_artifact(shipped_weights_dir() / PLACEHOLDER_FILE, "cpu")
    fresh, fresh_metadata = load_artifact(build_placeholder_artifact(tmp_path / "p.pt"), "cpu")
    assert shipped_metadata.model_dump(exclude={"tomocast_version"}) == fresh_metadata.model_dump(
        exclude={"tomocast_version"}
    )
    assert shipped_metadata.name == "placeholder-smoothing"
    assert shipped_metadata.arch == "placeholder" and shipped_metadata.trained is False
    stack = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 3, 40, 56))).float()
    with torch.inference_mode():
        np.testing.assert_allclose(shipped(stack).numpy(), fresh(stack).numpy(), rtol=0, atol=0)
