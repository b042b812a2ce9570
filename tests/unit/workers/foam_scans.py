"""Foam scans as a detector takes them, for the preprocessing tests: the analytic projections
of `workers.phantom.FoamPhantom` (the reference, independent of our projector and FBP), photon
noise, and the reconstruction error against the voxelised phantom."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from workers.phantom import FoamPhantom
from workers.recon import recon


@dataclass(frozen=True)
class FoamScan:
    phantom: FoamPhantom
    theta: np.ndarray  # (angles,) radians
    line_integrals: np.ndarray  # (angles, rows, cols) float32, noiseless
    center: float  # tomocast's convention


@lru_cache(maxsize=16)
def foam_scan(
    cols: int,
    angles: int,
    rows: int = 2,
    offset: float = 0.0,
    seed: int = 0,
    turn: float = np.pi,
    radius: float | None = None,
    size: int | None = None,
) -> FoamScan:
    """A foam `size` (default cols) wide projected onto `cols` columns with the axis `offset`
    pixels right of the detector's middle, at `angles` angles evenly over [0, turn). The
    cylinder's radius defaults to 0.42 size, less where the offset would push it off the
    detector."""
    size = cols if size is None else size
    if radius is None:
        radius = min(0.42 * size, cols / 2 - abs(offset) - 3)
    phantom = FoamPhantom.random(rows=rows, size=size, seed=seed, cylinder_radius=radius)
    theta = np.arange(angles) * turn / angles
    center = cols / 2 + offset
    line_integrals = phantom.project(theta, cols=cols, center=center)
    return FoamScan(phantom, theta, line_integrals, center)


def counts(line_integrals: np.ndarray, photons: float, seed: int = 0) -> np.ndarray:
    """Poisson photon counts (float64) for `photons` per open-beam pixel."""
    rng = np.random.default_rng(seed)
    return rng.poisson(photons * np.exp(-line_integrals.astype(np.float64))).astype(np.float64)


def minus_log(counts: np.ndarray, photons: float) -> np.ndarray:
    """Line integrals from counts, a count of 0 read as 1 (as a detector's -log would clip)."""
    return (-np.log(np.maximum(counts, 1.0) / photons)).astype(np.float32)


def recon_error(tomo: np.ndarray, theta: np.ndarray, center: float, phantom: FoamPhantom) -> float:
    """RMS error of FBP of (angles, rows, cols) `tomo` about `center` against the voxelised
    phantom, inside 0.45 of the slice (the phantom's cylinder and a margin)."""
    slices = recon(tomo, theta, center=center, device="cpu")
    size = slices.shape[-1]
    truth = _truth(phantom, size)
    c = np.arange(size) - (size - 1) / 2
    inside = c[:, None] ** 2 + c[None, :] ** 2 < (0.45 * size) ** 2
    return float(np.sqrt(np.mean((slices - truth)[:, inside] ** 2)))


@lru_cache(maxsize=16)
def _truth(phantom: FoamPhantom, size: int) -> np.ndarray:
    from dataclasses import replace

    return replace(phantom, size=size).voxelize()
