"""Pixel-driven back-projection of parallel-beam sinograms in PyTorch, on any device: the
back-projector of the direct FBP method (`workers.fbp.FBP`) and the operator that
`workers.project.project_tensor` mirrors.

Geometry (DESIGN.md): pixel (row, col) of the N x N slice, N = cols, sits at x = col - (N-1)/2,
y = (N-1)/2 - row; at angle theta the ray through it meets detector column
u = x cos(theta) + y sin(theta) + (center - 0.5). The detector is extended by zeros, so a ray
outside it adds nothing and one within a pixel of its edge is interpolated towards zero (as ASTRA's
border-mode texture fetch does).

Linear interpolation along u: per pixel a sum of 2 * angles weighted rows of a
(angle, detector) -> batch table, which is exactly what `embedding_bag` computes; its kernels are
fused, multithreaded and exist on CPU and CUDA, so we get a gather-and-reduce without
materialising (pixels x angles x batch) temporaries. Regular angle sets are folded onto
[0, pi/4] by the square grid's symmetries, so one index computation serves 4 (or 8) angles and
each gather moves 4 (or 8) batches at once: faster on the CPU, same result (docs/benchmarks.md,
"Figures behind design choices").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Pixel x angle pairs per gather on CPU: about 16 MB of index and weight, so a chunk's working
# set stays in the last-level cache, and at most this many bytes of output rows per chunk (wide
# rows, batch 64 x 4 symmetry classes, want the larger end of the flat range; docs/benchmarks.md,
# "Figures behind design choices").
_CPU_CHUNK_PAIRS = 1 << 21
_CPU_CHUNK_OUT_BYTES = 4 << 20


# Seen from angle t = phi + k pi/4 (phi in [0, pi/4]), the slice is the one seen from phi, flipped
# and/or transposed: the 8 symmetries of the square pixel grid about the rotation axis (the grid
# is centred on the axis for every `center`). `_UNDO[k]` maps the image back-projected with phi's
# geometry to the one for t.
_UNDO = (
    lambda image: image,
    lambda image: image.flip((-2, -1)).transpose(-2, -1),
    lambda image: image.flip(-1).transpose(-2, -1),
    lambda image: image.flip(-1),
    lambda image: image.flip((-2, -1)),
    lambda image: image.transpose(-2, -1),
    lambda image: image.flip(-2).transpose(-2, -1),
    lambda image: image.flip(-2),
)


def _symmetry_plan(
    theta: np.ndarray, cols: int
) -> tuple[np.ndarray, tuple[int, ...], np.ndarray] | None:
    """Fold angles onto [0, pi/4] by the grid's symmetries: (fundamental angles (F,), classes
    present, slot (A,) = fundamental * len(classes) + class position), or None when folding saves
    too little (irregular angles), so one index computation serves up to 8 angles and the
    gathers move wider rows."""
    t = np.mod(theta, 2 * np.pi)
    octant = np.clip(np.floor(t / (np.pi / 4)).astype(np.int64), 0, 7)
    phi = np.where(octant % 2 == 0, t - octant * np.pi / 4, (octant + 1) * np.pi / 4 - t)
    order = np.argsort(phi, kind="stable")
    # angles this close give u within 1e-4 pixel of each other at the slice's corners
    new = np.diff(phi[order]) > 1e-4 / max(cols, 1)
    group = np.empty(len(theta), dtype=np.int64)
    group[order] = np.concatenate(([0], np.cumsum(new)))
    fundamentals = phi[order][np.concatenate(([True], new))]
    classes = tuple(int(k) for k in np.unique(octant))
    slots = len(fundamentals) * len(classes)
    if 2 * len(fundamentals) > len(theta) or 4 * slots > 5 * len(theta):
        return None
    position = np.searchsorted(np.asarray(classes), octant)
    return fundamentals, classes, group * len(classes) + position


@dataclass(frozen=True)
class BackProjectionGeometry:
    """Per-(theta, center, cols) tensors of the pixel-driven back-projector, on one device.

    Detector table rows are (table angle, padded column): padded column = column + 1, with one
    zero column before and two after, and u clamped to [-1, cols] so any ray off the detector
    reads only zeros however far off-centre the axis is. With `slot`, the table angles are the
    fundamental angles of `_symmetry_plan` and each row holds one batch per symmetry class.
    """

    cols: int
    angles: int  # table angles: the input angles, or the fundamental ones
    col_term: torch.Tensor  # (N, angles): x_col * cos(angle)
    row_term: torch.Tensor  # (N, angles): y_row * sin(angle) + center - 0.5 + 1 (the zero col)
    angle_offset: torch.Tensor  # (angles,) int32: first table row of each angle
    classes: tuple[int, ...] = (0,)
    slot: torch.Tensor | None = None  # (input angles,) int64 table slot of each input angle

    @property
    def padded_cols(self) -> int:
        return self.cols + 3

    @classmethod
    def build(
        cls, theta: np.ndarray, center: float, cols: int, device: torch.device, fold: bool = True
    ) -> BackProjectionGeometry:
        theta = np.asarray(theta, dtype=np.float64).reshape(-1)
        plan = _symmetry_plan(theta, cols) if fold else None
        table_angles = theta if plan is None else plan[0]
        coords = np.arange(cols) - (cols - 1) / 2  # x of each column; y of row r is -coords[r]
        col_term = coords[:, None] * np.cos(table_angles)
        row_term = -coords[:, None] * np.sin(table_angles) + (center - 0.5 + 1.0)
        offset = np.arange(len(table_angles), dtype=np.int64) * (cols + 3)
        if len(offset) and offset[-1] + cols + 3 > np.iinfo(np.int32).max:
            raise ValueError(f"{len(theta)} angles x {cols} columns overflow int32 table indices")
        return cls(
            cols,
            len(table_angles),
            torch.as_tensor(col_term, dtype=torch.float32, device=device),
            torch.as_tensor(row_term, dtype=torch.float32, device=device),
            torch.as_tensor(offset, dtype=torch.int32, device=device),
            (0,) if plan is None else plan[1],
            None if plan is None else torch.as_tensor(plan[2], device=device),
        )


def _chunk_pairs(device: torch.device, max_work_bytes: int) -> int:
    # index, weight and the float temporary they are made from: 12 bytes per pixel x angle pair
    budget = max(1, max_work_bytes // 12)
    return min(budget, _CPU_CHUNK_PAIRS) if device.type == "cpu" else budget


def _table(sinograms: torch.Tensor, geometry: BackProjectionGeometry) -> torch.Tensor:
    """(B, A, C) -> (table angles * padded cols, classes * B): a row per (angle, column)."""
    batch = sinograms.shape[0]
    padded = F.pad(sinograms, (1, 2)).permute(1, 2, 0)  # (A, padded cols, B)
    if geometry.slot is None:
        return padded.reshape(-1, batch).contiguous()
    classes = len(geometry.classes)
    slotted = torch.zeros(
        (geometry.angles * classes, *padded.shape[1:]), dtype=padded.dtype, device=padded.device
    )
    slotted.index_add_(0, geometry.slot, padded)  # angles equal to 1e-4 px share a slot: sum
    slotted = slotted.view(geometry.angles, classes, geometry.padded_cols, batch)
    return slotted.permute(0, 2, 1, 3).reshape(-1, classes * batch).contiguous()


def backproject_geometry(
    sinograms: torch.Tensor, geometry: BackProjectionGeometry, max_work_bytes: int = 256 << 20
) -> torch.Tensor:
    """Sum over angles of each sinogram linearly interpolated at every pixel's u.

    (B, A, C) float32 -> (B, C, C) float32 on the same device; no filter, no angle weights: this
    is the transpose-style operator that FBP weights and `workers.project` mirrors.
    """
    batch, _, cols = sinograms.shape
    n, angles = cols, geometry.angles
    table = _table(sinograms, geometry)
    # u interpolated as table[i] + frac * (table[i+1] - table[i]): two gathers of the same index
    # instead of building an index and a weight for each of the two taps.
    slope = torch.zeros_like(table)
    slope[:-1] = table[1:] - table[:-1]
    pairs = _chunk_pairs(sinograms.device, max_work_bytes)
    angle_step = max(1, min(angles, pairs // n))
    row_step = max(1, pairs // (n * angle_step))
    if sinograms.device.type == "cpu":  # and the chunk's output rows stay in the L2 cache too
        row_step = max(1, min(row_step, _CPU_CHUNK_OUT_BYTES // (4 * n * table.shape[1])))
    # one workspace per call, reused by every chunk: fresh multi-MB tensors per chunk would be
    # fresh pages from the OS each time, and page faults cost as much as the arithmetic
    chunk = min(row_step, n) * n * angle_step
    u_space = torch.empty(chunk, dtype=torch.float32, device=sinograms.device)
    index_space = torch.empty(chunk, dtype=torch.int32, device=sinograms.device)
    out = torch.empty((n * n, table.shape[1]), dtype=torch.float32, device=sinograms.device)
    for r0 in range(0, n, row_step):
        r1 = min(n, r0 + row_step)
        acc = out[r0 * n : r1 * n]
        for a0 in range(0, angles, angle_step):
            a1 = min(angles, a0 + angle_step)
            size = (r1 - r0) * n * (a1 - a0)
            u = u_space[:size].view(r1 - r0, n, a1 - a0)
            torch.add(
                geometry.row_term[r0:r1, None, a0:a1], geometry.col_term[None, :, a0:a1], out=u
            )
            u.clamp_(0.0, cols + 1.0)
            index = index_space[:size].view(r1 - r0, n, a1 - a0)
            index.copy_(u)  # u >= 0, so truncation is floor
            frac = u.sub_(index).view(-1, a1 - a0)
            index += geometry.angle_offset[a0:a1]
            index = index.view(-1, a1 - a0)
            part = F.embedding_bag(index, table, mode="sum")
            part += F.embedding_bag(index, slope, mode="sum", per_sample_weights=frac)
            if a0 == 0:
                acc.copy_(part)
            else:
                acc += part
    images = out.view(n, n, len(geometry.classes), batch).permute(2, 3, 0, 1)
    result: torch.Tensor = _UNDO[geometry.classes[0]](images[0]).contiguous()
    for position, symmetry in enumerate(geometry.classes[1:], start=1):
        result += _UNDO[symmetry](images[position])
    return result


def backproject_tensor(
    sinograms: torch.Tensor, theta: torch.Tensor, center: float, max_work_bytes: int = 256 << 20
) -> torch.Tensor:
    """Unfiltered, unweighted back-projection (B, A, C) -> (B, C, C): the sum over angles of the
    sinogram at each pixel's u. The operator `workers.project.project_tensor` approximates the
    adjoint of (to discretisation error)."""
    batch, angles, cols = sinograms.shape
    if angles != theta.numel():
        raise ValueError(f"theta has {theta.numel()} angles, the sinograms {angles}")
    if angles == 0 or batch == 0:
        return torch.zeros((batch, cols, cols), dtype=torch.float32, device=sinograms.device)
    theta64 = theta.detach().to("cpu", torch.float64).numpy()
    geometry = BackProjectionGeometry.build(theta64, center, cols, sinograms.device)
    with torch.inference_mode():
        return backproject_geometry(sinograms.to(torch.float32), geometry, max_work_bytes)
