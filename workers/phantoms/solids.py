"""Phantoms as sums of solids with exact parallel-beam projections: the engine under the structure
families of `workers.phantoms`.

A phantom here is a sum of solids, each an indicator times an attenuation per pixel (negative
values carve pores and cracks out of what lies beneath). Line integrals add, so a projection is
the sum of the solids' projections, each in closed form:

- `Ellipsoid`: any orientation; a semi-axis may be infinite along a direction that is not
  horizontal (the sample's cylinder, fibres). A slice plane cuts it in an ellipse, whose chord
  length 2 h sqrt(1 - ((s - s0)/w)^2) integrates exactly across a detector pixel's width, as the
  foam's disks do (`workers.phantom`).
- `Prism` (a convex body bounded by slabs, its value linear in position: layers, graded layers)
  and `Rod` (a round fibre lying in the slice plane, flat ends): a slice cuts them in convex
  polygons. The value integrated along a ray is then quadratic in s between the shadows of the
  polygon's vertices, and two-point Gauss-Legendre between those breaks integrates it exactly.

Geometry as `workers.phantom.FoamPhantom`: slice pixel (row, col) of an N x N slice sits at
x = col - (N-1)/2, y = (N-1)/2 - row, slice z at z; the ray at angle theta with signed distance
s = x cos(theta) + y sin(theta) meets detector column u = s + (center - 0.5). Voxels average
point samples (`supersample`^3 per voxel); projections integrate exactly across a detector pixel's
width and average the same `supersample` sub-rows across its height. In the slice plane the two
are different discretisations, so reconstructing one and scoring against the other commits no
inverse crime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workers.phantom import _chord_integral, _span

_BIG = 1e18  # "unbounded" along a ray: finite, so empty chords never meet inf - inf
_PARALLEL = 1e-12  # |n . d| below this: the ray runs along the slab's faces
_VERTEX_TOLERANCE = 1e-9
_GAUSS = 0.5 / math.sqrt(3.0)  # two-point Gauss-Legendre nodes at mid +- this x width

Vector = tuple[float, float, float]


@dataclass(frozen=True)
class Ellipsoid:
    """Solid ellipsoid: `centre` (x, y, z); `rotation` a row-major 3 x 3 matrix whose columns are
    the principal directions; `semi_axes` along them (math.inf allowed along a direction with a
    z component); `value` added to the attenuation inside."""

    centre: Vector
    semi_axes: Vector
    rotation: tuple[float, ...]
    value: float


@dataclass(frozen=True)
class Section:
    """A convex polygon in the slice plane: `lo <= normals . (x, y) <= hi` for each row, with the
    value `offset + gradient . (x, y)` inside."""

    normals: np.ndarray  # (slabs, 2)
    lo: np.ndarray  # (slabs,)
    hi: np.ndarray  # (slabs,)
    offset: float
    gradient: tuple[float, float]


@dataclass(frozen=True)
class Prism:
    """Convex body `lo[i] <= normals[i] . (x, y, z) <= hi[i]`, value `offset + gradient . p`.
    Bounded in the slice plane by the slabs whose normals are not vertical."""

    normals: tuple[Vector, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    offset: float
    gradient: Vector = (0.0, 0.0, 0.0)

    def section(self, z: float) -> Section | None:
        normals, lo, hi = [], [], []
        for (nx, ny, nz), low, high in zip(self.normals, self.lo, self.hi, strict=True):
            shift = nz * z
            if math.hypot(nx, ny) < _PARALLEL:  # a horizontal slab: all of this plane, or none
                if not low <= shift <= high:
                    return None
                continue
            normals.append((nx, ny))
            lo.append(low - shift)
            hi.append(high - shift)
        gx, gy, gz = self.gradient
        return Section(
            np.array(normals), np.array(lo), np.array(hi), self.offset + gz * z, (gx, gy)
        )


@dataclass(frozen=True)
class Rod:
    """A round fibre lying in the slice plane: axis through `centre` at in-plane angle `angle`
    (radians from x), `radius`, flat ends `half_length` from the centre."""

    centre: Vector
    angle: float
    radius: float
    half_length: float
    value: float

    def section(self, z: float) -> Section | None:
        dz = z - self.centre[2]
        if abs(dz) >= self.radius:
            return None
        half_width = math.sqrt(self.radius**2 - dz**2)
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        x, y = self.centre[0], self.centre[1]
        along, across = x * cos + y * sin, -x * sin + y * cos
        return Section(
            np.array([[cos, sin], [-sin, cos]]),
            np.array([along - self.half_length, across - half_width]),
            np.array([along + self.half_length, across + half_width]),
            self.value,
            (0.0, 0.0),
        )


Polyhedron = Prism | Rod


def rotation_matrix(rng: np.random.Generator) -> tuple[float, ...]:
    """A uniformly random rotation (a random unit quaternion), row-major."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    matrix = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    return tuple(float(v) for v in matrix.ravel())


