"""Random sizes and non-overlapping placement of balls in the sample's cylinder: where the
families put their grains, inclusions and cells (each solid lies inside its ball)."""

from __future__ import annotations

import math

import numpy as np

OVERHANG = 0.7  # a ball's centre may lie this fraction of its radius above or below the slices
_BATCH = 128  # candidate positions tried at once per ball
_MAX_TRIES = 30  # batches per ball before it is skipped
_MAX_BALLS = 20_000


def check_size(rows: int, size: int, attenuation: float, smallest: int = 16) -> None:
    """ValueError naming the argument when a phantom cannot be built from these."""
    if rows < 1 or size < smallest:
        raise ValueError(f"rows={rows}, size={size}: need rows >= 1 and size >= {smallest}")
    if not attenuation > 0:
        raise ValueError(f"attenuation={attenuation} must be > 0 (1 is the family's default)")


def draw_radii(
    rng: np.random.Generator,
    low: float,
    high: float,
    fill: float,
    container: float,
    rows: int,
) -> np.ndarray:
    """Log-uniform radii in [low, high], largest first, drawn until the balls would fill about
    `fill` of the slab (rows + the overhang) of a cylinder of radius `container`."""
    radii: list[float] = []
    filled = 0.0
    while filled < fill and len(radii) < _MAX_BALLS:
        radius = math.exp(rng.uniform(math.log(low), math.log(high)))
        height = rows + 2 * OVERHANG * radius
        filled += (4 / 3 * radius**3) / (container**2 * height)
        radii.append(radius)
    return np.sort(np.array(radii))[::-1]


def place_balls(
    radii: np.ndarray,
    container: float,
    rows: int,
    rng: np.random.Generator,
    gap: float,
) -> np.ndarray:
    """Random sequential placement, largest first: (n, 4) x, y, z, radius of balls inside the
    cylinder of radius `container` (less `gap`), at least `gap` apart; a ball that finds no room
    is skipped. Centres lie within OVERHANG radii of the slices [0, rows)."""
    placed = np.empty((0, 4))
    for radius in radii:
        reach = container - gap - radius
        if reach < 0:
            continue
        overhang = 0.5 + OVERHANG * radius
        for _ in range(_MAX_TRIES):
            rho = reach * np.sqrt(rng.random(_BATCH))
            phi = rng.uniform(0, 2 * math.pi, _BATCH)
            z = rng.uniform(-overhang, rows - 1 + overhang, _BATCH)
            candidates = np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)
            distance = np.linalg.norm(candidates[:, None, :] - placed[None, :, :3], axis=2)
            free = np.all(distance >= placed[None, :, 3] + radius + gap, axis=1)
            if free.any():
                placed = np.vstack([placed, [*candidates[np.argmax(free)], radius]])
                break
    return placed
