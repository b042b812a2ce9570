"""The denoise engine: runs a model artifact on batches of adjacent-slice stacks.

The pipeline reconstructs a batch of detector rows, builds for each row the stack of its `depth`
neighbours (`adjacent_stack`), and hands the stacks to a `Denoiser`. `DenoiseEngine` is the one
implementation, on the CPU and on CUDA; what differs is the precision it runs in (`PRECISIONS`,
chosen by `resolve_precision`) and the launch machinery (CUDA graphs on CUDA).

Batches whose activations would exceed `memory_limit_bytes` are split into smaller batches, and a
slice too large on its own is run in overlapping tiles (`workers.tiling`), which give the
whole-slice result.

Intensity: the engine maps each scan to the level its network was trained at with one factor
(`scale_for`: the scan's level over the artifact's, `workers.intensity`) and maps the result
back, so denoise(k x) = k denoise(x) for any k > 0. A scan passes one factor to every call
(`denoise(stack, scale=...)`) so its slices never flicker; a call without one measures its
own stack.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from models.artifact import ModelMetadata, load_artifact
from models.placeholder import PLACEHOLDER_FILE, shipped_weights_dir
from service.errors import ModelError
from workers.graphs import GraphCache
from workers.intensity import intensity_level
from workers.quantize import QuantizationCheck, QuantizationError, quantizable, quantize_int8
from workers.tiling import core_for_budget, receptive_radius, run_tiled

log = logging.getLogger(__name__)

# Three 2x2 max-pools in TomoGAN: H and W must divide by 8 for the skips to line up.
SIZE_MULTIPLE = 8
DEFAULT_WARMUP_SIZE = 256
DEFAULT_MODEL = "tomogan-beamline-d3"  # docs/model-card.md

Precision = Literal["artifact", "auto", "fp32", "fp16", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# int8 modules already calibrated in this process, by (artifact bytes' SHA-256, arch, depth):
# the same weights quantize to the same module, which inference only reads, so engines built
# again on one artifact (a service restarted in-process, a second service, model reloads)
# share it instead of calibrating again (5 s on one CPU thread). A refusal is not kept.
INT8_CACHE_SIZE = 4
_INT8_CACHE: OrderedDict[tuple[str, str, int], tuple[torch.nn.Module, QuantizationCheck]] = (
    OrderedDict()
)
_INT8_CACHE_LOCK = threading.Lock()


def clear_int8_cache() -> None:
    """Forget every int8 module calibrated so far: the next int8 engine calibrates (and its
    construction costs what a fresh process pays; `tomocast bench denoise`'s set-up column)."""
    with _INT8_CACHE_LOCK:
        _INT8_CACHE.clear()


_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Peak activation memory per input pixel of TomoGAN (the widest shipped network) with batch 1,
# as measured on the CPU (docs/benchmarks.md, "Activation memory"), plus margin. On CUDA the
# engine measures its own at warm-up instead.
BYTES_PER_PIXEL = {"fp32": 896, "fp16": 448, "bf16": 448, "int8": 160}


def default_artifact_path(device: torch.device | str = "cpu") -> Path:
    """The artifact `load_denoiser(None, device)` runs: the shipped trained TomoGAN, its fp16
    export on CUDA (what a GPU deployment runs), its fp32 one elsewhere."""
    suffix = "-fp16.pt" if torch.device(device).type == "cuda" else ".pt"
    return shipped_weights_dir() / f"{DEFAULT_MODEL}{suffix}"


def placeholder_artifact_path() -> Path:
    """The untrained smoothing filter shipped as a reference point (never the default)."""
    return shipped_weights_dir() / PLACEHOLDER_FILE


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(requested: str, device: torch.device, metadata: ModelMetadata) -> str:
    """`artifact` (the reference, and the engine's default): the artifact's precision on CUDA
    (fp16 for the shipped ones), fp32 on the CPU. `auto` (the fastest within the tolerances that
    tests/unit/workers/test_denoise.py asserts, what the service should run): the same on CUDA; on
    the CPU int8 where the architecture can be quantized, else bf16 where the CPU has it, else
    fp32. Anything else is taken as asked."""
    if requested not in PRECISIONS:
        raise ModelError(f"precision={requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested not in ("auto", "artifact"):
        return requested
    if device.type == "cuda":
        return metadata.precision
    if requested == "artifact":
        return "fp32"
    if quantizable(metadata.arch):
        return "int8"
    return "bf16" if cpu_has_bf16() else "fp32"


def adjacent_stack(volume: torch.Tensor, start: int, stop: int, depth: int) -> torch.Tensor:
    """(rows, H, W) slices -> (stop - start, depth, H, W): for each row r in [start, stop) the
    rows r - depth//2 .. r + depth//2, with rows past either end of the volume replaced by the
    end row (edge replication), on the volume's device and in its dtype."""
    rows = volume.shape[0]
    if volume.ndim != 3:
        raise ValueError(f"volume must be (rows, H, W), got shape {tuple(volume.shape)}")
    if depth < 1 or depth % 2 == 0:
        raise ValueError(f"depth={depth} must be odd and >= 1")
    if not 0 <= start <= stop <= rows:
        raise ValueError(
            f"need 0 <= start <= stop <= rows, got start={start} stop={stop} rows={rows}"
        )
    half = depth // 2
    centres = torch.arange(start, stop, device=volume.device)
    offsets = torch.arange(-half, half + 1, device=volume.device)
    index = (centres[:, None] + offsets[None, :]).clamp_(0, rows - 1)
    gathered = volume.index_select(0, index.reshape(-1))
    return gathered.reshape(stop - start, depth, *volume.shape[1:])


def _pad_to_multiple(stack: torch.Tensor) -> torch.Tensor:
    height, width = stack.shape[-2:]
    pad_h = -height % SIZE_MULTIPLE
    pad_w = -width % SIZE_MULTIPLE
    if not (pad_h or pad_w):
        return stack
    # Reflect keeps the image statistics at the border the network was trained on; it needs
    # the pad to be shorter than the side, so tiny slices fall back to edge replication.
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(stack, (0, pad_w, 0, pad_h), mode=mode)


class DenoiseEngine:
    """A loaded artifact bound to one device, implementing `workers.protocols.Denoiser`.

    The artifact is TorchScript (`.pt`) or a torch.export program (`.pt2`), loaded by
    `models.artifact.load_artifact`. `precision` (see `resolve_precision`) picks how it runs:
    fp32 is the reference; int8 is quantized at construction and checked against fp32
    (`workers.quantize`); under `auto` a failed check falls back to fp32 with a warning. Every
    precision runs channels_last (measured faster on the CPU too: oneDNN's native layout).
    On CUDA `torch.backends.cudnn.benchmark` is switched on (process-wide: cuDNN tunes once per
    input shape) and each batch shape is captured once as a CUDA graph (`workers.graphs`).

    Threading: an instance is owned by one worker thread (the module is not shared across
    threads). Construction is slow (load, probe, quantize, warm-up); `denoise` allocates only
    its intermediates and outputs.
    """

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        warmup_shape: tuple[int, int, int] | None = None,
        precision: str = "artifact",
        memory_limit_bytes: int | None = None,
        cuda_graphs: bool = True,
        field_width: int | None = None,
    ) -> None:
        """Load `path` onto `device`; on CUDA warm up at `warmup_shape` = (batch, H, W)
        (default (1, 256, 256)). `memory_limit_bytes` bounds the activations of one network
        call (None: whole batches whatever their size). `field_width`: the detector pixels
        across the full field of view, which the input scale of a model with a
        `reference_width` follows (`ModelMetadata.normalisation`); None: each slice's own
        width, right for whole slices; set it for slices of a region of interest or a crop."""
        if field_width is not None and field_width < 1:
            raise ValueError(f"field_width={field_width} must be at least 1 pixel")
        self._device = torch.device(device)
        if self._device.type == "cuda" and self._device.index is None:
            # Tensors report "cuda:N", never bare "cuda": pin the index so device checks match.
            self._device = torch.device("cuda", torch.cuda.current_device())
        module, metadata = load_artifact(path, self._device)
        self._metadata: ModelMetadata = metadata
        if field_width is not None:
            log.info(
                "%s: field_width=%d ignored: the input scale follows each scan's level",
                metadata.name,
                field_width,
            )
        self._path = Path(path)
        self._precision = resolve_precision(precision, self._device, metadata)
        # Measured on the fp32 network on the CPU: fp16 would round far effects away, and on CUDA
        # TF32 or FFT convolutions could add rounding noise far from the probe's point.
        self._halo = 0
        if memory_limit_bytes is not None:
            probe = module if self._device.type == "cpu" else load_artifact(path, "cpu")[0]
            self._halo = receptive_radius(probe, metadata.depth, SIZE_MULTIPLE)
        self._module = self._in_precision(module, asked=precision)
        self._input_dtype = _FLOAT_DTYPES.get(self._precision, torch.float32)
        self._graphs: GraphCache | None = None
        self._bytes_per_pixel = BYTES_PER_PIXEL[self._precision]
        self._measured_pixels = 0  # the largest warm-up measured on this device so far
        self._memory_limit = memory_limit_bytes
        if self._device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self._graphs = GraphCache(self._module) if cuda_graphs else None
            self.warmup(warmup_shape or (1, DEFAULT_WARMUP_SIZE, DEFAULT_WARMUP_SIZE))
        elif warmup_shape is not None:
            self.warmup(warmup_shape)

    def _in_precision(self, module: torch.nn.Module, asked: str) -> torch.nn.Module:
        """`module` as it runs in `self._precision`, channels_last: quantized for int8 (which
        may fall back to fp32), else cast."""
        if self._precision == "int8":
            module = self._quantized(module, asked=asked)  # may fall back to fp32
        if self._precision != "int8":
            # nn.Module.to takes memory_format at run time; torch's stubs do not declare it.
            module = module.to(
                dtype=_FLOAT_DTYPES[self._precision],  # type: ignore[call-overload]
                memory_format=torch.channels_last,
            )
        return module

    def _quantized(self, module: torch.nn.Module, asked: str) -> torch.nn.Module:
        if self._device.type != "cpu":
            raise ModelError(f"precision=int8 runs on the CPU only, not {self._device}")
        try:
            quantized, check = self._quantize_once(module)
        except QuantizationError as exc:
            if asked == "int8":
                raise
            self._precision = "fp32"
            log.warning("%s: int8 refused, running fp32: %s", self._path.name, exc)
            return module
        log.info(
            "%s: int8 on the CPU, rms %.4f / max %.4f of the data range from fp32",
            self._path.name,
            check.rms,
            check.max_abs,
        )
        return quantized

    def _quantize_once(self, module: torch.nn.Module) -> tuple[torch.nn.Module, QuantizationCheck]:
        """`quantize_int8` of this artifact, or the module an earlier engine of this process
        made from the same bytes (`_INT8_CACHE`)."""
        key = (
            hashlib.sha256(self._path.read_bytes()).hexdigest(),
            self._metadata.arch,
            self._metadata.depth,
        )
        with _INT8_CACHE_LOCK:
            if key in _INT8_CACHE:
                _INT8_CACHE.move_to_end(key)
                return _INT8_CACHE[key]
        made = quantize_int8(module, self._metadata.arch, self._metadata.depth)
        with _INT8_CACHE_LOCK:
            _INT8_CACHE[key] = made
            while len(_INT8_CACHE) > INT8_CACHE_SIZE:
                _INT8_CACHE.popitem(last=False)
        return made

    @property
    def name(self) -> str:
        return self._metadata.name

    @property
    def depth(self) -> int:
        return self._metadata.depth

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def path(self) -> Path:
        return self._path

    @property
    def precision(self) -> str:
        """What the network runs in: fp32, fp16, bf16 or int8 (inputs, outputs stay float32)."""
        return self._precision

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network's weights (torch.qint8 for int8)."""
        return torch.qint8 if self._precision == "int8" else self._input_dtype

    @property
    def graph_cache(self) -> GraphCache | None:
        """The CUDA graphs the engine replays (None off CUDA or with cuda_graphs=False)."""
        return self._graphs

    @property
    def halo(self) -> int:
        """Pixels of context each tile carries (0 when no memory limit is set)."""
        return self._halo

    def warmup(self, shape: tuple[int, int, int]) -> None:
        """Run one batch of zeros of (batch, H, W) slices, so the first real batch does not pay
        for CUDA context set-up, kernel loading, cuDNN autotuning and graph capture."""
        batch, height, width = shape
        stack = torch.zeros(batch, self.depth, height, width, device=self._device)
        self.denoise(stack)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            # A larger warm-up measures better: fixed costs (cuDNN workspaces) weigh less.
            if self._memory_limit is not None and batch * height * width > self._measured_pixels:
                self._measure_memory(stack)

    def scale_for(self, slices: torch.Tensor) -> float:
        """The factor mapping a scan to the level the network was trained at: the level of
        `slices` (a volume (rows, H, W), a few central slices, or a batch of stacks; in physical
        units, on any device) over the artifact's (`ModelMetadata.level`); 1.0 for all-zero
        slices. Scale-equivariant: scale_for(k x) = k scale_for(x) for k > 0."""
        measured = intensity_level(slices)
        if not (math.isfinite(measured) and measured > 0):
            return 1.0
        return measured / self._metadata.level

    def denoise(self, stack: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """(batch, depth, H, W) float32 on `device` -> (batch, H, W) float32 on `device`, in the
        input's physical units. Any H, W: padded (reflect) to multiples of 8 and cropped back.
        `scale`: the scan's factor (`scale_for`), the same for every call of one scan; None
        measures this stack (one host sync), right for a stack that is a whole scan."""
        if stack.ndim != 4 or stack.shape[1] != self.depth:
            raise ValueError(
                f"{self.name} expects (batch, depth={self.depth}, H, W) stacks, "
                f"got {tuple(stack.shape)}"
            )
        if stack.dtype != torch.float32 or stack.device != self._device:
            raise ValueError(
                f"{self.name} expects float32 on {self._device}, got {stack.dtype} "
                f"on {stack.device}"
            )
        height, width = stack.shape[-2:]
        factor = self.scale_for(stack) if scale is None else scale
        offset, input_scale = self._metadata.scaled(factor)
        with torch.inference_mode():
            # Normalise in fp32 before any cast: physical units may not fit fp16's range.
            padded = _pad_to_multiple((stack - offset) / input_scale)
            out = self._run_limited(padded)
        # Outside inference_mode on purpose: the result is then an ordinary tensor that callers
        # may modify in place (an inference tensor would refuse), at no extra copy.
        return (out[:, 0, :height, :width] * input_scale + offset).contiguous()

    def _run_limited(self, padded: torch.Tensor) -> torch.Tensor:
        """The network on `padded`, in batches (or tiles) that keep within the memory limit."""
        pixels = padded.shape[-2] * padded.shape[-1]
        if self._memory_limit is None:
            return self._run(padded)
        max_pixels = self._memory_limit // self._bytes_per_pixel
        per_call = max_pixels // pixels
        if per_call >= padded.shape[0]:
            return self._run(padded)
        if per_call >= 1:
            return torch.cat([self._run(part) for part in torch.split(padded, per_call)])
        core = core_for_budget(max_pixels, self._halo, SIZE_MULTIPLE)
        # Eager: edge tiles come in several shapes, each would cost a graph capture.
        return torch.cat(
            [
                run_tiled(self._run_eager, image, core, self._halo, SIZE_MULTIPLE)
                for image in torch.split(padded, 1)
            ]
        )

    def _run(self, padded: torch.Tensor) -> torch.Tensor:
        if self._graphs is not None:
            # The graph replays into the same buffer each time: copy out before the next call.
            return self._graphs.run(self._to_network(padded)).to(torch.float32, copy=True)
        return self._run_eager(padded)

    def _run_eager(self, padded: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._module(self._to_network(padded)).float()
        return out

    def _to_network(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.to(dtype=self._input_dtype, memory_format=torch.channels_last)

    def _measure_memory(self, stack: torch.Tensor) -> None:
        """Replace the CPU-measured bytes per pixel by this device's own (plus 25%), from an
        eager run (a graph replays in memory it reserved at capture, invisible to the peak)."""
        padded = _pad_to_multiple(stack)
        torch.cuda.reset_peak_memory_stats(self._device)
        before = torch.cuda.memory_allocated(self._device)
        with torch.inference_mode():
            self._run_eager(padded)
        peak = torch.cuda.max_memory_allocated(self._device) - before
        pixels = stack.shape[0] * stack.shape[-2] * stack.shape[-1]
        self._bytes_per_pixel = max(1, int(1.25 * peak / pixels))
        self._measured_pixels = pixels


def load_denoiser(
    path: str | Path | None,
    device: torch.device | str = "cpu",
    warmup_shape: tuple[int, int, int] | None = None,
    precision: str = "artifact",
    memory_limit_bytes: int | None = None,
    field_width: int | None = None,
) -> DenoiseEngine:
    """A `DenoiseEngine` for the artifact at `path` (`.pt` TorchScript or `.pt2` exported
    program), or for the shipped default when None.

    Raises ModelError naming the file when the artifact is missing or unusable.
    """
    artifact = default_artifact_path(device) if path is None else Path(path)
    if path is None and not artifact.is_file():
        raise ModelError(
            f"the shipped default model {artifact} is missing: reinstall tomocast or pass a "
            "model path (serve --model PATH)"
        )
    return DenoiseEngine(
        artifact, device, warmup_shape, precision, memory_limit_bytes, field_width=field_width
    )
