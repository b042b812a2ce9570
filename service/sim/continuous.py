"""`tomocast simulate --continuous`: an open-ended rotation of a sample that changes over time.

The sample is a disc with an inclusion that grows turn by turn (a reaction front, say); the
detector sends normalized line integrals (float32) with each chunk's angles (protocol v1.1),
which run on past pi: turn t covers [2 pi t, 2 pi (t + 1)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from service.client import Detector
from workers.recon import project

DISC = 0.02  # attenuation per pixel of the sample
INCLUSION = 0.05  # of the growing inclusion


def sample(rows: int, cols: int, growth: float) -> np.ndarray:
    """The sample at `growth` (0: the inclusion's seed, 1: grown): (rows, cols, cols)."""
    c = (cols - 1) / 2
    y, x = np.mgrid[0:cols, 0:cols] - c
    volume = np.where(x**2 + y**2 <= (0.4 * cols) ** 2, DISC, 0.0)
    radius = (0.05 + 0.15 * growth) * cols
    volume = np.where((x - 0.1 * cols) ** 2 + y**2 <= radius**2, INCLUSION, volume)
    return np.repeat(volume[None].astype(np.float32), rows, axis=0)


def turns_of_projections(
    rows: int, cols: int, half_turn: int, turns: int, chunk: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(index, theta, line integrals) chunks of `turns` full turns, `half_turn` projections
    per pi; the sample grows from turn to turn."""
    per_turn = 2 * half_turn
    for turn in range(turns):
        theta = (turn * per_turn + np.arange(per_turn)) * (math.pi / half_turn)
        growth = turn / max(1, turns - 1)
        frames = project(sample(rows, cols, growth), theta, cols=cols, device="cpu")
        for first in range(0, per_turn, chunk):
            stop = min(per_turn, first + chunk)
            yield turn * per_turn + first, theta[first:stop], frames[first:stop]


def send_continuous(
    detector: Detector,
    scan_id: str,
    rows: int,
    cols: int,
    half_turn: int,
    turns: int,
    window: int | None = None,
    every: int | None = None,
    center: float | None = None,
    chunk: int = 8,
    pace: Callable[[int], object] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Send a continuous scan of `turns` turns (`center`: declared, else the service's
    default or estimate); returns the projections sent."""
    options: dict[str, object] = {"continuous": True, "normalized": True}
    if window is not None:
        options["window"] = window
    if every is not None:
        options["every"] = every
    if center is not None:
        options["center"] = center
    detector.start_scan(scan_id, rows, cols, half_turn, "float32", **options)
    sent = 0
    for index, theta, frames in turns_of_projections(rows, cols, half_turn, turns, chunk):
        if pace is not None:
            pace(len(frames))
        detector.send_frames("projections", scan_id, index, frames, theta=theta.tolist())
        sent += len(frames)
        if progress is not None:
            progress(len(frames))
    detector.end_scan(scan_id, sent)
    return sent
