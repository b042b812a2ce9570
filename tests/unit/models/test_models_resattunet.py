"""ResAttUnet: parameter counts per part, the residual-like box, the attention gate, shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.resattunet import AttentionGate, ResAttUnet, ResidualBox
from models.tomogan import count_parameters


@pytest.mark.parametrize(("depth", "expected"), [(1, 8_025_029), (3, 8_025_605)])
def test_parameter_count(depth: int, expected: int) -> None:
    # 8,024,741 + 288 per input slice.
    assert count_parameters(ResAttUnet(depth)) == expected


def test_parameters_per_part() -> None:
    """Same boxes and ups as the U-Net (a residual box has the same two convs), plus gates:
    1x1 theta (skip -> skip), phi (below -> skip), psi (skip -> 1), all with bias."""

    def box(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout

    def gate(skip: int, below: int) -> int:
        return (skip * skip + skip) + (below * skip + skip) + (skip + 1)

    net = ResAttUnet(depth=1)
    per_part = {name: count_parameters(part) for name, part in net.named_children()}
    widths = (32, 64, 128, 256, 512)
    levels = list(zip(widths[1:], widths[:-1], strict=True))  # (below, skip) per level
    assert per_part == {
        "encoder": box(1, 32) + box(32, 64) + box(64, 128) + box(128, 256),
        "bottleneck": box(256, 512),
        "upsample": sum(4 * big * small + small for big, small in levels),
        "gates": sum(gate(small, big) for big, small in levels),
        "decoder": sum(box(2 * w, w) for w in widths[:-1]),
        "head": 33,
    }


def test_residual_box_skips_only_the_second_conv() -> None:
    torch.manual_seed(0)
    box = ResidualBox(2, 4).eval()
    second_conv = box.second[0]
    assert isinstance(second_conv, nn.Conv2d)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        a = box.first(x)
        nn.init.zeros_(second_conv.weight)
        # With conv2 silenced, conv2's BN outputs its bias (0) and the box returns ReLU(a).
        torch.testing.assert_close(box(x), torch.relu(a))


def test_attention_gate_scales_the_skip_by_a_map_in_0_1() -> None:
    torch.manual_seed(0)
    gate = AttentionGate(skip_channels=4, gate_channels=8, inter_channels=4)
    skip, coarse = torch.rand(2, 4, 10, 6), torch.randn(2, 8, 5, 3)
    out = gate(skip, coarse)
    ratio = out / skip
    assert out.shape == skip.shape
    assert torch.all((ratio > 0) & (ratio < 1))
    # One map for all channels.
    torch.testing.assert_close(ratio[:, :1].expand_as(ratio), ratio)


@pytest.mark.parametrize(("height", "width"), [(16, 16), (24, 40), (33, 17)])
def test_output_shape_at_any_size(height: int, width: int) -> None:
    torch.manual_seed(0)
    out = ResAttUnet(3, filters=(4, 8, 16)).eval()(torch.randn(2, 3, height, width))
    assert out.shape == (2, 1, height, width)
