"""Tiles with a halo: the plan, the measured receptive field, whole-slice equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.tomogan import TomoGANGenerator
from workers.tiling import core_for_budget, plan_tiles, receptive_radius, run_tiled


@pytest.mark.parametrize(
    ("height", "width", "core", "halo", "multiple"),
    [(64, 64, 16, 8, 8), (200, 136, 64, 56, 8), (8, 8, 64, 0, 8), (37, 29, 5, 3, 1)],
)
def test_cores_cover_the_image_once_and_windows_stay_inside(
    height: int, width: int, core: int, halo: int, multiple: int
) -> None:
    covered = np.zeros((height, width), dtype=int)
    for tile in plan_tiles(height, width, core, halo, multiple):
        covered[tile.core] += 1
        for window, inner, kept, side in zip(
            tile.window, tile.inner, tile.core, (height, width), strict=True
        ):
            assert window.start >= 0 and window.stop <= side
            assert window.start % multiple == 0  # on the pooling grid
            assert window.start + inner.start == kept.start
            assert window.start + inner.stop == kept.stop
            # a halo of real neighbours wherever the image has them
            assert kept.start - window.start == min(halo, kept.start)
            assert window.stop - kept.stop == min(halo, side - kept.stop)
    assert (covered == 1).all()


def test_plan_refuses_tiles_off_the_pooling_grid() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_tiles(64, 64, 12, 8, 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_tiles(64, 64, 16, 4, 8)


def test_core_for_budget() -> None:
    assert core_for_budget(128 * 128, 32, 8) == 64
    assert core_for_budget(100, 32, 8) == 8  # a tile must make progress whatever the budget
    assert core_for_budget(130 * 130, 32, 8) % 8 == 0


def _conv_chain(convs: int, kernel: int) -> nn.Module:
    # Linear on purpose: a ReLU that is dead on the probe's input would hide its paths.
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 2, kernel, padding=kernel // 2) for _ in range(convs)]
    return nn.Sequential(nn.Conv2d(3, 2, 1), *layers).eval()


@pytest.mark.parametrize(
    ("convs", "kernel", "multiple", "expected"), [(5, 3, 1, 5), (3, 5, 1, 6), (5, 3, 8, 8)]
)
def test_receptive_radius_of_conv_chains(
    convs: int, kernel: int, multiple: int, expected: int
) -> None:
    # n 'same' convolutions of size k reach n * (k // 2) pixels, rounded up to the grid
    assert receptive_radius(_conv_chain(convs, kernel), 3, multiple, size=64) == expected


def test_receptive_radius_refuses_a_probe_too_small() -> None:
    with pytest.raises(ValueError, match="probe's edge"):
        receptive_radius(_conv_chain(20, 3), 3, 1, size=32)


@pytest.fixture(scope="module")
def tomogan() -> nn.Module:
    torch.manual_seed(1)
    return TomoGANGenerator(depth=3).eval()


def test_tomogan_reach_is_measured_on_every_grid_phase(tomogan: nn.Module) -> None:
    # The reach differs by a few pixels between the 8 phases of the pooling grid; the worst
    # phase of this network reaches 50 px, beyond a single centred probe (48).
    assert receptive_radius(tomogan, 3, 8) == 56


@pytest.mark.parametrize(("height", "width", "core"), [(200, 136, 64), (96, 96, 8), (64, 120, 32)])
def test_tiles_with_the_measured_halo_give_the_whole_slice(
    tomogan: nn.Module, height: int, width: int, core: int
) -> None:
    image = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(2))
    halo = receptive_radius(tomogan, 3, 8)
    with torch.inference_mode():
        whole = tomogan(image)
        tiled = run_tiled(tomogan, image, core, halo, 8)
    scale = float(whole.abs().max())
    # Only float rounding differs (conv algorithms chosen per tile size): ~1e-7 relative.
    np.testing.assert_allclose(tiled.numpy(), whole.numpy(), rtol=0, atol=1e-5 * scale)


def test_tiles_without_a_halo_do_not(tomogan: nn.Module) -> None:
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = tomogan(image)
        tiled = run_tiled(tomogan, image, 32, 0, 8)
    assert float((tiled - whole).abs().max()) > 1e-3 * float(whole.abs().max())


def test_run_tiled_needs_a_padded_image(tomogan: nn.Module) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        run_tiled(tomogan, torch.zeros(1, 3, 30, 32), 16, 8, 8)
