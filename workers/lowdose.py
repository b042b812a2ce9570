"""Low-dose acquisitions of analytic phantoms: the (noisy FBP, truth) volumes that training,
evaluation and int8 calibration share.

A phantom of one of `workers.phantoms.FAMILIES` (default: the foam, `workers.phantom`) at an
attenuation scale (default 1, the family's own) is projected exactly at `angles` views over
[0, pi); each `Condition` keeps every k-th view and/or draws Poisson counts at `photons` per
detector pixel (back to line integrals by -log(max(counts, 1) / photons)), and is reconstructed with
`workers.recon.recon`. Seeds from `EVALUATION_SEED` on, and the family `HELD_OUT`, are kept for
evaluation: training data must reach neither (`check_training`).

Detector effects (each off by default, so a condition without them gives the same numbers as
before they existed), applied to the transmitted intensity I = exp(-p) of the kept views in this
order: scintillator blur (a Gaussian PSF of `blur` pixels over each projection's rows and
columns), residual rings (a gain per detector column, 1 + `rings` x N(0, 1), the same at every
angle: what flat-fielding leaves), zingers (a fraction `zingers` of the detector pixels, per
projection, `ZINGER_GAIN` x too bright), then Poisson counts at `photons` plus `dark` counts of
dark current, with the mean dark subtracted. `center_error` shifts the rotation axis of the
projections by that many pixels while the reconstruction keeps the declared centre (`render`
projects such a condition separately).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workers.phantoms import FAMILIES, HELD_OUT, make_phantom

EVALUATION_SEED = 1_000_000
ZINGER_GAIN = 8.0


def check_training(family: str, seeds: range | Sequence[int]) -> None:
    """ValueError when training data would use the held-out family or an evaluation seed."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: choose one of {', '.join(FAMILIES)}")
    if family == HELD_OUT:
        raise ValueError(f"family={family!r} is held out of training: evaluation scores it")
    late = [seed for seed in seeds if seed >= EVALUATION_SEED]
    if late:
        raise ValueError(
            f"seed {late[0]} is in the evaluation range ({EVALUATION_SEED} on): pick lower seeds"
        )


@dataclass(frozen=True)
class Condition:
    """One low-dose acquisition: keep every `sparse`-th view, count `photons` per pixel (None:
    noise-free), and the detector effects of the module docstring (0: off)."""

    sparse: int = 1
    photons: float | None = None
    dark: float = 0.0  # counts of dark current per pixel (needs photons)
    blur: float = 0.0  # scintillator PSF sigma, detector pixels
    rings: float = 0.0  # relative std of the per-column gain
    zingers: float = 0.0  # fraction of detector pixels hit, per projection
    center_error: float = 0.0  # rotation axis offset of the projections, pixels

    def __post_init__(self) -> None:
        if self.sparse < 1:
            raise ValueError(f"sparse={self.sparse} must be >= 1 (1 keeps every view)")
        if self.photons is not None and self.photons <= 0:
            raise ValueError(f"photons={self.photons} must be > 0")
        for name in ("dark", "blur", "rings"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: off)")
        if not 0 <= self.zingers < 1:
            raise ValueError(f"zingers={self.zingers} must be a fraction in [0, 1)")
        if self.dark and self.photons is None:
            raise ValueError(f"dark={self.dark} needs photons (dark current is counting noise)")

    @property
    def detector_effects(self) -> bool:
        """Whether any effect acts on the intensity (blur, rings, zingers, dark)."""
        return bool(self.blur or self.rings or self.zingers or self.dark)

    @property
    def label(self) -> str:
        parts = [f"1/{self.sparse} views"] if self.sparse > 1 else []
        if self.photons is not None:
            parts.append(f"{self.photons:,.0f} photons")
        if self.dark:
            parts.append(f"dark {self.dark:g}")
        if self.blur:
            parts.append(f"blur {self.blur:g} px")
        if self.rings:
            parts.append(f"rings {100 * self.rings:g} %")
        if self.zingers:
            parts.append(f"zingers {100 * self.zingers:g} %")
        if self.center_error:
            parts.append(f"centre {self.center_error:+g} px")
        return ", ".join(parts) or "full dose"


def detector_line_integrals(
    views: np.ndarray, condition: Condition, rng: np.random.Generator
) -> np.ndarray:
    """(angles, rows, cols) exact line integrals -> as the detector under `condition` reports
    them after flat-field correction and -log (float64)."""
    from scipy.ndimage import gaussian_filter

    intensity = np.exp(-views.astype(np.float64))
    if condition.blur:
        intensity = gaussian_filter(intensity, (0.0, condition.blur, condition.blur))
    if condition.rings:
        intensity = intensity * (1.0 + condition.rings * rng.standard_normal(views.shape[-1]))
    if condition.zingers:
        intensity = np.where(
            rng.random(views.shape) < condition.zingers, ZINGER_GAIN * intensity, intensity
        )
    if condition.photons is None:
        detected: np.ndarray = -np.log(np.maximum(intensity, 1e-12))
        return detected
    counts = rng.poisson(condition.photons * intensity + condition.dark) - condition.dark
    detected = -np.log(np.maximum(counts, 1) / condition.photons)
    return detected


