"""The U-Net baseline: parameter counts per part and shapes at any size."""

from __future__ import annotations

import pytest
import torch

from models.tomogan import count_parameters
from models.unet import UNet, fit_to


@pytest.mark.parametrize(("depth", "expected"), [(1, 7_762_465), (3, 7_763_041)])
def test_parameter_count(depth: int, expected: int) -> None:
    # 7,762,177 + 288 per input slice (the first conv's 32 x 3 x 3 weights per channel).
    assert count_parameters(UNet(depth)) == expected


def test_parameters_per_part() -> None:
    """Boxes are conv(no bias)-BN-ReLU twice; ups are 2x2 transposed convs; head 1x1."""

    def box(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout

    unet = UNet(depth=1)
    per_part = {name: count_parameters(part) for name, part in unet.named_children()}
    widths = (32, 64, 128, 256, 512)
    levels = list(zip(widths[1:], widths[:-1], strict=True))  # (below, skip) per level
    assert per_part == {
        "encoder": box(1, 32) + box(32, 64) + box(64, 128) + box(128, 256),
        "bottleneck": box(256, 512),
        "upsample": sum(4 * big * small + small for big, small in levels),
        "decoder": sum(box(2 * w, w) for w in widths[:-1]),
        "head": 33,
    }


@pytest.mark.parametrize(("height", "width"), [(16, 16), (24, 40), (33, 17), (8, 8)])
def test_output_shape_at_any_size(height: int, width: int) -> None:
    torch.manual_seed(0)
    out = UNet(3, filters=(4, 8, 16)).eval()(torch.randn(2, 3, height, width))
    assert out.shape == (2, 1, height, width)


def test_fit_to_is_identity_on_matching_sizes() -> None:
    image = torch.randn(1, 2, 6, 10)
    assert torch.equal(fit_to(image, torch.zeros(1, 1, 6, 10)), image)
    assert fit_to(image, torch.zeros(1, 1, 5, 9)).shape == (1, 2, 5, 9)


def test_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="depth=0"):
        UNet(0)
    with pytest.raises(ValueError, match="filters"):
        UNet(1, filters=(8,))