def frame(axis: np.ndarray) -> tuple[float, ...]:
    """A rotation whose third column is the unit vector `axis` (row-major)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    first = np.cross(helper, axis)
    first /= np.linalg.norm(first)
    second = np.cross(axis, first)
    return tuple(float(v) for v in np.stack([first, second, axis], axis=1).ravel())


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def cylinder(radius: float, value: float) -> Ellipsoid:
    """The sample's cylinder: axis along z through the rotation axis."""
    return Ellipsoid((0.0, 0.0, 0.0), (radius, radius, math.inf), IDENTITY, value)


def soft_ellipsoid(
    centre: Vector,
    semi_axes: Vector,
    rotation: tuple[float, ...],
    value: float,
    edge: float,
    shells: int = 4,
) -> list[Ellipsoid]:
    """An ellipsoid whose value ramps up over about `edge` pixels inside its surface: `shells`
    nested ellipsoids of value/shells each, the outermost just inside `semi_axes` (partial
    volume smooths the steps, and every shell still projects exactly). `edge` must be below the
    smallest semi-axis."""
    smallest = min(semi_axes)
    if edge <= 0 or shells < 2:
        return [Ellipsoid(centre, semi_axes, rotation, value)]
    if edge >= smallest:
        raise ValueError(f"edge={edge} must be below the smallest semi-axis {smallest}")
    out = []
    for i in range(shells):
        factor = 1.0 - edge / smallest * (1.0 - (i + 0.5) / shells)
        axes = (semi_axes[0] * factor, semi_axes[1] * factor, semi_axes[2] * factor)
        out.append(Ellipsoid(centre, axes, rotation, value / shells))
    return out


# --- ellipsoids: sections, voxels, projections ----------------------------------------------


@dataclass(frozen=True)
class _Ellipses:
    """Sections of ellipsoids by one plane: centres (n, 2), inverse shape matrices (n, 3) as
    (a, b, c) of [[a, b], [b, c]] (the ellipse is v^T M v <= 1 with M^-1 = that), sqrt(det M)
    (n,), values (n,)."""

    cx: np.ndarray
    cy: np.ndarray
    inverse: np.ndarray
    root_det: np.ndarray
    value: np.ndarray


