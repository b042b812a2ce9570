"""A 3D foam phantom with analytic parallel-beam projections, for simulation and tests.

A cylinder (axis along z, the rotation axis) of attenuation `mu` per pixel with non-overlapping
spherical pores removed. Coordinates follow docs/DESIGN's geometry: slice pixel (row, col) of an
N x N slice sits at x = col - (N-1)/2, y = (N-1)/2 - row; slice z (detector row z) sits at z.
At angle theta the ray at signed distance s = x*cos(theta) + y*sin(theta) meets detector column
u = s + (center - 0.5).

`project` is analytic: chord lengths of disks integrated exactly across each detector pixel's
width (the limit of supersampling it) and averaged over `supersample` sub-rows across its height,
so a detector pixel and a voxel measure the same partial-volume average.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

CYLINDER_FRACTION = 0.42  # cylinder radius / slice size: inside the reconstruction circle (0.5)
WALL = 1.0  # pixels of solid kept between pores, and between a pore and the cylinder's surface
POROSITY = 0.3  # pore volume fraction aimed at when n_spheres is not given
_BATCH = 256  # candidate positions tried at once per sphere
_MAX_TRIES = 40  # batches per sphere before giving up


@dataclass(frozen=True)
class Sphere:
    """A pore: centre (x, y) in slice pixel coordinates, z in slice-index coordinates."""

    x: float
    y: float
    z: float
    radius: float


@dataclass(frozen=True)
class FoamPhantom:
    """An immutable foam sample; safe to share between threads."""

    rows: int
    size: int
    cylinder_radius: float
    mu: float
    spheres: tuple[Sphere, ...]

    @classmethod
    def random(
        cls,
        rows: int,
        size: int,
        n_spheres: int | None = None,
        radius_range: tuple[float, float] | None = None,
        mu: float | None = None,
        seed: int = 0,
        cylinder_radius: float | None = None,
        attenuation: float = 1.0,
    ) -> FoamPhantom:
        """A random foam of `rows` slices of `size` x `size` pixels.

        Defaults: cylinder radius 0.42*size; `mu` = `attenuation`/cylinder_radius, so at
        attenuation 1 the longest chord (the diameter) integrates to 2 (13.5% transmission);
        pore radii uniform in (max(1.5, 0.02*size), max(3, 0.06*size)); enough pores for ~30%
        porosity, placed as far as random sequential packing allows. An explicit `n_spheres`
        that does not fit raises ValueError. Pores lie fully inside the cylinder radially and
        may be cut by the top and bottom slices.
        """
        if rows < 1 or size < 2:
            raise ValueError(f"rows={rows}, size={size}: need rows >= 1 and size >= 2")
        radius = CYLINDER_FRACTION * size if cylinder_radius is None else float(cylinder_radius)
        if not 0 < radius <= size / 2:
            raise ValueError(f"cylinder_radius={radius} must be in (0, size/2={size / 2}]")
        if not attenuation > 0:
            raise ValueError(f"attenuation={attenuation} must be > 0 (1 is the default foam's)")
        mu = attenuation / radius if mu is None else float(mu)
        if radius_range is None:
            low = max(1.5, 0.02 * size)
            radius_range = (low, max(3.0, 0.06 * size, low))
        r_min, r_max = (float(r) for r in radius_range)
        if not 0 < r_min <= r_max:
            raise ValueError(f"radius_range={radius_range} must satisfy 0 < low <= high")
        rng = np.random.default_rng(seed)
        exact = n_spheres is not None
        if n_spheres is None:
            mean_volume = (
                math.pi * (r_max**4 - r_min**4) / (3 * (r_max - r_min))
                if (r_max > r_min)
                else 4 / 3 * math.pi * r_min**3
            )
            n_spheres = int(POROSITY * math.pi * radius**2 * rows / mean_volume)
        radii = np.sort(rng.uniform(r_min, r_max, n_spheres))[::-1]  # big first packs better
        placed = _place(radii, radius, rows, rng, give_up_early=exact)
        if len(placed) < n_spheres:
            if exact:
                raise ValueError(
                    f"could place only {len(placed)} of n_spheres={n_spheres} pores "
                    f"with radii {radius_range}: ask for fewer or smaller ones"
                )
            log.debug("foam: placed %d of %d pores", len(placed), n_spheres)
        spheres = tuple(Sphere(*(float(v) for v in row)) for row in placed)
        return cls(rows, size, radius, mu, spheres)

    def sphere_table(self) -> np.ndarray:
        """(n_spheres, 4) float64 columns x, y, z, radius."""
        return np.array(
            [[s.x, s.y, s.z, s.radius] for s in self.spheres], dtype=np.float64
        ).reshape(-1, 4)

    def voxelize(self, supersample: int = 3) -> np.ndarray:
        """(rows, size, size) float32 attenuation per pixel; each voxel averages
        supersample**3 sub-voxel samples (partial volume at every edge)."""
        n, k = self.size, supersample
        half = (n - 1) / 2
        sub = (np.arange(k) + 0.5) / k - 0.5
        x = (np.arange(n)[:, None] + sub[None, :]).ravel() - half
        inside = x[None, :] ** 2 + x[:, None] ** 2 < self.cylinder_radius**2  # symmetric in y
        volume = np.empty((self.rows, n, n), dtype=np.float64)
        volume[:] = self.mu * inside.reshape(n, k, n, k).mean(axis=(1, 3))
        for sphere in self.spheres:
            z0, z1 = _span(sphere.z, sphere.radius, self.rows)
            r0, r1 = _span(half - sphere.y, sphere.radius, n)
            c0, c1 = _span(sphere.x + half, sphere.radius, n)
            if z0 >= z1 or r0 >= r1 or c0 >= c1:
                continue
            dz = (np.arange(z0, z1)[:, None] + sub).ravel() - sphere.z
            dy = half - (np.arange(r0, r1)[:, None] + sub).ravel() - sphere.y
            dx = (np.arange(c0, c1)[:, None] + sub).ravel() - half - sphere.x
            pore = (
                dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2
                < sphere.radius**2
            )
            fraction = pore.reshape(z1 - z0, k, r1 - r0, k, c1 - c0, k).mean(axis=(1, 3, 5))
            volume[z0:z1, r0:r1, c0:c1] -= self.mu * fraction
        return volume.astype(np.float32)

    def project(
        self,
        theta: np.ndarray,
        cols: int | None = None,
        center: float | None = None,
        supersample: int = 3,
    ) -> np.ndarray:
        """(angles, rows, cols) float32 line integrals (attenuation per pixel x pixels).

        `theta` in radians; `center` in TomoPy's convention (default cols/2, the detector's
        middle). Each detector pixel integrates exactly across its width and averages
        `supersample` sub-rows across its height.
        """
        theta = np.asarray(theta, dtype=np.float64).reshape(-1)
        cols = self.size if cols is None else int(cols)
        center = cols / 2.0 if center is None else float(center)
        sub = (np.arange(supersample) + 0.5) / supersample - 0.5
        edges = np.arange(cols + 1) - center  # s at the detector pixels' edges
        cylinder = self.mu * np.diff(_chord_integral(edges, self.cylinder_radius))
        # two spare columns catch pore windows that run off the detector's sides
        padded = np.empty((theta.size, self.rows, cols + 2), dtype=np.float64)
        padded[:] = np.pad(cylinder, 1)
        flat_view = padded.reshape(-1)
        cos, sin = np.cos(theta), np.sin(theta)
        for sphere in self.spheres:
            z0, z1 = _span(sphere.z, sphere.radius, self.rows)
            if z0 >= z1:
                continue
            dz = np.arange(z0, z1)[:, None] + sub[None, :] - sphere.z
            section = np.sqrt(np.clip(sphere.radius**2 - dz**2, 0.0, None))  # (nz, supersample)
            offset = sphere.x * cos + sphere.y * sin  # s of the pore's centre, per angle
            width = math.ceil(2 * sphere.radius) + 2
            first = np.floor(offset - sphere.radius + center).astype(np.int64)
            window = first[:, None] + np.arange(width + 1)  # (angles, width+1) pixel edges
            rel = window - center - offset[:, None]
            integral = _chord_integral(rel[:, None, None, :], section[None, :, :, None])
            chords = np.diff(integral.mean(axis=2), axis=-1)  # (angles, nz, width)
            column = np.clip(window[:, :-1], -1, cols) + 1
            line = np.arange(theta.size)[:, None] * self.rows + np.arange(z0, z1)  # (angles, nz)
            flat = line[:, :, None] * (cols + 2) + column[:, None, :]
            chords *= self.mu
            flat_view[flat.ravel()] -= chords.ravel()
        return padded[:, :, 1:-1].astype(np.float32)


def _chord_integral(t: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
    """Integral of the chord length 2*sqrt(r^2 - s^2) of a disk of radius r over s from 0 to t
    (clipped to the disk), so differences over pixel edges give pixel-integrated chords."""
    radius = np.asarray(radius, dtype=t.dtype)
    u = t / np.maximum(radius, 1e-12)
    np.clip(u, -1.0, 1.0, out=u)
    root: np.ndarray = np.sqrt(1.0 - u * u)
    root *= u
    root += np.arcsin(u)
    root *= radius**2
    return root


def _span(centre: float, radius: float, n: int) -> tuple[int, int]:
    """Index range [start, stop) of unit cells (centred on integers) that a ball of `radius`
    around index coordinate `centre` can touch, clipped to [0, n)."""
    start = max(0, math.floor(centre - radius + 0.5))
    stop = min(n, math.ceil(centre + radius + 0.5))
    return start, stop


def _place(
    radii: np.ndarray,
    cylinder_radius: float,
    rows: int,
    rng: np.random.Generator,
    give_up_early: bool,
) -> np.ndarray:
    """Random sequential placement: (n_placed, 4) x, y, z, radius of non-overlapping pores.
    A pore that finds no room is skipped, or ends the placement when `give_up_early`."""
    placed = np.empty((0, 4))
    for radius in radii:
        reach = cylinder_radius - WALL - radius
        if reach < 0:
            if give_up_early:
                break
            continue
        for _ in range(_MAX_TRIES):
            rho = reach * np.sqrt(rng.random(_BATCH))
            phi = rng.uniform(0, 2 * math.pi, _BATCH)
            z = rng.uniform(-0.5, rows - 0.5, _BATCH)
            candidates = np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)
            gap = np.linalg.norm(candidates[:, None, :] - placed[None, :, :3], axis=2)
            free = np.all(gap >= placed[None, :, 3] + radius + WALL, axis=1)
            if free.any():
                chosen = candidates[np.argmax(free)]
                placed = np.vstack([placed, [*chosen, radius]])
                break
        else:
            if give_up_early:
                break
    return placed