def low_dose_reconstruction(
    line_integrals: np.ndarray,
    theta: np.ndarray,
    condition: Condition,
    rng: np.random.Generator,
    device: str | None = "cpu",
) -> np.ndarray:
    """(rows, N, N) FBP of (angles, rows, cols) noise-free line integrals under `condition`,
    reconstructed about the declared centre (cols / 2)."""
    from workers.recon import recon

    views = line_integrals[:: condition.sparse]
    angles = theta[:: condition.sparse]
    if condition.detector_effects:
        views = detector_line_integrals(views, condition, rng)
    elif condition.photons is not None:
        counts = rng.poisson(condition.photons * np.exp(-views.astype(np.float64)))
        views = -np.log(np.maximum(counts, 1) / condition.photons)
    # The direct method, which every data set, evaluation and int8 calibration so far was
    # made with: the same phantom and seed give the same volumes as before.
    return recon(views.astype(np.float32), angles, device=device, method="direct")


@dataclass(frozen=True)
class Volume:
    """One phantom under one condition: (rows, N, N) noisy and target slices."""

    noisy: np.ndarray
    target: np.ndarray
    seed: int
    condition: Condition
    family: str = "foam"
    attenuation: float = 1.0


def render(
    seed: int,
    rows: int,
    size: int,
    angles: int,
    chosen: Sequence[Condition],
    target: str = "phantom",
    device: str | None = "cpu",
    family: str = "foam",
    attenuation: float = 1.0,
) -> list[Volume]:
    """The volumes of one phantom (`family`, seed `seed`, `attenuation` x the family's default)
    under each of `chosen`."""
    from workers.recon import recon

    phantom = make_phantom(family, rows, size, seed=seed, attenuation=attenuation)
    theta = np.linspace(0.0, np.pi, angles, endpoint=False)
    line_integrals = phantom.project(theta)
    # A centre error needs its own projections: the axis moved, the declared centre did not.
    shifted = {
        c.center_error: phantom.project(theta, center=size / 2 + c.center_error)
        for c in chosen
        if c.center_error
    }
    if target == "phantom":
        truth = phantom.voxelize()
    elif target == "fbp":
        truth = recon(line_integrals, theta, device=device, method="direct")
    else:
        raise ValueError(f"target={target!r}: choose phantom or fbp")
    # A noise stream per (phantom, condition), so adding a condition changes no other volume.
    return [
        Volume(
            low_dose_reconstruction(
                shifted.get(condition.center_error, line_integrals),
                theta,
                condition,
                np.random.default_rng((seed, index)),
                device,
            ),
            truth,
            seed,
            condition,
            family,
            attenuation,
        )
        for index, condition in enumerate(chosen)
    ]


@dataclass(frozen=True)
class Measured:
    """What the detector measured for one `Volume`: the (angles, rows, cols) line integrals that
    its noisy FBP was reconstructed from, their angles (radians), the rotation axis (TomoPy's
    convention) and the flat's counts per pixel (None: noise-free)."""

    volume: Volume
    sinogram: np.ndarray
    theta: np.ndarray
    center: float
    photons: float | None


def render_measured(
    seed: int,
    rows: int,
    size: int,
    angles: int,
    chosen: Sequence[Condition],
    device: str | None = "cpu",
    family: str = "foam",
    attenuation: float = 1.0,
) -> list[Measured]:
    """`render(..., target="phantom")` with each volume's measured sinogram beside it: the same
    phantom, the same noise draws, hence the same volumes."""
    from workers.recon import recon

    phantom = make_phantom(family, rows, size, seed=seed, attenuation=attenuation)
    theta = np.linspace(0.0, np.pi, angles, endpoint=False)
    line_integrals = phantom.project(theta)
    truth = phantom.voxelize()
    out = []
    for index, condition in enumerate(chosen):
        rng = np.random.default_rng((seed, index))
        views = line_integrals[:: condition.sparse]
        if condition.photons is not None:
            counts = rng.poisson(condition.photons * np.exp(-views.astype(np.float64)))
            views = -np.log(np.maximum(counts, 1) / condition.photons)
        sinogram = views.astype(np.float32)
        noisy = recon(sinogram, theta[:: condition.sparse], device=device, method="direct")
        volume = Volume(noisy, truth, seed, condition, family, attenuation)
        center = sinogram.shape[2] / 2
        out.append(
            Measured(volume, sinogram, theta[:: condition.sparse], center, condition.photons)
        )
    return out