class _EllipsoidTable:
    """Ellipsoids as arrays, cut by planes z = const."""

    def __init__(self, ellipsoids: Sequence[Ellipsoid]) -> None:
        n = len(ellipsoids)
        self.centre = np.array([e.centre for e in ellipsoids], dtype=np.float64).reshape(n, 3)
        self.value = np.array([e.value for e in ellipsoids], dtype=np.float64)
        rotation = np.array([e.rotation for e in ellipsoids], dtype=np.float64).reshape(n, 3, 3)
        inverse_square = 1.0 / np.array([e.semi_axes for e in ellipsoids]).reshape(n, 3) ** 2
        q = np.einsum("nij,nj,nkj->nik", rotation, inverse_square, rotation)
        q2 = q[:, :2, :2]
        self.det2 = q2[:, 0, 0] * q2[:, 1, 1] - q2[:, 0, 1] ** 2
        if n and (self.det2 <= 0).any():
            raise ValueError("an ellipsoid is unbounded within a slice plane")
        # (Q2)^-1 as (a, b, c)
        self.q2_inverse = np.stack([q2[:, 1, 1], -q2[:, 0, 1], q2[:, 0, 0]], axis=1)
        self.q2_inverse /= self.det2[:, None]
        qz = q[:, :2, 2]
        a, b, c = self.q2_inverse.T
        self.shift = -np.stack([a * qz[:, 0] + b * qz[:, 1], b * qz[:, 0] + c * qz[:, 1]], axis=1)
        # 1 / (half height)^2: the section at height dz has k = 1 - dz^2 * this
        self.inverse_height_sq = q[:, 2, 2] - (qz * -self.shift).sum(axis=1)

    def section(self, z: float) -> _Ellipses:
        dz = z - self.centre[:, 2]
        k = 1.0 - dz * dz * self.inverse_height_sq
        cut = np.flatnonzero(k > 0)
        k, dz = k[cut], dz[cut]
        return _Ellipses(
            self.centre[cut, 0] + dz * self.shift[cut, 0],
            self.centre[cut, 1] + dz * self.shift[cut, 1],
            self.q2_inverse[cut] * k[:, None],
            np.sqrt(self.det2[cut]) / k,
            self.value[cut],
        )


def _add_ellipses(
    line: np.ndarray, ellipses: _Ellipses, cos: np.ndarray, sin: np.ndarray, center: float
) -> None:
    """Add the pixel-integrated chords of `ellipses` to `line` (angles, cols + 2), whose first
    and last columns catch what falls off the detector."""
    if not len(ellipses.value):
        return
    cols = line.shape[1] - 2
    a, b, c = ellipses.inverse.T
    s0 = cos[:, None] * ellipses.cx + sin[:, None] * ellipses.cy  # (angles, n)
    half = np.sqrt(
        cos[:, None] ** 2 * a + 2 * cos[:, None] * sin[:, None] * b + sin[:, None] ** 2 * c
    )
    # chord(s) = scale * 2 sqrt(w^2 - (s - s0)^2): the area pi / sqrt(det M) over pi w^2
    scale = ellipses.value / (half**2 * ellipses.root_det)
    width = np.ceil(2 * half.max(axis=0)).astype(np.int64) + 2
    bucket = np.maximum(4, 2 ** np.ceil(np.log2(width))).astype(np.int64)  # few shapes
    angles = np.arange(len(cos))[:, None, None] * (cols + 2)
    for size in np.unique(bucket):
        chosen = np.flatnonzero(bucket == size)
        offset, w = s0[:, chosen], half[:, chosen]
        first = np.floor(offset - w + center).astype(np.int64)
        window = first[..., None] + np.arange(size + 1)  # (angles, n, size + 1) pixel edges
        integral = _chord_integral(window - center - offset[..., None], w[..., None])
        chords = np.diff(integral, axis=-1) * scale[:, chosen, None]
        column = np.clip(window[..., :-1], -1, cols) + 1
        flat = (angles + column).ravel()
        line += np.bincount(flat, weights=chords.ravel(), minlength=line.size).reshape(line.shape)


def _raster_ellipses(image: np.ndarray, ellipses: _Ellipses, k: int, weight: float) -> None:
    """Add `weight` x each ellipse's in-plane covered fraction (k x k samples a pixel) to image."""
    n = image.shape[0]
    half = (n - 1) / 2
    sub = (np.arange(k) + 0.5) / k - 0.5
    for i in range(len(ellipses.value)):
        a, b, c = ellipses.inverse[i]
        cx, cy = ellipses.cx[i], ellipses.cy[i]
        r0, r1 = _span(half - cy, math.sqrt(c), n)
        c0, c1 = _span(cx + half, math.sqrt(a), n)
        if r0 >= r1 or c0 >= c1:
            continue
        dy = half - (np.arange(r0, r1)[:, None] + sub).ravel() - cy
        dx = (np.arange(c0, c1)[:, None] + sub).ravel() - half - cx
        det = a * c - b * b
        form = (
            c * dx[None, :] ** 2 - 2 * b * dx[None, :] * dy[:, None] + a * dy[:, None] ** 2
        ) / det
        fraction = (form < 1.0).reshape(r1 - r0, k, c1 - c0, k).mean(axis=(1, 3))
        image[r0:r1, c0:c1] += weight * ellipses.value[i] * fraction


