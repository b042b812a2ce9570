"""Overlapping tiles with a halo, for slices whose activations exceed the denoiser's memory limit.

A convolutional network's output pixel depends only on the input within its receptive-field
radius. So a slice can be cut into tiles that each carry `halo` pixels of real neighbours on every
inner side; running the network per tile and keeping each tile's core reproduces the whole-slice
result (to float rounding) when

- `halo` is at least that radius: the zero padding each convolution adds at a tile's edge is then
  never seen by a core pixel, and
- every tile starts on the network's pooling grid (a multiple of `multiple`, 8 for TomoGAN's three
  2x2 max-pools): max-pool windows and the bilinear upsampling then line up with the whole slice's.

At the slice's own edges a tile stops at the edge, where the network sees the same padding as on
the whole slice. `receptive_radius` measures the radius of any network by probing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (batch, channels, h, w) -> (batch, out_channels, h, w), shape-preserving in h and w.
TileFunction = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tile:
    """One tile: the `window` of the input the network sees, the `core` of the output it fills,
    and where that core lies inside the window (`inner`). Rows first, then columns."""

    window: tuple[slice, slice]
    core: tuple[slice, slice]
    inner: tuple[slice, slice]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _spans(length: int, core: int, halo: int) -> list[tuple[slice, slice, slice]]:
    """Cut [0, length) into cores of `core`, each widened by `halo` where the axis allows."""
    spans = []
    for start in range(0, length, core):
        stop = min(length, start + core)
        lo, hi = max(0, start - halo), min(length, stop + halo)
        spans.append((slice(lo, hi), slice(start, stop), slice(start - lo, stop - lo)))
    return spans


def plan_tiles(height: int, width: int, core: int, halo: int, multiple: int = 1) -> list[Tile]:
    """The tiles covering a (height, width) image, each core at most `core` x `core`.

    `core` and `halo` must be multiples of `multiple`, so that every window starts on the
    pooling grid; the cores partition the image exactly once.
    """
    if core < 1 or halo < 0 or multiple < 1:
        raise ValueError(
            f"need core >= 1, halo >= 0, multiple >= 1; got core={core} "
            f"halo={halo} multiple={multiple}"
        )
    if core % multiple or halo % multiple:
        raise ValueError(
            f"core={core} and halo={halo} must be multiples of {multiple} (the "
            "network's pooling grid), or tiles would not match the whole slice"
        )
    return [
        Tile((rows[0], cols[0]), (rows[1], cols[1]), (rows[2], cols[2]))
        for rows in _spans(height, core, halo)
        for cols in _spans(width, core, halo)
    ]


def core_for_budget(max_pixels: int, halo: int, multiple: int) -> int:
    """The largest tile core (a multiple of `multiple`) whose window, halo on both sides, holds
    at most `max_pixels`; at least `multiple` whatever the budget (a tile must make progress)."""
    side = int(max_pixels**0.5) - 2 * halo
    return max(multiple, side // multiple * multiple)


def run_tiled(
    network: TileFunction, image: torch.Tensor, core: int, halo: int, multiple: int = 1
) -> torch.Tensor:
    """`network` applied to (batch, channels, H, W) `image` tile by tile; returns what
    `network(image)` would, allocating one output and one window at a time.

    H and W need not be multiples of `core`; edge tiles are smaller (still on the grid, as long
    as H and W are multiples of `multiple`, which the caller's padding guarantees).
    """
    height, width = image.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(f"image {height} x {width} must be padded to multiples of {multiple}")
    out: torch.Tensor | None = None
    for tile in plan_tiles(height, width, core, halo, multiple):
        (window_rows, window_cols), (rows, cols), (inner_rows, inner_cols) = (
            tile.window,
            tile.core,
            tile.inner,
        )
        result = network(image[..., window_rows, window_cols])
        if out is None:
            out = result.new_empty((*result.shape[:-2], height, width))
        out[..., rows, cols] = result[..., inner_rows, inner_cols]
    assert out is not None  # an image has at least one tile
    return out


def receptive_radius(
    network: TileFunction, channels: int, multiple: int = 1, size: int = 160, seed: int = 0
) -> int:
    """How far (in pixels) a change of one input pixel reaches in the output, measured.

    Perturbs one pixel near the centre of a random image, at each of the `multiple` phases of the
    pooling grid (the reach differs by a few pixels between them), and finds the farthest output
    pixel that moved. Random (not zero) inputs keep the ReLUs of a trained network active along
    every path; a unit that is dead on them would hide its paths, and the radius read short.
    `size` must exceed twice the radius; the result is rounded up to `multiple`.
    """
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, channels, size, size, generator=generator)
    probes = image.repeat(multiple + 1, 1, 1, 1)
    centre = size // 2
    for phase in range(multiple):
        probes[phase + 1, :, centre + phase, centre + phase] += 1.0
    with torch.inference_mode():
        out = network(probes)
    reach = 0
    for phase in range(multiple):
        changed = (out[phase + 1] - out[0]).abs().amax(dim=0) > 0
        rows, cols = torch.nonzero(changed, as_tuple=True)
        if rows.numel():
            where = centre + phase
            reach = max(reach, int((rows - where).abs().max()), int((cols - where).abs().max()))
    if reach >= centre - multiple:
        raise ValueError(f"the receptive field reaches the probe's edge: use size > {size}")
    return _round_up(reach, multiple)
