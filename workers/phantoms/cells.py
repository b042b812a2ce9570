"""Soft tissue: cells with nuclei, nucleoli and vesicles in a watery medium, contrast a few
percent, soft membranes. Nothing else here is this faint or this smooth: the held-out family."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.phantom import CYLINDER_FRACTION
from workers.phantoms.packing import check_size, draw_radii, place_balls
from workers.phantoms.solids import (
    IDENTITY,
    Ellipsoid,
    SolidPhantom,
    Vector,
    cylinder,
    rotation_matrix,
    soft_ellipsoid,
)

MEDIUM = 0.9  # x the family's reference attenuation (1 / cylinder radius)
CYTOPLASM = 0.03  # contrasts, fractions of the medium's attenuation
NUCLEUS = 0.05  # over the cytoplasm
NUCLEOLUS = 0.04  # over the nucleus
VESICLE = -0.05  # against the cytoplasm
FILL = 0.5


def _at(centre: Vector, rng: np.random.Generator, distance: float) -> Vector:
    direction = rng.normal(size=3)
    direction *= distance / np.linalg.norm(direction)
    return (centre[0] + direction[0], centre[1] + direction[1], centre[2] + direction[2])


@dataclass(frozen=True)
class CellPhantom(SolidPhantom):
    """Cells (ellipsoids with 1-2.5 px soft membranes) with a nucleus each, 0-2 nucleoli and 0-4
    vesicles, in a medium cylinder."""

    @classmethod
    def random(cls, rows: int, size: int, seed: int = 0, attenuation: float = 1.0) -> CellPhantom:
        """Cell radii log-uniform from max(3, 0.03 size) to max(6, 0.09 size); nucleoli and
        vesicles 0.6-2 px; attenuation x `attenuation` (the longest chord integrates to about
        1.9 at 1)."""
        check_size(rows, size, attenuation)
        rng = np.random.default_rng(seed)
        radius = CYLINDER_FRACTION * size
        mu = attenuation / radius
        medium = MEDIUM * mu
        low, high = max(3.0, 0.03 * size), max(6.0, 0.09 * size)
        radii = draw_radii(rng, low, high, FILL, radius, rows)
        solids = [cylinder(radius, medium)]
        for x, y, z, r in place_balls(radii, radius, rows, rng, gap=1.0):
            axes = r * np.array([1.0, *rng.uniform(0.7, 1.0, 2)])
            centre = (float(x), float(y), float(z))
            semi_axes = (float(axes[0]), float(axes[1]), float(axes[2]))
            inner = float(axes.min())
            membrane = min(float(rng.uniform(1.0, 2.5)), 0.4 * inner)
            solids += soft_ellipsoid(
                centre, semi_axes, rotation_matrix(rng), CYTOPLASM * medium, membrane, shells=3
            )
            nucleus = float(rng.uniform(0.35, 0.5)) * inner
            solids += soft_ellipsoid(
                centre, (nucleus,) * 3, IDENTITY, NUCLEUS * medium, min(1.0, 0.4 * nucleus), 2
            )
            for _ in range(rng.integers(0, 3)):
                small = float(rng.uniform(0.6, 1.5))
                if nucleus - small - 0.3 > 0:
                    where = _at(centre, rng, float(rng.uniform(0, nucleus - small - 0.3)))
                    solids.append(Ellipsoid(where, (small,) * 3, IDENTITY, NUCLEOLUS * medium))
            for _ in range(rng.integers(0, 5)):
                small = float(rng.uniform(0.6, 2.0))
                near, far = nucleus + small + 0.5, inner - membrane - small - 0.5
                if far > near:
                    where = _at(centre, rng, float(rng.uniform(near, far)))
                    solids.append(Ellipsoid(where, (small,) * 3, IDENTITY, VESICLE * medium))
        return cls(rows, size, tuple(solids))
