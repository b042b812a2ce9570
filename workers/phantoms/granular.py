"""Granular media: grains of three mineral phases and some pores packed in a lighter matrix,
with thin cracks through some of the grains (a sandstone or a concrete aggregate)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.phantom import CYLINDER_FRACTION
from workers.phantoms.packing import check_size, draw_radii, place_balls
from workers.phantoms.solids import Ellipsoid, SolidPhantom, cylinder, rotation_matrix

MATRIX = 0.3  # attenuation of the matrix, x the family's reference (1 / cylinder radius)
PHASES = (0.6, 0.85, 1.1)  # the grains' grey levels, same units
PHASE_ODDS = (0.5, 0.35, 0.15)
PORE_ODDS = 0.08  # a ball is a pore (attenuation 0) rather than a grain
CRACK_ODDS = 0.3  # a grain of >= 3 px inner radius has a crack through its middle
FILL = 0.45


@dataclass(frozen=True)
class GranularPhantom(SolidPhantom):
    """Grains (ellipsoids, aspect up to 1:0.55, any orientation) of three grey levels and pores
    in a matrix cylinder; cracks 0.6-1.2 px thick inside some grains."""

    @classmethod
    def random(
        cls, rows: int, size: int, seed: int = 0, attenuation: float = 1.0
    ) -> GranularPhantom:
        """Grain radii log-uniform from max(0.8, 0.006 size) to 0.1 size (a fifth of the field
        across); attenuation x `attenuation` (the longest chord integrates to about 1.5 at 1)."""
        check_size(rows, size, attenuation)
        rng = np.random.default_rng(seed)
        radius = CYLINDER_FRACTION * size
        mu = attenuation / radius
        radii = draw_radii(rng, max(0.8, 0.006 * size), 0.1 * size, FILL, radius, rows)
        solids = [cylinder(radius, MATRIX * mu)]
        for x, y, z, r in place_balls(radii, radius, rows, rng, gap=0.5):
            axes = r * np.array([1.0, *rng.uniform(0.55, 1.0, 2)])
            level = 0.0 if rng.random() < PORE_ODDS else PHASES[rng.choice(3, p=PHASE_ODDS)]
            centre = (float(x), float(y), float(z))
            semi_axes = (float(axes[0]), float(axes[1]), float(axes[2]))
            solids.append(Ellipsoid(centre, semi_axes, rotation_matrix(rng), (level - MATRIX) * mu))
            inner = float(axes.min())
            if level > 0 and inner >= 3 and rng.random() < CRACK_ODDS:
                crack = (0.85 * inner, 0.6 * inner, float(rng.uniform(0.3, 0.6)))
                solids.append(Ellipsoid(centre, crack, rotation_matrix(rng), -level * mu))
        return cls(rows, size, tuple(solids))
