"""The generalisation matrix behind `tomocast evaluate`: how denoisers do on samples they never
saw, against classical filters computed in the same run.

Family (`workers.phantoms.FAMILIES`, the held-out one marked) x attenuation (multiples of each
family's default) x low-dose condition (sparse views, photon counts). For each (family,
attenuation) a phantom per seed (default: EVALUATION_SEED, which no training data set reaches) is
projected exactly at `angles` views and reconstructed by FBP under each condition
(`workers.lowdose.render`). Each scored slice is compared with the voxelised phantom, data range
= that phantom's (PSNR and SSIM of `models.training.metrics`, scikit-image's definitions):

- plain FBP;
- each classical filter (`models.training.baselines`), its parameter tuned per case on a
  validation phantom (seed + VALIDATION_OFFSET, same family, attenuation and condition), never on
  the scored slices;
- each model, run as the service runs it (`workers.denoise.load_denoiser`, adjacent slices,
  `models.training.infer.denoise_volumes`).

A case counts "no worse than FBP" when the denoised slices' mean PSNR and SSIM are both >= FBP's,
and "beats the best classical" when their PSNR is >= the best classical method's (FBP included;
the best picked by scored PSNR, a bar no lower than any tuned filter) + MARGIN_DB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from models.training.baselines import filter_slices, resolve, tune
from models.training.matrix_defaults import (
    DEFAULT_ATTENUATIONS,
    DEFAULT_BASELINES,
    MARGIN_DB,
    VALIDATION_OFFSET,
)
from models.training.metrics import detail_snr, psnr, ssim
from workers.lowdose import EVALUATION_SEED, Condition, render
from workers.phantoms import FAMILIES, HELD_OUT


@dataclass(frozen=True)
class Score:
    """One method on one case: mean PSNR (dB), SSIM and detail SNR (dB,
    `models.training.metrics.detail_snr`) over the scored slices; `parameter` the tuned value of
    a classical filter, as the table shows it."""

    method: str
    psnr: float
    ssim: float
    detail: float = float("nan")
    parameter: str | None = None


@dataclass(frozen=True)
class Case:
    """Family x attenuation x condition: FBP, the tuned classical filters, the models."""

    family: str
    held_out: bool
    attenuation: float
    condition: str
    seeds: tuple[int, ...]
    validation_seeds: tuple[int, ...]
    fbp: Score
    classical: tuple[Score, ...]
    models: tuple[Score, ...]

    @property
    def best_classical(self) -> Score:
        """The best PSNR among FBP and the tuned filters."""
        return max((self.fbp, *self.classical), key=lambda score: score.psnr)

    @property
    def best_classical_detail(self) -> float:
        """The best detail SNR among FBP and the tuned filters."""
        return max(score.detail for score in (self.fbp, *self.classical))

    def model(self, name: str) -> Score:
        return next(score for score in self.models if score.method == name)

    def no_worse_than_fbp(self, name: str) -> bool:
        score = self.model(name)
        return score.psnr >= self.fbp.psnr and score.ssim >= self.fbp.ssim

    def beats_best_classical(self, name: str, margin: float = MARGIN_DB) -> bool:
        return self.model(name).psnr >= self.best_classical.psnr + margin


@dataclass(frozen=True)
class Summary:
    """A model's counts over the matrix (and over its held-out family's cases)."""

    model: str
    cases: int
    no_worse_than_fbp: int
    beats_best_classical: int
    held_out_cases: int
    held_out_no_worse_than_fbp: int
    held_out_beats_best_classical: int


@dataclass(frozen=True)
class Matrix:
    """The evaluation's cases, the settings that produced them, and notes (skipped baselines)."""

    cases: tuple[Case, ...]
    settings: dict[str, object]
    notes: tuple[str, ...] = ()

    @property
    def model_names(self) -> list[str]:
        return [score.method for score in self.cases[0].models] if self.cases else []

    def summary(self) -> list[Summary]:
        out = []
        for name in self.model_names:
            held = [case for case in self.cases if case.held_out]
            out.append(
                Summary(
                    name,
                    len(self.cases),
                    sum(case.no_worse_than_fbp(name) for case in self.cases),
                    sum(case.beats_best_classical(name) for case in self.cases),
                    len(held),
                    sum(case.no_worse_than_fbp(name) for case in held),
                    sum(case.beats_best_classical(name) for case in held),
                )
            )
        return out


def slice_scores(
    images: np.ndarray, truth: np.ndarray
) -> tuple[list[float], list[float], list[float]]:
    """Per slice PSNR, SSIM and detail SNR; data range = the volume's truth's."""
    data_range = float(truth.max() - truth.min()) or 1.0
    a, b = torch.from_numpy(images), torch.from_numpy(truth)
    return (
        psnr(a, b, data_range).tolist(),
        ssim(a, b, data_range).tolist(),
        detail_snr(a, b).tolist(),
    )


