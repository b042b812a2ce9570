"""Ellipsoidal inclusions in a matrix: dense particles, voids and light inclusions of any shape
and orientation, half of the larger ones with smooth edges (a cast alloy, a filled polymer)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.phantom import CYLINDER_FRACTION
from workers.phantoms.packing import check_size, draw_radii, place_balls
from workers.phantoms.solids import (
    Ellipsoid,
    SolidPhantom,
    cylinder,
    rotation_matrix,
    soft_ellipsoid,
)

MATRIX = 0.6  # x the family's reference attenuation (1 / cylinder radius)
DENSE = (1.2, 2.0)  # a dense particle's attenuation range
LIGHT = (0.2, 0.45)
KIND_ODDS = (0.5, 0.3, 0.2)  # dense, void, light
SOFT_ODDS = 0.5  # an inclusion of >= 3 px inner semi-axis has a smooth edge
EDGE = (1.5, 4.0)  # width of a smooth edge, pixels
FILL = 0.3


@dataclass(frozen=True)
class InclusionPhantom(SolidPhantom):
    """Inclusions (ellipsoids, aspect up to 1:0.3) in a matrix cylinder; sharp or smooth edges."""

    @classmethod
    def random(
        cls, rows: int, size: int, seed: int = 0, attenuation: float = 1.0
    ) -> InclusionPhantom:
        """Radii log-uniform from 0.6 px to 0.1 size; attenuation x `attenuation` (the longest
        chord integrates to about 1.3-1.6 at 1)."""
        check_size(rows, size, attenuation)
        rng = np.random.default_rng(seed)
        radius = CYLINDER_FRACTION * size
        mu = attenuation / radius
        radii = draw_radii(rng, 0.6, 0.1 * size, FILL, radius, rows)
        solids = [cylinder(radius, MATRIX * mu)]
        for x, y, z, r in place_balls(radii, radius, rows, rng, gap=1.0):
            axes = r * np.array([1.0, *rng.uniform(0.3, 1.0, 2)])
            kind = rng.choice(3, p=KIND_ODDS)
            level = rng.uniform(*DENSE) if kind == 0 else 0.0 if kind == 1 else rng.uniform(*LIGHT)
            centre = (float(x), float(y), float(z))
            semi_axes = (float(axes[0]), float(axes[1]), float(axes[2]))
            rotation = rotation_matrix(rng)
            value = (level - MATRIX) * mu
            inner = float(axes.min())
            if inner >= 3 and rng.random() < SOFT_ODDS:
                edge = min(float(rng.uniform(*EDGE)), 0.6 * inner)
                solids += soft_ellipsoid(centre, semi_axes, rotation, value, edge)
            else:
                solids.append(Ellipsoid(centre, semi_axes, rotation, value))
        return cls(rows, size, tuple(solids))
