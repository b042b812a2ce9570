"""The no-harm guard in the reconstruct loop: a denoised slice is published only when the data
it was reconstructed from do not contradict it; otherwise the plain FBP slice goes out in its
place.

The score is `workers.guard.consistency` (its docstring and docs/model-card.md, "No-harm guard
(measured)", say what it means and what it holds on the evaluation matrix):

    consistency = chi2(denoised) / max(chi2(FBP), 1)

each slice against the measured sinogram row it came from, at every k-th angle (at most
`guard.max_angles`). A slice is kept when consistency <= `guard.threshold`. The noise variance
of the line integrals is estimated from the sinogram itself (`guard.noise = "estimated"`, the
default), or, with `guard.noise = "photon"`, taken from the flat's photon counts (flat minus
dark, per detector pixel) for raw-count scans (`CompletedScan.flat_counts`; None for
`normalized` scans, which are always estimated). The photon model ignores detector gain, dark
and read noise, which makes good slices look contradicted (docs/operations.md, "No-harm
guard", has the measurement).

Never published as denoised: a slice whose score is not finite (overflow on an absurd slice, a
degenerate row whose estimated noise is zero and whose denoised slice still misfits it), or a
slice that cannot be scored (fewer than 3 detector columns and no flat counts). An all-zero or
constant row scores like any other: a denoised slice that reproduces it as FBP does is kept,
one that adds anything to it falls back.

On CUDA the scores stay on the device until their batch has reached the host: `Pending` holds
a non-blocking copy that is read only at delivery, so the guard never synchronises the
conveyor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from service.config import GuardSettings
from service.metrics import Metrics
from service.sinogram import CompletedScan
from workers.guard import guard, photon_variance

# estimate_variance takes second differences along the detector
MIN_COLUMNS_TO_ESTIMATE = 3


@dataclass(frozen=True)
class Verdict:
    """The guard's verdict on a batch of `n` slices, on the host: `denoised[i]` true when slice i
    is the network's output, false when it was replaced by its FBP; `consistency[i]` its score,
    NaN where none could be computed (then `denoised[i]` is false). Immutable."""

    denoised: np.ndarray  # (n,) bool
    consistency: np.ndarray  # (n,) float32
    threshold: float

    def header_consistency(self, i: int) -> float | None:
        """Slice i's score as the slice header carries it: None where it is not finite."""
        value = float(self.consistency[i])
        return value if math.isfinite(value) else None


class Pending:
    """A batch's verdict on its way to the host; read it (`result`) once the batch is delivered.
    Owned by the loop's thread."""

    def __init__(self, keep: torch.Tensor, score: torch.Tensor, threshold: float) -> None:
        both = torch.stack([keep.to(torch.float32), score.to(torch.float32)])
        # on CUDA a copy queued on the compute stream, complete once the batch it belongs to
        # has been copied to the host (queued after it); on the CPU the tensor itself
        self._both = both.to("cpu", non_blocking=True)
        self._threshold = threshold

    def result(self) -> Verdict:
        both = self._both.numpy()
        return Verdict(both[0] > 0.5, both[1].astype(np.float32), self._threshold)


class ScanGuard:
    """The guard bound to one scan: its measured sinogram, angles, centre and, for raw-count
    scans, the flat's counts. Owned by the loop's thread, for that scan only."""

    def __init__(
        self, settings: GuardSettings, scan: CompletedScan, theta: torch.Tensor, center: float
    ) -> None:
        self.settings = settings
        self.sinogram = scan.sinogram  # (rows, angles, cols) on the loop's device
        self.flat_counts = scan.flat_counts  # (rows, cols) or None
        self.theta = theta
        self.center = center

    def check(
        self, first: int, denoised: torch.Tensor, fbp: torch.Tensor
    ) -> tuple[torch.Tensor, Pending]:
        """Denoised rows `first` .. `first + n - 1` and their FBP, both (n, N, N) on the
        device: -> what to publish (denoised where kept, FBP elsewhere; a new tensor) and the
        verdict on its way to the host."""
        rows = denoised.shape[0]
        sinogram = self.sinogram[first : first + rows]
        if self.flat_counts is not None and self.settings.noise == "photon":
            variance = photon_variance(sinogram, self.flat_counts[first : first + rows, None, :])
        elif sinogram.shape[-1] >= MIN_COLUMNS_TO_ESTIMATE:
            variance = None  # estimated from the sinogram (workers.guard.estimate_variance)
        else:
            score = torch.full((rows,), math.nan, device=denoised.device)
            keep = torch.zeros(rows, dtype=torch.bool, device=denoised.device)
            return fbp.clone(), Pending(keep, score, self.settings.threshold)
        decision = guard(
            denoised,
            fbp,
            sinogram,
            self.theta,
            self.center,
            variance,
            self.settings.threshold,
            self.settings.max_angles,
        )
        return decision.published(denoised, fbp), Pending(
            decision.keep, decision.consistency, self.settings.threshold
        )


def record(metrics: Metrics, verdict: Verdict) -> int:
    """Count a delivered batch's verdict into /metrics: every finite score into the histogram,
    every slice published as FBP into the fallback counter, by reason. Returns the fallbacks."""
    finite = np.isfinite(verdict.consistency)
    for value in verdict.consistency[finite]:
        metrics.guard_consistency.observe(float(value))
    inconsistent = int(np.count_nonzero(finite & ~verdict.denoised))
    not_finite = int(np.count_nonzero(~finite))
    if inconsistent:
        metrics.guard_fallbacks.labels("inconsistent").inc(inconsistent)
    if not_finite:
        metrics.guard_fallbacks.labels("not_finite").inc(not_finite)
    return inconsistent + not_finite