# --- convex polygons: vertices, voxels, projections -----------------------------------------


def _vertices(section: Section) -> np.ndarray:
    """(m, 2) corners of the polygon (the pairwise crossings of its edge lines inside it)."""
    normals = np.concatenate([section.normals, section.normals])
    levels = np.concatenate([section.lo, section.hi])
    i, j = np.triu_indices(len(levels), k=1)
    det = normals[i, 0] * normals[j, 1] - normals[i, 1] * normals[j, 0]
    keep = np.abs(det) > _PARALLEL
    i, j, det = i[keep], j[keep], det[keep]
    x = (levels[i] * normals[j, 1] - levels[j] * normals[i, 1]) / det
    y = (normals[i, 0] * levels[j] - normals[j, 0] * levels[i]) / det
    points = np.stack([x, y], axis=1)
    projected = points @ section.normals.T
    scale = 1.0 + np.abs(levels).max()
    tolerance = _VERTEX_TOLERANCE * scale
    inside = ((projected >= section.lo - tolerance) & (projected <= section.hi + tolerance)).all(1)
    corners: np.ndarray = points[inside]
    return corners


def _polygon_ray_integral(
    section: Section, cos: np.ndarray, sin: np.ndarray, s: np.ndarray
) -> np.ndarray:
    """Exact line integral of the section's value along each ray (angle i, signed distance
    s[i, j]): the ray's span inside every slab, intersected, times the value at its middle."""
    t_lo = np.full(s.shape, -_BIG)
    t_hi = np.full(s.shape, _BIG)
    for (nx, ny), low, high in zip(section.normals, section.lo, section.hi, strict=True):
        along = (-nx * sin + ny * cos)[:, None]  # n . d, d = (-sin, cos) the ray's direction
        across = (nx * cos + ny * sin)[:, None] * s  # n . (s omega)
        parallel = np.abs(along) < _PARALLEL
        step = np.where(parallel, 1.0, along)
        first, second = (low - across) / step, (high - across) / step
        inside = (across >= low) & (across <= high)
        lower = np.where(parallel, np.where(inside, -_BIG, _BIG), np.minimum(first, second))
        upper = np.where(parallel, np.where(inside, _BIG, -_BIG), np.maximum(first, second))
        np.maximum(t_lo, lower, out=t_lo)
        np.minimum(t_hi, upper, out=t_hi)
    length = np.clip(t_hi - t_lo, 0.0, None)
    gx, gy = section.gradient
    integral: np.ndarray
    if gx == 0.0 and gy == 0.0:
        integral = length * section.offset
        return integral
    middle = np.where(length > 0, 0.5 * (t_lo + t_hi), 0.0)
    x = s * cos[:, None] - middle * sin[:, None]
    y = s * sin[:, None] + middle * cos[:, None]
    integral = length * (section.offset + gx * x + gy * y)
    return integral


