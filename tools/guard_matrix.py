"""The no-harm guard (`workers.guard`) on the evaluation matrix: per phantom family, attenuation and
low-dose condition, how many slices the guard keeps denoised and how many fall back to FBP, and
the PSNR of what would be published beside plain FBP's and the denoiser's.

    OMP_NUM_THREADS=1 python tools/guard_matrix.py --out guard.md

Phantoms from `workers.lowdose.EVALUATION_SEED` on (never seen in training), rendered with their
measured sinograms (`workers.lowdose.render_measured`), denoised as `tomocast evaluate` does
(`workers.denoise.load_denoiser`, `models.training.infer.denoise_volumes`). The guard runs twice:
with the noise variance the photon counts predict (the service knows its flats; noise-free
conditions have no counts, so there it estimates too) and with the variance estimated from the
sinogram alone. Timing: seconds per slice of the denoiser and of the guard, in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.training.infer import denoise_volumes
from models.training.matrix import slice_scores
from workers.denoise import load_denoiser
from workers.guard import DEFAULT_THRESHOLD, GuardDecision, guard, photon_variance
from workers.lowdose import EVALUATION_SEED, Condition, Measured, render_measured
from workers.phantoms import FAMILIES

CONDITIONS = (
    Condition(sparse=8),
    Condition(sparse=16),
    Condition(photons=1000.0),
    Condition(photons=200.0),
)
SWEEP = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
RIGHT = ("foam", 1.0)  # the shipped model's training sample: the guard should keep it


@dataclass
class Case:
    family: str
    attenuation: float
    condition: str
    scores: list[float] = field(default_factory=list)  # counts variance where known
    scores_estimated: list[float] = field(default_factory=list)
    keep: list[bool] = field(default_factory=list)
    keep_estimated: list[bool] = field(default_factory=list)
    fbp: list[float] = field(default_factory=list)  # PSNR per slice
    denoised: list[float] = field(default_factory=list)

    @property
    def right(self) -> bool:
        return (self.family, self.attenuation) == RIGHT

    def published(self, estimated: bool = False) -> list[float]:
        keep = self.keep_estimated if estimated else self.keep
        return [d if k else f for k, d, f in zip(keep, self.denoised, self.fbp, strict=True)]


def _decide(
    measured: Measured, denoised: np.ndarray, threshold: float, counts: bool
) -> GuardDecision:
    sinogram = torch.from_numpy(measured.sinogram).permute(1, 0, 2)  # (rows, angles, cols)
    variance = None
    if counts and measured.photons is not None:
        variance = photon_variance(sinogram, measured.photons)
    return guard(
        torch.from_numpy(denoised),
        torch.from_numpy(measured.volume.noisy),
        sinogram,
        torch.from_numpy(measured.theta),
        measured.center,
        variance,
        threshold,
    )


def run_matrix(
    model: str | None,
    families: Sequence[str],
    attenuations: Sequence[float],
    seeds: Sequence[int],
    rows: int,
    size: int,
    angles: int,
    threshold: float,
) -> tuple[list[Case], float, float]:
    """The cases, and seconds per slice of the denoiser and of the guard (counts variance)."""
    engine = load_denoiser(model, "cpu")
    cases: dict[tuple[str, float, str], Case] = {}
    denoise_s = guard_s = 0.0
    slices = 0
    for family in families:
        for attenuation in attenuations:
            for seed in seeds:
                for measured in render_measured(
                    seed, rows, size, angles, CONDITIONS, family=family, attenuation=attenuation
                ):
                    volume = measured.volume
                    key = (family, attenuation, volume.condition.label)
                    case = cases.setdefault(key, Case(*key))
                    t0 = time.perf_counter()
                    denoised = denoise_volumes(engine, volume.noisy, (rows,), progress=False)
                    t1 = time.perf_counter()
                    decision = _decide(measured, denoised, threshold, counts=True)
                    t2 = time.perf_counter()
                    estimated = _decide(measured, denoised, threshold, counts=False)
                    denoise_s += t1 - t0
                    guard_s += t2 - t1
                    slices += rows
                    case.scores += decision.consistency.tolist()
                    case.keep += decision.keep.tolist()
                    case.scores_estimated += estimated.consistency.tolist()
                    case.keep_estimated += estimated.keep.tolist()
                    case.fbp += slice_scores(volume.noisy, volume.target)[0]
                    case.denoised += slice_scores(denoised, volume.target)[0]
            print(f"{family} {attenuation:g}x done", file=sys.stderr, flush=True)
    return list(cases.values()), denoise_s / slices, guard_s / slices


def _rate(flags: Sequence[bool]) -> str:
    # "-" where the run has no such slices (e.g. no foam among --families): not "nan %"
    return f"{100 * np.mean(flags):.0f} %" if len(flags) else "-"


def format_report(cases: Sequence[Case], denoise_s: float, guard_s: float, threshold: float) -> str:
    """Markdown: the per-case table, then the criteria and the cost."""
    lines = [
        "| family | atten. | condition | consistency (median) | kept | kept (estimated noise) "
        "| PSNR FBP | PSNR denoised | PSNR published | worst slice published - FBP (dB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        worst = min(p - f for p, f in zip(c.published(), c.fbp, strict=True))
        lines.append(
            f"| {c.family} | {c.attenuation:g}x | {c.condition} | {np.median(c.scores):.3g} "
            f"| {_rate(c.keep)} | {_rate(c.keep_estimated)} | {np.mean(c.fbp):.2f} "
            f"| {np.mean(c.denoised):.2f} | {np.mean(c.published()):.2f} | {worst:+.2f} |"
        )
    right = [c for c in cases if c.right]
    wrong = [c for c in cases if c.family not in ("foam", "cells")]
    lines += ["", f"threshold {threshold:g}", ""]
    lines += ["| set | slices | kept | kept (estimated noise) |", "|---|---:|---:|---:|"]
    groups = {
        "right model: foam 1x": right,
        "wrong model: granular, fibres, layered, inclusions (all attenuations)": wrong,
        "wrong model, 1x only": [c for c in wrong if c.attenuation == 1.0],
        "foam 0.3x and 3x": [c for c in cases if c.family == "foam" and not c.right],
        "cells (held out)": [c for c in cases if c.family == "cells"],
    }
    for name, group in groups.items():
        if not group:
            continue
        keep = [k for c in group for k in c.keep]
        keep_est = [k for c in group for k in c.keep_estimated]
        lines.append(f"| {name} | {len(keep)} | {_rate(keep)} | {_rate(keep_est)} |")
    for estimated in (False, True):
        deltas = [p - f for c in cases for p, f in zip(c.published(estimated), c.fbp, strict=True)]
        harm = [
            d - f
            for c in cases
            for d, f, k in zip(
                c.denoised, c.fbp, c.keep_estimated if estimated else c.keep, strict=True
            )
            if k
        ]
        label = "estimated noise" if estimated else "counts"
        lines.append(
            f"\n{label}: published - FBP per slice: worst {min(deltas):+.2f} dB, "
            f"kept slices {len(harm)}, of which worse than FBP: {sum(h < 0 for h in harm)}"
        )
    lines += [
        "",
        "Other thresholds (photon variance where known), from the same scores:",
        "",
        "| threshold | right model kept | wrong model fallen back | kept slices below FBP "
        "| worst published - FBP (dB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for t in SWEEP:
        kept_right = [s <= t for c in right for s in c.scores]
        fallen_wrong = [not s <= t for c in wrong for s in c.scores]
        pairs = [
            (d - f if s <= t else 0.0)
            for c in cases
            for s, d, f in zip(c.scores, c.denoised, c.fbp, strict=True)
        ]
        lines.append(
            f"| {t:g} | {_rate(kept_right)} | {_rate(fallen_wrong)} "
            f"| {sum(x < 0 for x in pairs)} | {min(pairs):+.2f} |"
        )
    lines.append(
        f"\ncost per slice: denoise {denoise_s * 1e3:.1f} ms, guard {guard_s * 1e3:.1f} ms "
        f"({100 * guard_s / denoise_s:.1f} % of the denoise)"
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="artifact (default: the shipped model)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--attenuations", nargs="+", type=float, default=[0.3, 1.0, 3.0])
    parser.add_argument("--seeds", type=int, default=2, help="phantoms per case")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--angles", type=int, default=360)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [EVALUATION_SEED + i for i in range(args.seeds)]
    cases, denoise_s, guard_s = run_matrix(
        args.model,
        args.families,
        args.attenuations,
        seeds,
        args.rows,
        args.size,
        args.angles,
        args.threshold,
    )
    report = format_report(cases, denoise_s, guard_s, args.threshold)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
