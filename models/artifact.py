"""The model artifact: a TorchScript file carrying its own metadata.

An artifact is `torch.jit.trace` of the network, saved with `torch.jit.save` and one extra file,
`tomocast.json`, holding `ModelMetadata`. The service loads nothing else: no Python class of the
network is needed at inference time, so a model trained on one tomocast version runs on another.

Precision: the weights are always stored in fp32, traced on the CPU. `precision` says what the
denoise engine runs on a CUDA device ("fp16": the loaded module is converted with `.half()` on
that device; the traced graph is dtype-generic). One file thus serves the CPU (always fp32: most
fp16 kernels are slow or missing there) and the GPU, and converting fp32 -> fp16 at load loses
nothing that tracing in fp16 would have kept. A trace also freezes cuDNN's flags into each
convolution, so `torch.backends.cudnn.benchmark` at run time does not reach a `.pt` file: it is
traced with benchmark on (a CUDA run autotunes) and TF32 allowed (a CUDA "fp32" run computes
convolutions in TF32). `.pt2` programs follow the run-time flags.

Normalisation lives in the metadata, not in the graph. The network was trained on inputs whose
intensity level (`workers.intensity`) was `reference_level`, mapped by
(x - input_offset) / input_scale. A scan at `factor` x that level (`factor` = its own level /
`reference_level`, one per scan: `workers.denoise.DenoiseEngine.scale_for`) is mapped by
(x - input_offset * factor) / (input_scale * factor) and the output back the same way
(`ModelMetadata.scaled`), so the pipeline feeds and receives physical units (line integral per
pixel) and the output scales with the input, whatever the material, energy or pixel size.
Files written before `reference_level` take `input_offset + input_scale` (the training
targets' high percentile that offset and scale were fitted to). `reference_width` (the slice
width of the fixed mapping that per-scan levels replaced) is kept for the record and for
`ModelMetadata.normalisation`.

TorchScript is deprecated from PyTorch 2.13 on (`torch.jit.*` emit DeprecationWarning); tomocast
keeps it until its `torch.export` migration and silences exactly those warnings here.

The migration target loads already: a `.pt2` file is a `torch.export` ExportedProgram (written by
`models.training.export.save_exported`, same `tomocast.json` member, weights fp32, batch and H, W
dynamic) and `load_artifact` returns its module the same way; everything else is read as
TorchScript.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Final, Literal

import torch
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import ModelError

METADATA_FILE = "tomocast.json"
EXPORTED_SUFFIX = ".pt2"
# Every torch.export archive has this member (under its top folder).
_EXPORTED_MARKER = "archive_format"
FORMAT_VERSION: Final = 1
# Fields format 1 gained later; a file without one gets the default.
LATER_FIELDS: Final = frozenset({"reference_width", "reference_level"})
# Small enough to be cheap on any device, a multiple of 8 so every U-Net level divides evenly.
PROBE_SIZE = 16
# torch.jit does not declare it in its exports.
_TracerWarning: type[Warning] = torch.jit.TracerWarning  # type: ignore[attr-defined]


def installed_version() -> str:
    """The installed tomocast version, or "unknown" when running from an uninstalled tree."""
    try:
        return importlib_metadata.version("tomocast")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class TrainingRecord(BaseModel):
    """How the weights came to be, in words a reader can repeat: the data set, the exact command,
    the hardware and the wall time ("none" where the model was not trained)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    data: str
    command: str
    hardware: str
    time: str


class ModelMetadata(BaseModel):
    """The `tomocast.json` inside every artifact.

    Threading: immutable (frozen) value object; share it freely.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format_version: Literal[1] = FORMAT_VERSION
    # Goes into every published slice header (`model`), hence the scan_id alphabet.
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")
    arch: Literal["tomogan", "resattunet", "unet", "placeholder"]
    depth: int = Field(ge=1)
    precision: Literal["fp32", "fp16"]
    input_offset: float = Field(allow_inf_nan=False)
    input_scale: float = Field(gt=0.0, allow_inf_nan=False)
    # None: offset and scale are absolute (any width gets the same).
    reference_width: int | None = Field(default=None, ge=1)
    # The intensity level (`workers.intensity.intensity_level`) of the training inputs, in the
    # units input_offset and input_scale apply to. None (files written before it): `level`.
    reference_level: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    trained: bool
    training: TrainingRecord
    metrics: dict[str, float]
    tomocast_version: str = Field(default_factory=installed_version)
    created: AwareDatetime = Field(default_factory=_utc_now)

    @field_validator("depth")
    @classmethod
    def _depth_is_odd(cls, depth: int) -> int:
        # The network predicts the centre slice, so there must be one.
        if depth % 2 == 0:
            raise ValueError(f"depth={depth} must be odd (the centre slice is the one predicted)")
        return depth

    @property
    def level(self) -> float:
        """The intensity level the network was trained at: `reference_level`, or for files
        without one the targets' high percentile that offset and scale were fitted to
        (`models.training.dataset.normalisation`: offset + scale), the nearest the file says."""
        if self.reference_level is not None:
            return self.reference_level
        fitted = self.input_offset + self.input_scale
        return fitted if fitted > 0 else self.input_scale

    def scaled(self, factor: float) -> tuple[float, float]:
        """(offset, scale) for a scan `factor` x the training level: the network sees
        (x - offset) / scale, so that factor x x maps where x mapped (offset proportional to
        the factor: the mapping is scale-equivariant)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale={factor} must be a positive finite factor")
        return self.input_offset * factor, self.input_scale * factor

    def normalisation(self, width: int) -> tuple[float, float]:
        """The fixed mapping the engine used before per-scan levels, for slices `width` pixels
        wide (kept for tools that state inputs in network units): the network sees
        (x - offset) / scale."""
        if width < 1:
            raise ValueError(f"width={width} must be at least 1 pixel")
        factor = 1.0 if self.reference_width is None else self.reference_width / width
        return self.input_offset * factor, self.input_scale * factor

    @field_validator("input_scale")
    @classmethod
    def _scale_is_usable(cls, scale: float) -> float:
        if not math.isfinite(1.0 / scale):
            raise ValueError(f"input_scale={scale} is too small to divide by")
        return scale


