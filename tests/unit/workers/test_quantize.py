"""int8 quantization of TomoGAN: the traceable graph, the requantizing join, refusals."""

from __future__ import annotations

import pytest
import torch

from models.artifact import load_artifact
from models.tomogan import TomoGANGenerator
from workers.denoise import default_artifact_path
from workers.quantize import (
    INT8_RMS_TOLERANCE,
    QuantizationError,
    _join,
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


def test_shipped_model_quantizes_within_tolerance() -> None:
    module, metadata = load_artifact(default_artifact_path("cpu"))
    quantized, check = quantize_int8(module, metadata.arch, metadata.depth)
    assert check.rms <= INT8_RMS_TOLERANCE
    assert not any(node.target is torch.cat for node in quantized.graph.nodes)


def test_refusals() -> None:
    assert quantizable("tomogan") and not quantizable("unet")
    module, _ = load_artifact(default_artifact_path("cpu"))
    with pytest.raises(QuantizationError, match="arch='unet'"):
        quantize_int8(module, "unet", 3)
    with pytest.raises(QuantizationError, match="do not fit arch='tomogan'"):
        quantize_int8(module, "tomogan", 5)  # the stem expects 3 channels
