"""What each preprocessing step costs per slice, next to what FBP costs on the same data, so a
benchmark can report the chain's share of the reconstruction time in one run.

A slice is one detector row: its sinogram for the row-wise steps (stripes), its share of the
projections for the frame-wise ones (flat-field, zingers: a chunk's time over its rows). Zingers
and stripes are removed in place, as the service removes them from data it owns. Phase
retrieval filters whole projections in 2D, padded at their edges, so it is timed on
`_PHASE_FRAMES` square projections (cols x cols, the scan's rows repeated) and scaled to the
scan's angles: per slice, its time x angles / (frames x cols).
The centre is estimated once per scan, so it is reported per estimate (on `_CENTER_ROWS` rows).
Times are the least of `repeat` runs after a warm-up (which also builds the FBP geometry, as the
service's `prepare` does before the data arrive).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workers.phantom import FoamPhantom
from workers.preprocess.center import find_center_vo
from workers.preprocess.flatfield import flat_field, minus_log, normalize
from workers.preprocess.phase import paganin_filter
from workers.preprocess.stripes import remove_stripes
from workers.preprocess.zingers import remove_zingers

# Rows the centre estimate is measured on; square projections phase retrieval is timed on.
_CENTER_ROWS = 3  # as the service estimates it (service.preprocess.CENTER_ROWS)
_PHASE_FRAMES = 4
# Photons per open-beam pixel of the simulated frames, and a dark level.
_PHOTONS = 1e4
_DARK = 100.0
_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass(frozen=True)
class StepCost:
    """One step's time: `seconds` per `per` ("slice" or "estimate"); `fbp_ratio` is that over
    FBP's seconds per slice on the same device."""

    step: str
    seconds: float
    per: str
    fbp_ratio: float


def measure_costs(
    cols: int = 512,
    angles: int | None = None,
    rows: int = 8,
    device: str | torch.device = "cpu",
    repeat: int = 3,
    seed: int = 0,
    clock: str = "wall",
) -> list[StepCost]:
    """Time FBP ("auto", as the service picks) and each step on a simulated foam scan of
    `rows` x `angles` (default 3/2 cols) x `cols` raw 16-bit frames on `device`; `clock`
    "wall" (elapsed) or "cpu" (this thread's CPU time: the work of a one-thread CPU run,
    whatever else the machine runs)."""
    if clock not in _CLOCKS:
        raise ValueError(f"clock={clock!r}: choose one of {', '.join(_CLOCKS)}")
    now = _CLOCKS[clock]
    from workers.recon import make_reconstructor  # here: workers.recon imports this package

    angles = cols * 3 // 2 if angles is None else angles
    target = torch.device(device)
    theta = np.arange(angles) * np.pi / angles
    phantom = FoamPhantom.random(rows=rows, size=cols, seed=seed)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(_PHOTONS * np.exp(-phantom.project(theta, cols=cols, supersample=1)))
    frames = torch.from_numpy(np.minimum(counts + _DARK, 65535).astype(np.uint16)).to(target)
    dark = torch.full((rows, cols), _DARK, dtype=torch.float32, device=target)
    flat = torch.full((rows, cols), _DARK + _PHOTONS, dtype=torch.float32, device=target)
    transmission = flat_field(frames, dark, flat)
    line_integrals, _ = minus_log(transmission.clone())
    sinograms = line_integrals.transpose(0, 1).contiguous()  # (rows, angles, cols)
    theta_t = torch.from_numpy(theta)
    reconstructor = make_reconstructor("auto", target)

    def timed(run: Callable[[], Any]) -> float:
        run()
        best = float("inf")
        for _ in range(repeat):
            _sync(target)
            start = now()
            run()
            _sync(target)
            best = min(best, now() - start)
        return best

    fbp = timed(lambda: reconstructor.reconstruct(sinograms, theta_t, cols / 2)) / rows
    # the service cleans the flat-field's output and its own sinogram in place
    own, own_sinograms = transmission.clone(), sinograms.clone()
    per_slice = {
        "flat-field + -log": lambda: normalize(frames, dark, flat),
        "zingers": lambda: remove_zingers(own, in_place=True),
        "stripes (auto)": lambda: remove_stripes(own_sinograms, "auto", in_place=True),
        "stripes (fourier-wavelet)": lambda: remove_stripes(sinograms, "fourier-wavelet"),
    }
    costs = [StepCost("fbp", fbp, "slice", 1.0)]
    for step, run in per_slice.items():
        seconds = timed(run) / rows
        costs.append(StepCost(step, seconds, "slice", seconds / fbp))
    repeats = -(-cols // rows)
    square = transmission[:_PHASE_FRAMES].repeat(1, repeats, 1)[:, :cols].contiguous()
    phase = timed(lambda: paganin_filter(square, 20.0, 0.1, 1e-6, 100.0, in_place=True))
    phase *= angles / (square.shape[0] * cols)
    costs.append(StepCost("phase (paganin)", phase, "slice", phase / fbp))
    center = timed(lambda: find_center_vo(sinograms[:_CENTER_ROWS]))
    costs.append(StepCost("center (vo)", center, "estimate", center / fbp))
    return costs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
