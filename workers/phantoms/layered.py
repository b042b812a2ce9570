"""Layered and graded material: a bar of rectangular section cut into layers of uniform or
linearly graded attenuation, some only a pixel or two thick (coatings, delaminations): a battery
electrode stack, a coated part, a sediment core."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.phantom import CYLINDER_FRACTION
from workers.phantoms.packing import check_size
from workers.phantoms.solids import Polyhedron, Prism, SolidPhantom

LEVELS = (0.3, 1.5)  # a layer's attenuation range, x the reference (1 / (0.42 size))
THIN = (1.0, 3.0)  # a thin layer's thickness, pixels
KIND_ODDS = (0.55, 0.3, 0.15)  # uniform, graded, gap (thin layers only: a delamination)
THIN_ODDS = 0.3
HALF_DIAGONAL = 0.4  # of the size: the bar's corners stay inside the reconstruction circle


@dataclass(frozen=True)
class LayeredPhantom(SolidPhantom):
    """5-9 layers through a bar (half-widths 0.2-0.28 size, turned about the axis); the layers
    lean up to 7 deg against the bar's faces and 2.3 deg out of the slice plane, so they move
    slowly from slice to slice."""

    @classmethod
    def random(
        cls, rows: int, size: int, seed: int = 0, attenuation: float = 1.0
    ) -> LayeredPhantom:
        """Layers of 1-3 px (thin) up to about a fifth of the field; attenuation x
        `attenuation` (the longest chord integrates to about 1.5-2 at 1)."""
        check_size(rows, size, attenuation)
        rng = np.random.default_rng(seed)
        mu = attenuation / (CYLINDER_FRACTION * size)
        half = rng.uniform(0.2, 0.28, 2) * size
        half *= min(1.0, HALF_DIAGONAL * size / float(np.hypot(*half)))
        psi = float(rng.uniform(0, math.pi))
        faces = ((math.cos(psi), math.sin(psi), 0.0), (-math.sin(psi), math.cos(psi), 0.0))
        lean, tilt = rng.uniform(-0.12, 0.12), rng.uniform(-0.04, 0.04)
        phi = psi + math.pi / 2 + lean
        normal = (math.cos(phi) * math.cos(tilt), math.sin(phi) * math.cos(tilt), math.sin(tilt))
        corners = np.array([[sx * half[0], sy * half[1]] for sx in (-1, 1) for sy in (-1, 1)])
        rotated = corners @ np.array([faces[0][:2], faces[1][:2]])
        reach = float(np.abs(rotated @ np.array(normal[:2])).max()) + abs(normal[2]) * rows + 1
        count = int(rng.integers(5, 10))
        thin = rng.random(count) < THIN_ODDS
        thickness = np.where(thin, rng.uniform(*THIN, count), 0.0)
        thick = rng.exponential(1.0, count) * ~thin
        if not thick.any():
            thick[np.argmax(thickness)], thin[np.argmax(thickness)] = 1.0, False
        thickness += thick / thick.sum() * max(2 * reach - thickness.sum(), 0.0)
        layers: list[Polyhedron] = []
        level = -reach
        for width, is_thin in zip(thickness, thin, strict=True):
            lo, hi = level, level + float(width)
            level = hi
            kind = rng.choice(3, p=KIND_ODDS) if is_thin else rng.choice(2, p=(0.6, 0.4))
            first, last = rng.uniform(*LEVELS, 2) * mu
            if kind == 2:
                continue  # a gap: nothing there
            slope = (last - first) / (hi - lo) if kind == 1 else 0.0
            layers.append(
                Prism(
                    (faces[0], faces[1], normal),
                    (-float(half[0]), -float(half[1]), lo),
                    (float(half[0]), float(half[1]), hi),
                    float(first - slope * lo),
                    (slope * normal[0], slope * normal[1], slope * normal[2]),
                )
            )
        return cls(rows, size, (), tuple(layers))
