"""TomoGAN G and D: the published parameter counts and tensor shapes."""

from __future__ import annotations

import pytest
import torch

from models.tomogan import TomoGANDiscriminator, TomoGANGenerator, count_parameters


@pytest.mark.parametrize(("depth", "expected"), [(1, 694_897), (3, 694_913), (5, 694_929)])
def test_generator_parameter_count(depth: int, expected: int) -> None:
    # 694,897 at depth 1 is the published figure; each extra slice adds 8 stem weights.
    assert count_parameters(TomoGANGenerator(depth)) == expected


def test_generator_parameters_per_layer() -> None:
    """The wiring the docstring documents, layer by layer (skip concat before each decoder)."""
    generator = TomoGANGenerator(depth=1)
    per_part = {name: count_parameters(part) for name, part in generator.named_children()}
    assert per_part == {
        "stem": 16,
        "encoder": 11_584 + 55_424 + 221_440,
        "bottleneck": 147_584,
        "decoder": 184_448 + 46_144 + 27_712,
        "head": 545,
    }


@pytest.mark.parametrize(("patch_size", "expected"), [(256, 673_477), (64, 427_717)])
def test_discriminator_parameter_count(patch_size: int, expected: int) -> None:
    # Convs 411,204 + dense (4 * (patch/8)^2 * 64 + 64) + dense 65.
    assert count_parameters(TomoGANDiscriminator(patch_size)) == expected


@pytest.mark.parametrize(("depth", "height", "width"), [(1, 64, 64), (3, 40, 24), (5, 8, 16)])
def test_generator_output_shape(depth: int, height: int, width: int) -> None:
    torch.manual_seed(0)
    out = TomoGANGenerator(depth)(torch.randn(2, depth, height, width))
    assert out.shape == (2, 1, height, width)
    assert out.dtype == torch.float32


def test_generator_refuses_sizes_not_multiple_of_8() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        TomoGANGenerator(3)(torch.zeros(1, 3, 36, 40))


def test_generator_wrong_depth_fails() -> None:
    with pytest.raises(RuntimeError):
        TomoGANGenerator(3)(torch.zeros(1, 1, 32, 32))


def test_discriminator_output_shape() -> None:
    torch.manual_seed(0)
    logits = TomoGANDiscriminator(patch_size=64)(torch.randn(3, 1, 64, 64))
    assert logits.shape == (3, 1)


@pytest.mark.parametrize("bad", [0, 12, 100])
def test_discriminator_refuses_bad_patch(bad: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        TomoGANDiscriminator(patch_size=bad)


def test_generator_rejects_zero_depth() -> None:
    with pytest.raises(ValueError, match="depth=0"):
        TomoGANGenerator(0)
