"""The no-harm guard: is a denoised slice contradicted by the data it was reconstructed from?

The service publishes a denoised slice only when the measured sinogram does not contradict it;
otherwise it publishes the plain FBP the denoiser started from. No ground truth is needed: each
slice (denoised and FBP) is projected with our projector (`workers.project.project_tensor`) at
the measured angles and compared with the measured sinogram of its detector row.

Misfit, in noise units, per slice:

    chi2(x) = mean over (angle, column) of (project(x) - sinogram)^2 / variance

`variance` is the noise variance of each measured line integral: from the photon counts when the
caller knows them (a line integral p from a flat of I0 counts has variance exp(p) / I0,
`photon_variance`), else estimated from the sinogram itself (`estimate_variance`: second
differences along the detector, median over the angles per detector column, assuming white
detector noise).
A slice the data fully support scores chi2 ~ 1: what the noise alone leaves.

The score (`consistency`):

    consistency = chi2(denoised) / max(chi2(FBP), 1)

the denoised slice's misfit relative to the larger of what plain FBP leaves (the reference that is
published instead; FBP is not exactly consistent either: ramp filtering, too few views,
discretisation) and what the noise alone explains. Meaning:

- 1.0: the denoised slice explains the measured data exactly as well as the FBP published in its
  place (or, where FBP fits better than the noise level, as well as the noise permits);
- below 1: better (a denoiser that removes noise without inventing structure: its misfit is the
  noise, FBP's is the noise plus its streaks and discretisation);
- above 1: worse; far above (tens to hundreds): the data contradict the slice, typically a
  network painting its training sample into another.

`DEFAULT_THRESHOLD` = 1.25 keeps a slice when consistency <= 1.25: the denoised slice may misfit
the data by at most 25 % more than the published alternative does, which leaves a model that
matches the data to within its own discretisation error, and rejects one that contradicts them.
What it holds on the evaluation matrix (keep and fall-back rates, PSNR published vs FBP, the
tolerance) is in docs/model-card.md, "No-harm guard (measured)", with its command.

Properties: dimensionless and invariant to scaling the data (sinogram and slices by k, a given
variance by k^2); each slice's score depends on its own row only (batches change nothing); a
non-finite score falls back. Not covered: a sinogram the preprocessing filtered (phase retrieval,
stripe removal) changes the noise, so pass no photon variance there; correlated detector noise
(scintillator blur) makes the estimate low, both misfits grow, and the score becomes the ratio
to FBP's alone. The reference is the FBP actually published: a smoother filter than the ramp
raises its misfit and so loosens the guard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.project import project_tensor

DEFAULT_THRESHOLD = 1.25
# chi2 per degree of freedom is a mean: every k-th angle estimates it as well (90 angles x a
# 256-px detector are 23,000 degrees of freedom) at a k-th of the projection's cost.
DEFAULT_MAX_ANGLES = 90
# median of chi-square with one degree of freedom: median(h^2) / this = E[h^2] for Gaussian h
_CHI2_1_MEDIAN = 0.454936423119572
# second difference [1, -2, 1] of white noise: variance 6 sigma^2
_SECOND_DIFFERENCE_GAIN = 6.0


def estimate_variance(sinogram: torch.Tensor, smooth_columns: int = 9) -> torch.Tensor:
    """The noise variance of each slice's (B, angles, cols) line integrals, from the data alone:
    -> (B, 1, cols), one value per detector column.

    Squared second differences along the detector, their median over the angles of each column
    (the object's edges are few at any one column, so they barely move it), averaged over
    `smooth_columns` neighbouring columns. Per column because photon noise grows with the line
    integral (exp(p) / I0) and a column's rays cross about the same length of a sample centred
    on the axis at every angle. Floored at the slice's median column (and 1e-12 x its mean
    square): noise-free data give a small positive variance (their signal's own roughness), and
    columns quieter than typical (air) do not outweigh the sample's.
    """
    data = sinogram.to(torch.float32)
    second = data[..., :-2] - 2 * data[..., 1:-1] + data[..., 2:]
    median = second.square().median(dim=1).values  # (B, cols - 2)
    median = F.pad(median[:, None], (1, 1), mode="replicate")  # back to cols
    width = max(1, smooth_columns)
    median = F.avg_pool1d(
        F.pad(median, (width // 2, (width - 1) // 2), mode="replicate"), width, stride=1
    )[:, 0]
    variance = median / (_CHI2_1_MEDIAN * _SECOND_DIFFERENCE_GAIN)
    # no column below the slice's typical one: quiet columns (air, the field's rim) would
    # otherwise outweigh the sample's, and there any slice that is zero outside the sample beats
    # FBP's ramp-filter tails
    typical = variance.median(dim=1, keepdim=True).values
    floor = torch.maximum(typical, 1e-12 * data.square().flatten(1).mean(1, keepdim=True))
    return torch.maximum(variance, floor + torch.finfo(torch.float32).tiny)[:, None, :]


def photon_variance(sinogram: torch.Tensor, flat_counts: torch.Tensor | float) -> torch.Tensor:
    """Variance of each measured line integral p = -log(I / I0): exp(p) / I0 (Poisson counts,
    delta method). `flat_counts` is I0 (photons per pixel of the flat, less the dark): a number or
    a tensor broadcastable to the sinogram (e.g. (1, 1, cols) per detector pixel)."""
    counts = torch.as_tensor(flat_counts, dtype=torch.float32, device=sinogram.device)
    return torch.exp(sinogram.to(torch.float32)) / counts.clamp_min(1.0)


def misfit(
    slices: torch.Tensor,
    sinogram: torch.Tensor,
    theta: torch.Tensor,
    center: float,
    variance: torch.Tensor,
) -> torch.Tensor:
    """chi2 per degree of freedom of each (B, N, N) slice against its (B, angles, cols) measured
    line integrals: -> (B,). `variance` broadcasts to the sinogram."""
    projected = project_tensor(slices, theta, center, sinogram.shape[-1])
    residual = projected - sinogram.to(torch.float32)
    return (residual.square() / variance).flatten(1).mean(dim=1)


def consistency(
    denoised: torch.Tensor,
    fbp: torch.Tensor,
    sinogram: torch.Tensor,
    theta: torch.Tensor,
    center: float,
    variance: torch.Tensor | None = None,
    max_angles: int | None = DEFAULT_MAX_ANGLES,
) -> torch.Tensor:
    """The guard's score per slice, (B,) float32 on the slices' device (the module docstring says
    what it means).

    `denoised`, `fbp`: (B, N, N) slices of the same detector rows, attenuation per pixel;
    `sinogram`: (B, angles, cols) those rows' measured line integrals (the scan's sinogram layout);
    `theta`: (angles,) radians; `center`: rotation axis, TomoPy's convention; `variance`: the
    noise variance of each line integral, broadcastable to the sinogram (`photon_variance`), or
    None to estimate it from the sinogram (`estimate_variance`); `max_angles`: compare at every
    k-th angle only, k the smallest that leaves at most this many (None: every angle).
    """
    if denoised.shape != fbp.shape or denoised.ndim != 3:
        raise ValueError(
            f"denoised {tuple(denoised.shape)} and fbp {tuple(fbp.shape)} must be the same "
            "(batch, N, N)"
        )
    if sinogram.ndim != 3 or sinogram.shape[0] != denoised.shape[0]:
        raise ValueError(
            f"sinogram must be (batch, angles, cols) with batch {denoised.shape[0]}, "
            f"got {tuple(sinogram.shape)}"
        )
    if sinogram.shape[1] != theta.numel():
        raise ValueError(f"sinogram has {sinogram.shape[1]} angles, theta {theta.numel()}")
    batch = denoised.shape[0]
    sinogram = sinogram.to(denoised.device)
    if variance is None:
        variance = estimate_variance(sinogram)
    variance = torch.broadcast_to(variance.to(denoised.device, torch.float32), sinogram.shape)
    angles = sinogram.shape[1]
    if max_angles is not None and angles > max_angles > 0:
        stride = -(-angles // max_angles)
        sinogram, variance, theta = sinogram[:, ::stride], variance[:, ::stride], theta[::stride]
    # one projection call for both: the projector's tables are built once
    both = torch.cat([denoised, fbp.to(denoised.device)]).to(torch.float32)
    chi2 = misfit(
        both, torch.cat([sinogram, sinogram]), theta, center, torch.cat([variance, variance])
    )
    return chi2[:batch] / chi2[batch:].clamp_min(1.0)


@dataclass(frozen=True)
class GuardDecision:
    """The guard's verdict on a batch of slices: `keep[i]` true publishes the denoised slice i,
    false publishes its FBP; `consistency[i]` its score; `threshold` the bound it was held to.
    Tensors on the slices' device; immutable, safe to hand between threads."""

    keep: torch.Tensor
    consistency: torch.Tensor
    threshold: float

    def published(self, denoised: torch.Tensor, fbp: torch.Tensor) -> torch.Tensor:
        """(B, N, N): the denoised slice where kept, its FBP elsewhere."""
        return torch.where(self.keep[:, None, None], denoised, fbp.to(denoised.dtype))


def guard(
    denoised: torch.Tensor,
    fbp: torch.Tensor,
    sinogram: torch.Tensor,
    theta: torch.Tensor,
    center: float,
    variance: torch.Tensor | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_angles: int | None = DEFAULT_MAX_ANGLES,
) -> GuardDecision:
    """Keep each denoised slice whose `consistency` is at most `threshold`; arguments as
    `consistency`. A score that is not finite (a NaN slice) falls back."""
    if not threshold > 0:
        raise ValueError(f"threshold={threshold} must be > 0 (1.0: no worse than FBP)")
    score = consistency(denoised, fbp, sinogram, theta, center, variance, max_angles)
    keep = torch.isfinite(score) & (score <= threshold)
    return GuardDecision(keep, score, threshold)
