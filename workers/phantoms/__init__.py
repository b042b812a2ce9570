"""Phantom families: what beamlines image, each with exact parallel-beam projections.

`FAMILIES` maps a name to a class with `random(rows, size, seed=..., attenuation=...)`; its
phantoms have `voxelize()` -> (rows, N, N) attenuation per pixel and `project(theta, cols,
center)` -> (angles, rows, cols) line integrals, with `workers.phantom.FoamPhantom`'s geometry.
`attenuation` scales every value (1: the family's default, about as opaque as the foam).

`HELD_OUT` names the family that no training data may use: evaluation scores it to show how a
model does on structure it never saw. Training code checks it (`workers.lowdose`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

import numpy as np

from workers.phantom import FoamPhantom
from workers.phantoms.cells import CellPhantom
from workers.phantoms.fibres import FibrePhantom
from workers.phantoms.granular import GranularPhantom
from workers.phantoms.inclusions import InclusionPhantom
from workers.phantoms.layered import LayeredPhantom


class Phantom(Protocol):
    """A sample: voxel truth and exact projections in the same units and geometry."""

    @property
    def rows(self) -> int: ...

    @property
    def size(self) -> int: ...

    def voxelize(self, supersample: int = 3) -> np.ndarray: ...

    def project(
        self,
        theta: np.ndarray,
        cols: int | None = None,
        center: float | None = None,
        supersample: int = 3,
    ) -> np.ndarray: ...


class PhantomFamily(Protocol):
    """A family's class: random phantoms, reproducible per seed."""

    def random(
        self, rows: int, size: int, *, seed: int = 0, attenuation: float = 1.0
    ) -> Phantom: ...


FAMILIES: Mapping[str, PhantomFamily] = MappingProxyType(
    {
        "foam": FoamPhantom,
        "granular": GranularPhantom,
        "fibres": FibrePhantom,
        "layered": LayeredPhantom,
        "cells": CellPhantom,
        "inclusions": InclusionPhantom,
    }
)
# Never in training data: low-contrast, soft-edged, nested structure that no other family has.
HELD_OUT = "cells"
TRAINING_FAMILIES = tuple(name for name in FAMILIES if name != HELD_OUT)


def make_phantom(
    family: str, rows: int, size: int, seed: int = 0, attenuation: float = 1.0
) -> Phantom:
    """A random phantom of `family`; ValueError naming the families for an unknown one."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family].random(rows, size, seed=seed, attenuation=attenuation)