@contextlib.contextmanager
def _torchscript_deprecation_silenced() -> Iterator[None]:
    # Scoped to torch.jit's own DeprecationWarning so that any other warning still surfaces.
    # catch_warnings swaps a process-wide filter list: artifacts are loaded at start-up, not
    # on the hot path, so the (documented) race with other threads' warnings is harmless.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit\.")
        yield


def _last_line(exc: BaseException) -> str:
    """TorchScript errors carry a long serialized-code traceback; the cause is its last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def save_artifact(
    module: torch.nn.Module,
    metadata: ModelMetadata,
    path: str | Path,
    example_shape: tuple[int, int, int, int] | None = None,
) -> Path:
    """Trace `module` on the CPU in fp32 and write it with `metadata` to `path` (atomically).

    `module` must map (batch, depth, H, W) -> (batch, 1, H, W) for H, W multiples of 8; it is
    copied, so the caller's module keeps its device, dtype and train/eval mode. The trace is
    checked on a second input shape, so a network whose Python control flow depends on the
    input shape (which tracing would freeze) is refused rather than silently shipped.
    """
    path = Path(path)
    shape = example_shape or (1, metadata.depth, 64, 64)
    if len(shape) != 4 or shape[1] != metadata.depth:
        raise ModelError(f"example_shape={shape} must be (batch, depth={metadata.depth}, H, W)")
    eager = copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()
    seeded = torch.Generator().manual_seed(0)
    example = torch.randn(shape, generator=seeded)
    other = torch.randn((2, metadata.depth, 24, 40), generator=seeded)
    what = f"tracing {type(module).__name__} for {path}"
    with torch.no_grad(), _torchscript_deprecation_silenced():
        traced = _trace(eager, example, what)
        _check_trace(eager, traced, other, what)
    _save_atomically(traced, metadata, path)
    return path


def _trace(eager: torch.nn.Module, example: torch.Tensor, what: str) -> torch.jit.ScriptModule:
    """`torch.jit.trace` of `eager` on `example`; ModelError if the trace froze a Python value
    into the graph (a TracerWarning): an artifact right only for the example input."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category=_TracerWarning)
        # A trace bakes cuDNN's flags into every convolution: these make a CUDA run
        # autotune its algorithms (benchmark) and take TF32 where it computes in fp32.
        with torch.backends.cudnn.flags(
            enabled=True, benchmark=True, deterministic=False, allow_tf32=True
        ):
            traced: torch.jit.ScriptModule = torch.jit.trace(  # type: ignore[no-untyped-call]
                eager, example
            )
    for warning in caught:
        if issubclass(warning.category, _TracerWarning):
            raise ModelError(f"{what} froze a Python value into the graph: {warning.message}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return traced


def _check_trace(
    eager: torch.nn.Module, traced: torch.jit.ScriptModule, other: torch.Tensor, what: str
) -> None:
    """ModelError unless the trace gives what the module gives on `other`, an input of
    another shape than the example's (a trace that froze its input shape does not)."""
    try:
        expected, got = eager(other), traced(other)
    except RuntimeError as exc:
        raise ModelError(
            f"{what}: the module or its trace fails on a {tuple(other.shape)} input: "
            f"{_last_line(exc)}"
        ) from exc
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ModelError(
            f"{what} froze its input shape: the trace disagrees with the module on a "
            f"{tuple(other.shape)} input"
        )


def _save_atomically(traced: torch.jit.ScriptModule, metadata: ModelMetadata, path: Path) -> None:
    """`traced` with its metadata member at `path`. A reader never sees a half-written artifact
    under the real name, and a failed write leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    extra = {METADATA_FILE: metadata.model_dump_json(indent=2)}
    try:
        with _torchscript_deprecation_silenced():
            torch.jit.save(traced, str(partial), _extra_files=extra)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _parse_metadata(path: Path, raw: str | bytes) -> ModelMetadata:
    if not raw:
        raise ModelError(
            f"{path} has no {METADATA_FILE} metadata: it is TorchScript but not a tomocast "
            "artifact (write artifacts with models.artifact.save_artifact)"
        )
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: {METADATA_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(fields, dict):
        raise ModelError(f"{path}: {METADATA_FILE} must hold a JSON object")
    # Defaults are a convenience for writers; a file must state every field, except those added
    # after files were already written (their default is what those files meant).
    missing = sorted(set(ModelMetadata.model_fields) - set(fields) - LATER_FIELDS)
    if missing:
        raise ModelError(f"{path}: {METADATA_FILE} lacks field(s) {', '.join(missing)}")
    try:
        return ModelMetadata.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            + ("" if error["type"] == "missing" else f" (got {error.get('input')!r})")
            for error in exc.errors()
        )
        raise ModelError(f"{path}: invalid {METADATA_FILE}: {problems}") from exc


def _probe(path: Path, module: torch.nn.Module, depth: int, device: torch.device) -> None:
    """Run one tiny forward pass so a depth/channel mismatch fails at load, not mid-scan."""
    probe = torch.rand(1, depth, PROBE_SIZE, PROBE_SIZE, device=device)
    try:
        with torch.inference_mode():
            out = module(probe)
    # An exported program checks its input shapes with guards that raise AssertionError.
    except (RuntimeError, AssertionError, torch.jit.Error) as exc:
        raise ModelError(
            f"{path}: metadata depth={depth} but the network rejects a (1, {depth}, "
            f"{PROBE_SIZE}, {PROBE_SIZE}) input: {_last_line(exc)}"
        ) from exc
    expected = (1, 1, PROBE_SIZE, PROBE_SIZE)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"{path}: the network returns {got} for a {tuple(probe.shape)} input, "
            f"expected {expected}"
        )
    if out.dtype != torch.float32:
        raise ModelError(f"{path}: the network returns {out.dtype} for float32 input")


def _load_exported(path: Path, device: torch.device) -> tuple[torch.nn.Module, ModelMetadata]:
    """A `.pt2` ExportedProgram artifact as a module on `device` (it was exported in eval mode;
    exported modules refuse `.eval()`)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path} is not a torch.export program ({exc})") from exc
    # Checked first because torch.export.load logs a long traceback before it raises.
    if not any(name.rsplit("/", 1)[-1] == _EXPORTED_MARKER for name in members):
        raise ModelError(
            f"{path} is not a torch.export program (no {_EXPORTED_MARKER} member); "
            "a TorchScript artifact must be named *.pt"
        )
    extra: dict[str, str] = {METADATA_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: torch.export.load failed: {_last_line(exc)}") from exc
    metadata = _parse_metadata(path, extra[METADATA_FILE])
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module().float(), metadata


def load_artifact(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, ModelMetadata]:
    """Load an artifact onto `device` in fp32, eval mode, checked; raise ModelError if unusable.

    A `.pt2` file is read as a torch.export program, any other as TorchScript (the module is
    then a `torch.jit.ScriptModule`). Refused, with a message naming the file and the problem:
    a missing file, a file that is not TorchScript (or not an exported program), one without
    metadata, metadata with a missing or invalid field, and a network that does not take `depth`
    channels or does not return (batch, 1, H, W).
    """
    path = Path(path)
    device = torch.device(device)
    if not path.exists():
        raise ModelError(f"model artifact {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model artifact {path} is not a file")
    if path.suffix == EXPORTED_SUFFIX:
        exported, metadata = _load_exported(path, device)
        _probe(path, exported, metadata.depth, device)
        return exported, metadata
    # torch.jit.load fills in the bytes of each member found and leaves the others as given.
    extra: dict[str, str | bytes] = {METADATA_FILE: ""}
    try:
        with _torchscript_deprecation_silenced():
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location=device, _extra_files=extra
            )
    except RuntimeError as exc:
        # PyTorch's zip-reader message goes on about corrupted checkpoints; its cause is the
        # first sentence.
        cause = str(exc).split(". ")[0].strip()
        raise ModelError(
            f"{path} is not a TorchScript model artifact ({cause}); a torch.save checkpoint is "
            "not one either: export it with models.artifact.save_artifact"
        ) from exc
    metadata = _parse_metadata(path, extra[METADATA_FILE])
    module = module.float().eval()
    _probe(path, module, metadata.depth, device)
    return module, metadata