def _add_polygon(
    line: np.ndarray, section: Section, cos: np.ndarray, sin: np.ndarray, center: float
) -> None:
    """Add the section's pixel-integrated line integrals to `line` (angles, cols + 2)."""
    corners = _vertices(section)
    if len(corners) < 3:
        return
    cols = line.shape[1] - 2
    shadow = cos[:, None] * corners[:, 0] + sin[:, None] * corners[:, 1]  # (angles, m)
    first = np.floor(shadow.min(axis=1) + center).astype(np.int64)
    size = int((np.ceil(shadow.max(axis=1) + center) - first).max()) + 1
    window = first[:, None] + np.arange(size + 1)  # (angles, size + 1) pixel edges
    edges = window - center
    # breaks: the integrand is quadratic between consecutive points of edges U shadows
    points = np.concatenate([edges, shadow], axis=1)
    order = np.argsort(points, axis=1, kind="stable")
    ordered = np.take_along_axis(points, order, axis=1)
    middle = 0.5 * (ordered[:, 1:] + ordered[:, :-1])
    gap = ordered[:, 1:] - ordered[:, :-1]
    nodes = np.concatenate([middle - _GAUSS * gap, middle + _GAUSS * gap], axis=1)
    values = _polygon_ray_integral(section, cos, sin, nodes)
    pieces = 0.5 * gap * (values[:, : gap.shape[1]] + values[:, gap.shape[1] :])
    cumulative = np.concatenate([np.zeros((len(cos), 1)), np.cumsum(pieces, axis=1)], axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(points.shape[1])[None, :], axis=1)
    at_edges = np.take_along_axis(cumulative, rank[:, : size + 1], axis=1)
    pixels = np.diff(at_edges, axis=1)
    column = np.clip(window[:, :-1], -1, cols) + 1
    flat = (np.arange(len(cos))[:, None] * (cols + 2) + column).ravel()
    line += np.bincount(flat, weights=pixels.ravel(), minlength=line.size).reshape(line.shape)


def _raster_polygon(image: np.ndarray, section: Section, k: int, weight: float) -> None:
    corners = _vertices(section)
    if len(corners) < 3:
        return
    n = image.shape[0]
    half = (n - 1) / 2
    sub = (np.arange(k) + 0.5) / k - 0.5
    low, high = corners.min(axis=0), corners.max(axis=0)
    c0, c1 = max(0, math.floor(low[0] + half + 0.5)), min(n, math.ceil(high[0] + half + 0.5))
    r0, r1 = max(0, math.floor(half - high[1] + 0.5)), min(n, math.ceil(half - low[1] + 0.5))
    if r0 >= r1 or c0 >= c1:
        return
    y = (half - (np.arange(r0, r1)[:, None] + sub).ravel())[:, None]
    x = ((np.arange(c0, c1)[:, None] + sub).ravel() - half)[None, :]
    inside = np.ones((len(y), x.shape[1]), dtype=bool)
    for (nx, ny), lo, hi in zip(section.normals, section.lo, section.hi, strict=True):
        level = nx * x + ny * y
        inside &= (level >= lo) & (level <= hi)
    gx, gy = section.gradient
    field = inside * (section.offset + gx * x + gy * y)
    image[r0:r1, c0:c1] += weight * field.reshape(r1 - r0, k, c1 - c0, k).mean(axis=(1, 3))


# --- the phantom ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolidPhantom:
    """A phantom made of solids; immutable, safe to share between threads."""

    rows: int
    size: int
    ellipsoids: tuple[Ellipsoid, ...] = ()
    polyhedra: tuple[Polyhedron, ...] = ()

    def voxelize(self, supersample: int = 3) -> np.ndarray:
        """(rows, size, size) float32 attenuation per pixel; each voxel averages
        supersample**3 point samples (partial volume at every edge)."""
        k = supersample
        sub = (np.arange(k) + 0.5) / k - 0.5
        table = _EllipsoidTable(self.ellipsoids)
        volume = np.zeros((self.rows, self.size, self.size), dtype=np.float64)
        for row in range(self.rows):
            for dz in sub:
                z = row + dz
                _raster_ellipses(volume[row], table.section(z), k, 1.0 / k)
                for solid in self.polyhedra:
                    section = solid.section(z)
                    if section is not None:
                        _raster_polygon(volume[row], section, k, 1.0 / k)
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
        cos, sin = np.cos(theta), np.sin(theta)
        sub = (np.arange(supersample) + 0.5) / supersample - 0.5
        table = _EllipsoidTable(self.ellipsoids)
        out = np.empty((theta.size, self.rows, cols), dtype=np.float32)
        for row in range(self.rows):
            line = np.zeros((theta.size, cols + 2))
            for dz in sub:
                z = row + dz
                _add_ellipses(line, table.section(z), cos, sin, center)
                for solid in self.polyhedra:
                    section = solid.section(z)
                    if section is not None:
                        _add_polygon(line, section, cos, sin, center)
            out[:, row] = line[:, 1:-1] / supersample
        return out
