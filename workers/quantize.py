"""int8 static quantization of a TomoGAN artifact for the CPU, checked against fp32 at load.

Why: a CPU without bf16 units (AVX2-only, no AVX512-BF16/AMX) has nothing faster than fp32 for
floating point, and TomoGAN's time goes mostly to its 3x3 convolutions, which oneDNN's u8 x s8
kernels run several times faster. oneDNN rather than fbgemm (PyTorch's "x86" default): faster
and closer to fp32 on the same calibration here. Figures: docs/benchmarks.md, "Denoise engine
(CPU)" (`tomocast bench denoise`).

Calibration: activation ranges are observed on foam FBP slices synthesised at load with a fixed
seed (`workers.lowdose.render`) under low-dose `CONDITIONS`, at 128 px and, one stack per
condition, the middle 128 px of slices `CALIBRATION_WIDE_SIZES` wide, mapped into the
network's units the way tomocast's training maps its targets (robust range -> [0, 1],
`models.training.dataset.normalisation`).
The histogram observer picks each range (min/max was as accurate for the first shipped model,
but on the default trained with an SSIM term min/max over the wider slices made every step too
coarse, and without them clipped: 1.0 dB lost at 256 px, 1/8 views; docs/benchmarks.md, "int8
accuracy"). Weights are per-channel symmetric int8. The stem (the 1x1 convolution that reads
the slices) and the head's last 1x1 convolution (16 channels -> the output slice) stay fp32
(`FP32_MODULES`): they are a small share of the work, and quantizing the input and output values
themselves cost the most accuracy. They run as matrix products over the channels (`_Pointwise`):
as convolutions, these few-channel 1x1 kernels took PyTorch's slow path. The decoder's joins
are requantized (`_join`).

The quantized network is then compared with the fp32 one on a held-out phantom:
`QuantizationCheck.rms` must stay within `INT8_RMS_TOLERANCE` of the data range, or the caller
gets `QuantizationError` and runs fp32 instead. The FX graph needs a Python network, so only
architectures listed in `_NETWORKS` are quantized; TorchScript's state dict supplies the weights.
What int8 costs in accuracy, measured: tests/unit/workers/test_denoise.py (the tolerances it
asserts).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.tomogan import TomoGANGenerator
from service.errors import ModelError

# RMS of (int8 - fp32) in units of the data range (the network's [0, 1]) on the held-out check:
# about double what the shipped model gives (docs/benchmarks.md, "int8 accuracy"); beyond it
# the calibration does not fit.
INT8_RMS_TOLERANCE = 0.01
CALIBRATION_SEED = 4242  # a phantom no training or evaluation set uses
CHECK_SEED = 4243
CALIBRATION_SIZE = 128
# Wider slices calibrated too, one stack per condition each: a wider slice's noise and streaks
# push activations past the 128-px ranges (module docstring).
CALIBRATION_WIDE_SIZES: tuple[int, ...] = (256,)
CALIBRATION_ANGLES = 180
CALIBRATION_ROWS = 3
# (keep every n-th view, photons per pixel): the model card's low-dose conditions and noisier
# ones, so that a noisier scan than the model was trained on is not clipped (with only the first
# four, int8 strayed far more on the noisiest: docs/benchmarks.md, "int8 accuracy").
CONDITIONS: tuple[tuple[int, float | None], ...] = (
    (8, None),
    (1, 1000.0),
    (1, 200.0),
    (4, 200.0),
    (1, 50.0),
    (4, 50.0),
)
# Modules left fp32 (module docstring): the stem reads the input values, the head's last 1x1
# convolution writes the output. With the stem int8 too, int8 lost 1.7 dB at 256 px
# (docs/benchmarks.md, "int8 accuracy").
FP32_MODULES: tuple[str, ...] = ("stem", "head.2")


class QuantizationError(ModelError):
    """The artifact cannot be quantized, or its int8 result strays beyond the tolerance."""


class _TraceableTomoGAN(TomoGANGenerator):
    """TomoGANGenerator's forward without its eager-only size check, which FX cannot trace
    (it branches on a shape). tests/unit/workers/test_quantize.py pins it to the original,
    exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        h = self.stem(x)
        for box in self.encoder:
            h = box(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottleneck(h)
        for box, skip in zip(self.decoder, reversed(skips), strict=True):
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            h = box(torch.cat([skip, h], dim=1))
        out: torch.Tensor = self.head(h)
        return out


_NETWORKS: dict[str, type[nn.Module]] = {"tomogan": _TraceableTomoGAN}


class _Pointwise(nn.Module):
    """A fp32 1x1 convolution, and the ReLU fused after it if any, as one matrix product over
    the channels: on the engine's channels_last tensors the channels are the contiguous last
    dimension, so this is a GEMM, where PyTorch's convolution took its slow path for these
    few-channel 1x1 kernels. Same values (tests/unit/workers/test_quantize.py)."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias)
        if self.relu:
            out = F.relu(out)
        return out.permute(0, 3, 1, 2)


def _pointwise_fp32(network: nn.Module) -> None:
    """Replace, in place, every fp32 1x1 convolution (alone or fused with its ReLU) left in the
    converted `network` by a `_Pointwise`."""
    from torch.ao.nn.intrinsic import ConvReLU2d

    targets: dict[str, tuple[nn.Conv2d, bool]] = {}
    for name, module in network.named_modules():
        if type(module) is ConvReLU2d and isinstance(module[0], nn.Conv2d):
            targets[name] = (module[0], True)
        elif type(module) is nn.Conv2d and name.rpartition(".")[0] not in targets:
            targets[name] = (module, False)
    for name, (conv, relu) in targets.items():
        pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
        if pointwise and conv.padding == (0, 0):
            parent, _, attribute = name.rpartition(".")
            setattr(network.get_submodule(parent), attribute, _Pointwise(conv, relu))


def quantizable(arch: str) -> bool:
    return arch in _NETWORKS


@dataclass(frozen=True)
class QuantizationCheck:
    """int8 vs fp32 on the held-out phantom, in units of the data range."""

    rms: float
    max_abs: float


@contextlib.contextmanager
def _deprecations_silenced() -> Iterator[None]:
    # torch.ao.quantization and quantized tensors are deprecated in favour of torchao's pt2e
    # flow (not a tomocast dependency); until that migration, silence exactly those. The tensor
    # one is a warn-once from C++, so meeting it here (convert) keeps it out of `denoise`.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\.")
        yield


def _join(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """A quantized cat whose scale covers every input (quint8).

    PyTorch's quantized `torch.cat` keeps its first input's scale and clips the others into it;
    in TomoGAN's decoder the skip and the upsampled branch get scales a few % apart, so part of
    the wider one was clipped (and, past a tolerance, PyTorch warned on every call). Requantizing
    both into the union of their ranges halved the int8 error on foam (docs/benchmarks.md,
    "int8 accuracy") at no measurable cost.
    """
    low = min(-t.q_zero_point() * t.q_scale() for t in tensors)
    high = max((255 - t.q_zero_point()) * t.q_scale() for t in tensors)
    scale = (high - low) / 255
    joined: torch.Tensor = torch.ops.quantized.cat(tensors, dim, scale, round(-low / scale))
    return joined


@contextlib.contextmanager
def _fx_stack_traces_off() -> Iterator[None]:
    # A stack trace per FX node is for debugging the graph; collecting them costs seconds of
    # the load here. Read once, when prepare_fx builds its tracer.
    import torch.fx.config

    # Newer than some PyTorch releases tomocast runs on: without it, traces are simply kept.
    previous = getattr(torch.fx.config, "do_not_emit_stack_traces", None)
    if previous is None:
        yield
        return
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = previous


@contextlib.contextmanager
def _quantized_engine(name: str) -> Iterator[None]:
    # A process-wide switch read when weights are packed (convert), not when they run: the
    # packed weights keep their backend, so it is restored straight after.
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def foam_stacks(
    depth: int,
    seed: int,
    rows: int = CALIBRATION_ROWS,
    size: int = CALIBRATION_SIZE,
    centre_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stacks, targets): (n, depth, size, size) low-dose FBP stacks and the (n, size, size)
    phantom slices, both scaled so that the phantom spans [0, 1] (the network's units); one
    stack per row and condition, or with `centre_only` one per condition."""
    from workers.denoise import adjacent_stack
    from workers.lowdose import Condition, render

    conditions = [Condition(sparse, photons) for sparse, photons in CONDITIONS]
    volumes = render(seed, rows, size, CALIBRATION_ANGLES, conditions)
    target = volumes[0].target
    low, span = float(target.min()), float(np.ptp(target)) or 1.0
    first, last = (rows // 2, rows // 2 + 1) if centre_only else (0, rows)
    stacks = [
        adjacent_stack(torch.from_numpy((v.noisy - low) / span), first, last, depth)
        for v in volumes
    ]
    targets = torch.from_numpy((target[first:last] - low) / span).repeat(len(volumes), 1, 1)
    return torch.cat(stacks), targets


def _middle(stacks: torch.Tensor, size: int) -> torch.Tensor:
    """The central `size` x `size` of (n, depth, H, W) `stacks`."""
    top, left = (stacks.shape[-2] - size) // 2, (stacks.shape[-1] - size) // 2
    return stacks[..., top : top + size, left : left + size].contiguous()


def calibration_units(reference_level: float | None, input_scale: float) -> float:
    """What a sample's full range is in the network's input units as the engine feeds it: a
    scan is mapped to `reference_level`, then divided by `input_scale`, and a phantom's level
    is about its maximum. 1 for artifacts without a reference level (normalised by the
    training sample's attenuation itself)."""
    if reference_level is None or not reference_level > 0 or not input_scale > 0:
        return 1.0
    return float(reference_level / input_scale)


def quantize_int8(
    scripted: nn.Module, arch: str, depth: int
) -> tuple[nn.Module, QuantizationCheck]:
    """An int8 copy of the fp32 `scripted` network (its weights, `arch`'s graph), calibrated and
    checked as the module docstring says. Raises QuantizationError when it cannot be.
    Costs seconds (FBP of the calibration phantoms, one calibration pass): the int8 rows' set-up
    in docs/benchmarks.md, "Denoise engine (CPU)"."""
    if arch not in _NETWORKS:
        raise QuantizationError(f"no int8 graph for arch={arch!r} (only {', '.join(_NETWORKS)})")
    network = _NETWORKS[arch](depth).eval()
    try:
        network.load_state_dict(scripted.state_dict())
    except RuntimeError as exc:
        raise QuantizationError(
            f"the artifact's weights do not fit arch={arch!r}: {str(exc).splitlines()[0]}"
        ) from exc
    try:
        from torch.ao.quantization import QConfig, QConfigMapping
        from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as exc:  # removed from a future PyTorch: run fp32 (or migrate to torchao)
        raise QuantizationError(f"this PyTorch has no FX quantization: {exc}") from exc
    engine = "onednn" if "onednn" in torch.backends.quantized.supported_engines else "x86"
    qconfig = QConfig(  # type: ignore[no-untyped-call]
        activation=HistogramObserver.with_args(dtype=torch.quint8),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        ),
    )
    # phantoms spanning [0, 1]: for an artifact with a reference level that is wider than the
    # engine feeds (`calibration_units`), which keeps brighter scans from clipping (calibrated
    # at exactly the engine's units, inputs above them lost dBs to clipping)
    calibration, _ = foam_stacks(depth, CALIBRATION_SEED)
    # the wider slices' middles at the calibration size: their noise and streaks, at a quarter
    # of the calibration's cost
    wide = [
        _middle(
            foam_stacks(depth, CALIBRATION_SEED, rows=depth, size=size, centre_only=True)[0],
            CALIBRATION_SIZE,
        )
        for size in CALIBRATION_WIDE_SIZES
    ]
    held_out, _ = foam_stacks(depth, CHECK_SEED, rows=depth, centre_only=True)
    with _quantized_engine(engine), _deprecations_silenced(), _fx_stack_traces_off():
        mapping = QConfigMapping().set_global(qconfig)
        for name in FP32_MODULES:
            mapping = mapping.set_module_name(name, None)
        prepared = prepare_fx(copy.deepcopy(network), mapping, (calibration[:1],))
        with torch.inference_mode():
            for stacks in (calibration, *wide):  # the observers see them all
                prepared(stacks)
        quantized = convert_fx(prepared)
        for node in quantized.graph.nodes:
            if node.op == "call_function" and node.target is torch.cat:
                node.target = _join
        _pointwise_fp32(quantized)
        quantized.recompile()
        with torch.inference_mode():
            reference = network(held_out)  # the artifact's weights; no TorchScript warm-up
            output = quantized(held_out.contiguous(memory_format=torch.channels_last))
    difference = output - reference
    check = QuantizationCheck(
        rms=float(difference.pow(2).mean().sqrt()), max_abs=float(difference.abs().max())
    )
    if not check.rms <= INT8_RMS_TOLERANCE:
        raise QuantizationError(
            f"int8 strays from fp32 by rms {check.rms:.4f} of the data range "
            f"on a held-out phantom (tolerance {INT8_RMS_TOLERANCE})"
        )
    return quantized, check