def _mean_scores(
    images: Sequence[np.ndarray], truths: Sequence[np.ndarray]
) -> tuple[float, float, float]:
    """Mean PSNR, SSIM and detail SNR over all slices of all volumes (detail: over the slices
    that have one)."""
    scores: tuple[list[float], list[float], list[float]] = ([], [], [])
    for image, truth in zip(images, truths, strict=True):
        for total, part in zip(
            scores,
            slice_scores(np.ascontiguousarray(image), np.ascontiguousarray(truth)),
            strict=True,
        ):
            total += part
    details = [d for d in scores[2] if np.isfinite(d)]
    detail = float(np.mean(details)) if details else float("nan")
    return float(np.mean(scores[0])), float(np.mean(scores[1])), detail


def evaluate_matrix(
    models: Sequence[str | Path | None] = (None,),
    families: Sequence[str] | None = None,
    attenuations: Sequence[float] = DEFAULT_ATTENUATIONS,
    sparse: Sequence[int] = (8, 16),
    photons: Sequence[float] = (1000.0, 200.0),
    seeds: Sequence[int] = (EVALUATION_SEED,),
    rows: int = 4,
    size: int = 256,
    angles: int = 360,
    validation_rows: int = 1,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    device: str = "cpu",
    progress: bool = True,
) -> Matrix:
    """Score FBP, the tuned `baselines` and `models` (None: the service's default artifact) on
    every family x attenuation x condition. Raises ValueError for an unknown family or
    baseline, or a seed below EVALUATION_SEED."""
    from tqdm import tqdm

    from models.training.infer import denoise_volumes
    from workers.denoise import load_denoiser

    families = list(FAMILIES) if families is None else list(families)
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"family={family!r}: choose from {', '.join(FAMILIES)}")
    early = [seed for seed in seeds if seed < EVALUATION_SEED]
    if early:
        raise ValueError(f"seed {early[0]} may be in training data: use {EVALUATION_SEED} on")
    chosen_baselines, notes = resolve(baselines)
    chosen = [Condition(sparse=k) for k in sparse] + [Condition(photons=float(p)) for p in photons]
    engines = [load_denoiser(path, device) for path in models]
    validation_seeds = tuple(seed + VALIDATION_OFFSET for seed in seeds)
    cases: list[Case] = []
    total = len(families) * len(attenuations) * len(chosen)
    with tqdm(total=total, desc="evaluate", unit="case", disable=not progress) as bar:
        for family in families:
            for attenuation in attenuations:
                bar.set_postfix_str(f"{family} x{attenuation:g}")

                make = partial(
                    render, size=size, angles=angles, chosen=chosen, device=device,
                    family=family, attenuation=attenuation,
                )  # fmt: skip
                scored = [make(seed, rows) for seed in seeds]
                validation = [make(seed, validation_rows) for seed in validation_seeds]
                for index, condition in enumerate(chosen):
                    noisy = [per_seed[index].noisy for per_seed in scored]
                    truth = [per_seed[index].target for per_seed in scored]
                    check_noisy = np.concatenate([v[index].noisy for v in validation])
                    check_truth = np.concatenate([v[index].target for v in validation])
                    classical = []
                    for baseline in chosen_baselines:
                        tuned = tune(baseline, check_noisy, check_truth)
                        filtered = [filter_slices(baseline, n, tuned.value) for n in noisy]
                        p, s, d = _mean_scores(filtered, truth)
                        classical.append(Score(baseline.name, p, s, d, tuned.described))
                    denoised = []
                    for engine in engines:
                        outputs = [
                            denoise_volumes(engine, n, (len(n),), progress=False) for n in noisy
                        ]
                        denoised.append(Score(engine.name, *_mean_scores(outputs, truth)))
                    cases.append(
                        Case(
                            family,
                            family == HELD_OUT,
                            float(attenuation),
                            condition.label,
                            tuple(seeds),
                            validation_seeds,
                            Score("fbp", *_mean_scores(noisy, truth)),
                            tuple(classical),
                            tuple(denoised),
                        )
                    )
                    bar.update()
    settings: dict[str, object] = {
        "families": families,
        "held_out": HELD_OUT,
        "attenuations": [float(a) for a in attenuations],
        "conditions": [c.label for c in chosen],
        "seeds": list(seeds),
        "validation_seeds": list(validation_seeds),
        "rows": rows,
        "validation_rows": validation_rows,
        "size": size,
        "angles": angles,
        "baselines": [b.name for b in chosen_baselines],
        "models": [e.name for e in engines],
        "device": device,
    }
    return Matrix(tuple(cases), settings, tuple(notes))
