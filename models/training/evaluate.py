"""`tomocast evaluate`: the model card's quality table, on held-out foam phantoms.

For each phantom seed (default: EVALUATION_SEED onwards, which `tomocast dataset` refuses to
use) the phantom is projected at `angles` views and reconstructed by FBP under each low-dose
condition, with the same noise model as the training data (`models.training.synthesize`). Each
slice is scored against the voxelised phantom, data range = the phantom's (its attenuation mu):
plain FBP, and FBP + each denoiser (run as the service runs it, `workers.denoise.DenoiseEngine`
on adjacent slices). Scores are means over all slices of all phantoms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.training.metrics import psnr, ssim
from workers.lowdose import EVALUATION_SEED, Condition, render

DEFAULT_SEEDS = (EVALUATION_SEED, EVALUATION_SEED + 1, EVALUATION_SEED + 2)


@dataclass(frozen=True)
class Row:
    condition: str
    model: str
    fbp_psnr: float
    fbp_ssim: float
    psnr: float
    ssim: float

    @property
    def gain_db(self) -> float:
        return self.psnr - self.fbp_psnr


def _scores(images: np.ndarray, truth: np.ndarray) -> tuple[list[float], list[float]]:
    data_range = float(truth.max() - truth.min()) or 1.0
    a, b = torch.from_numpy(images), torch.from_numpy(truth)
    return psnr(a, b, data_range).tolist(), ssim(a, b, data_range).tolist()


def evaluate(
    models: Sequence[str | Path] | None = None,
    seeds: Sequence[int] | None = None,
    rows: int = 8,
    size: int = 256,
    angles: int = 360,
    sparse: Sequence[int] = (8, 16),
    photons: Sequence[float] = (1000.0, 200.0),
    device: str = "cpu",
    progress: bool = True,
) -> list[Row]:
    """One Row per (condition, model); `models` None scores the service's default artifact."""
    from tqdm import tqdm

    from models.training.infer import denoise_volumes
    from workers.denoise import load_denoiser

    seeds = list(DEFAULT_SEEDS if seeds is None else seeds)
    chosen = [Condition(sparse=k) for k in sparse] + [Condition(photons=float(p)) for p in photons]
    paths: list[Path | None] = [Path(model) for model in models] if models else [None]
    engines = [load_denoiser(path, device) for path in paths]
    fbp: dict[str, tuple[list[float], list[float]]] = {c.label: ([], []) for c in chosen}
    denoised: dict[tuple[str, str], tuple[list[float], list[float]]] = {
        (c.label, e.name): ([], []) for c in chosen for e in engines
    }
    for seed in tqdm(seeds, desc="evaluate", unit="phantom", disable=not progress):
        for volume in render(seed, rows, size, angles, chosen, device=device):
            label = volume.condition.label
            p, s = _scores(volume.noisy, volume.target)
            fbp[label][0].extend(p)
            fbp[label][1].extend(s)
            for engine in engines:
                output = denoise_volumes(engine, volume.noisy, (rows,), progress=False)
                p, s = _scores(output, volume.target)
                denoised[label, engine.name][0].extend(p)
                denoised[label, engine.name][1].extend(s)
    return [
        Row(
            c.label,
            e.name,
            float(np.mean(fbp[c.label][0])),
            float(np.mean(fbp[c.label][1])),
            float(np.mean(denoised[c.label, e.name][0])),
            float(np.mean(denoised[c.label, e.name][1])),
        )
        for c in chosen
        for e in engines
    ]


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| condition | denoiser | PSNR FBP (dB) | PSNR denoised (dB) | gain (dB) | SSIM FBP |"
        " SSIM denoised |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.condition} | {r.model} | {r.fbp_psnr:.2f} | {r.psnr:.2f} | "
        f"{r.gain_db:+.2f} | {r.fbp_ssim:.3f} | {r.ssim:.3f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"
