"""int8 quantization of TomoGAN: the traceable graph, the requantizing join, refusals."""

from __future__ import annotations

import pytest
import torch

from models.artifact import load_artifact
from models.tomogan import TomoGANGenerator
from workers.denoise import default_artifact_path
from workers.quantize import (
    FP32_MODULES,
    INT8_RMS_TOLERANCE,
    QuantizationError,
    _join,
    _Pointwise,
    _pointwise_fp32,
    _TraceableTomoGAN,
    quantizable,
    quantize_int8,
)


def test_traceable_graph_is_the_generator_exactly() -> None:
    # The FX-traceable copy of TomoGANGenerator.forward must not drift from the original.
    torch.manual_seed(0)
    original = TomoGANGenerator(depth=3).eval()
    traceable = _TraceableTomoGAN(depth=3).eval()
    traceable.load_state_dict(original.state_dict())
    x = torch.rand(2, 3, 48, 40)
    with torch.inference_mode():
        torch.testing.assert_close(traceable(x), original(x), rtol=0, atol=0)


# Quantized tensors are deprecated (a UserWarning); torch.cat warns about mixed scales.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_join_covers_both_ranges() -> None:
    low = torch.quantize_per_tensor(torch.rand(1, 2, 4, 4), 0.01, 0, torch.quint8)
    high = torch.quantize_per_tensor(torch.rand(1, 3, 4, 4) * 5, 0.02, 0, torch.quint8)
    joined = _join([low, high], 1)
    expected = torch.cat([low.dequantize(), high.dequantize()], dim=1)
    # one step of the wider scale at most; torch.cat would clip `high` at 2.55
    assert float((joined.dequantize() - expected).abs().max()) <= 0.02
    assert torch.cat([low, high], dim=1).dequantize().max() <= 2.56


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_is_the_1x1_convolution(relu: bool, channels_last: bool) -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(5, 3, 1)
    reference = torch.nn.Sequential(conv, torch.nn.ReLU()) if relu else conv
    x = torch.randn(2, 5, 24, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, got = reference(x), _Pointwise(conv, relu)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if channels_last:  # the next layer gets the layout it was given
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_only_fp32_pointwise_convolutions_are_replaced() -> None:
    from torch.ao.nn.intrinsic import ConvReLU2d

    network = torch.nn.Sequential(
        ConvReLU2d(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU()),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.Conv2d(4, 2, 1, stride=2),
        torch.nn.Conv2d(2, 1, 1),
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        expected = network(x)
        _pointwise_fp32(network)
        got = network(x)
    assert [type(m).__name__ for m in network] == ["_Pointwise", "Conv2d", "Conv2d", "_Pointwise"]
    assert network[0].relu and not network[3].relu
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_shipped_model_quantizes_within_tolerance() -> None:
    module, metadata = load_artifact(default_artifact_path("cpu"))
    quantized, check = quantize_int8(module, metadata.arch, metadata.depth)
    assert check.rms <= INT8_RMS_TOLERANCE
    assert not any(node.target is torch.cat for node in quantized.graph.nodes)
    # what stays fp32 runs as a matrix product; the rest is int8
    kept = {name: type(quantized.get_submodule(name)) for name in ("stem.0", "head.2")}
    assert set(FP32_MODULES) == {"stem", "head.2"} and set(kept.values()) == {_Pointwise}
    head = type(quantized.get_submodule("head.0"))
    assert head.__module__.startswith("torch.ao.nn.intrinsic.quantized")


def test_refusals() -> None:
    assert quantizable("tomogan") and not quantizable("unet")
    module, _ = load_artifact(default_artifact_path("cpu"))
    with pytest.raises(QuantizationError, match="arch='unet'"):
        quantize_int8(module, "unet", 3)
    with pytest.raises(QuantizationError, match="do not fit arch='tomogan'"):
        quantize_int8(module, "tomogan", 5)  # the stem expects 3 channels
