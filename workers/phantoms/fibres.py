"""Fibre composites: a laminate of plies, each of parallel round fibres at its own angle (along
the rotation axis, lying in the slice plane, or oblique), packed in a resin matrix."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.phantom import CYLINDER_FRACTION
from workers.phantoms.packing import check_size
from workers.phantoms.solids import (
    Ellipsoid,
    Polyhedron,
    Rod,
    SolidPhantom,
    cylinder,
    frame,
)

MATRIX = 0.35  # x the family's reference attenuation (1 / cylinder radius)
FIBRE = 1.0
OBLIQUE = (45.0, -45.0, 60.0, -60.0, 30.0, -30.0)  # ply angles from the rotation axis, degrees
DROPOUT = 0.1  # lattice sites left empty (resin-rich spots)
RESIN = 1.5  # pixels of resin between plies


def _lattice(
    rng: np.random.Generator, spacing: float, first: tuple[float, float], last: tuple[float, float]
) -> np.ndarray:
    """(n, 2) points of a hexagonal lattice of `spacing` at a random offset, within the box
    first..last, each moved at most 0.1 spacing; the empty-site dropout applied."""
    step = spacing * math.sqrt(3) / 2
    offset = rng.uniform(0, spacing, 2)
    js = np.arange(math.floor((first[1] - offset[1]) / step), math.ceil((last[1]) / step) + 1)
    i0 = math.floor((first[0] - offset[0]) / spacing) - 1
    is_ = np.arange(i0, math.ceil(last[0] / spacing) + 2)
    a = offset[0] + is_[None, :] * spacing + (js[:, None] % 2) * spacing / 2
    b = np.broadcast_to(offset[1] + js[:, None] * step, a.shape)
    points = np.stack([a.ravel(), b.ravel()], axis=1)
    points += rng.uniform(-0.1 * spacing / 2, 0.1 * spacing / 2, points.shape)
    keep = (points >= first).all(axis=1) & (points <= last).all(axis=1)
    keep &= rng.random(len(points)) >= DROPOUT
    return points[keep]


@dataclass(frozen=True)
class FibrePhantom(SolidPhantom):
    """3-5 plies across a resin cylinder, one at 0 deg (fibres along the rotation axis: disks in
    the slice), one at 90 deg (fibres in the slice plane), the others oblique (ellipses); fibre
    radius per ply 0.8 px to max(1.2, 0.014 size), 0.3-1 px apart."""

    @classmethod
    def random(cls, rows: int, size: int, seed: int = 0, attenuation: float = 1.0) -> FibrePhantom:
        """Plies of random thickness (together the cylinder's width, about 0.1-0.4 of the field
        each), the laminate at a random angle about the axis; attenuation x `attenuation` (the
        longest chord integrates to about 1.5 at 1)."""
        check_size(rows, size, attenuation)
        rng = np.random.default_rng(seed)
        radius = CYLINDER_FRACTION * size
        mu = attenuation / radius
        plies = int(rng.integers(3, 6))
        angles = [0.0, 90.0, *rng.choice(OBLIQUE, plies - 2, replace=False)]
        angles = [angles[i] for i in rng.permutation(plies)]
        widths = rng.dirichlet(np.full(plies, 3.0)) * (2 * radius - (plies - 1) * RESIN)
        psi = float(rng.uniform(0, math.pi))
        along = np.array([math.cos(psi), math.sin(psi)])  # in-plane direction of the plies
        across = np.array([-math.sin(psi), math.cos(psi)])  # normal of the plies
        ellipsoids = [cylinder(radius, MATRIX * mu)]
        rods: list[Polyhedron] = []
        value = (FIBRE - MATRIX) * mu
        z_mid = (rows - 1) / 2
        start = -radius
        for angle, width in zip(angles, widths, strict=True):
            band = (start, start + width)
            start += width + RESIN
            r = float(rng.uniform(0.8, max(1.2, 0.014 * size)))
            spacing = 2 * r + float(rng.uniform(0.3, 1.0))
            if angle == 90.0:  # in the slice plane: a lattice in (across, z)
                sites = _lattice(
                    rng, spacing, (band[0] + r, -0.5 - r), (band[1] - r, rows - 0.5 + r)
                )
                for n, z in sites:
                    length = math.sqrt(max(0.0, (radius - 0.5) ** 2 - (abs(n) + r) ** 2))
                    if length > 2 * r:
                        x, y = n * across
                        rods.append(Rod((float(x), float(y), float(z)), psi, r, length, value))
                continue
            tilt = math.radians(angle)
            # a lattice in (across, along * cos(tilt)): fibre axes `spacing` apart in 3D
            drift = abs(math.tan(tilt)) * (rows / 2 + 0.5)  # along-shift from mid to end slices
            half = r / math.cos(tilt)  # the section's half-length along the plies
            reach = radius - 0.5 - r
            sites = _lattice(
                rng,
                spacing,
                (band[0] + r, -reach * math.cos(tilt)),
                (band[1] - r, reach * math.cos(tilt)),
            )
            axis = np.array([*(math.sin(tilt) * along), math.cos(tilt)])
            rotation = frame(axis)
            for n, v in sites:
                t = v / math.cos(tilt)
                if math.hypot(abs(t) + drift + half, abs(n) + r) > radius - 0.5:
                    continue
                x, y = n * across + t * along
                centre = (float(x), float(y), z_mid)
                ellipsoids.append(Ellipsoid(centre, (r, r, math.inf), rotation, value))
        return cls(rows, size, tuple(ellipsoids), tuple(rods))
