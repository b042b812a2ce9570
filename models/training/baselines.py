"""Classical denoisers that `tomocast evaluate` scores beside the models: Gaussian blur,
total variation (scikit-image's `denoise_tv_chambolle`), non-local means (`denoise_nl_means`) and,
when the `bm3d` package is installed, BM3D.

Each has one parameter, chosen from a grid per case on validation slices (another phantom of the
same family, attenuation and condition) by mean PSNR against their truth, then applied to the
scored slices: the scored truth never picks a parameter. Strengths that depend on the noise are
multiples of the slice's own noise estimate (`noise_sigma`, from the noisy slice alone), so the
grids hold at any attenuation. Slices are filtered one by one (2-D), as FBP delivers them.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

from models.training.metrics import psnr

Filter = Callable[[np.ndarray, float], np.ndarray]


def noise_sigma(image: np.ndarray) -> float:
    """Standard deviation of white noise in a 2-D image, from the image alone (Immerkaer 1996:
    the mean absolute response to a Laplacian-difference mask that cancels smooth structure)."""
    x = np.asarray(image, dtype=np.float64)
    if min(x.shape) < 3:
        raise ValueError(f"image of {x.shape} is too small to estimate its noise (3 x 3 at least)")
    response = (
        x[:-2, :-2] - 2 * x[:-2, 1:-1] + x[:-2, 2:]
        - 2 * x[1:-1, :-2] + 4 * x[1:-1, 1:-1] - 2 * x[1:-1, 2:]
        + x[2:, :-2] - 2 * x[2:, 1:-1] + x[2:, 2:]
    )  # fmt: skip
    return float(math.sqrt(math.pi / 2) * np.abs(response).mean() / 6)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D image, reflect-padded, kernel radius ceil(4 sigma)."""
    radius = max(1, math.ceil(4 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = np.asarray(image, dtype=np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        length = out.shape[axis]
        total = np.zeros_like(out)
        for k, weight in enumerate(taps):
            total += weight * np.take(padded, np.arange(k, k + length), axis=axis)
        out = total
    blurred: np.ndarray = out.astype(np.float32)
    return blurred


def _tv(image: np.ndarray, factor: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    weight = factor * noise_sigma(image)
    out = denoise_tv_chambolle(image, weight=weight)  # type: ignore[no-untyped-call]
    return np.asarray(out, dtype=np.float32)


def _nlm(image: np.ndarray, factor: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    sigma = noise_sigma(image)
    out = denoise_nl_means(
        image, h=factor * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
    )
    return np.asarray(out, dtype=np.float32)


def _bm3d(image: np.ndarray, factor: float) -> np.ndarray:
    import bm3d

    out = bm3d.bm3d(image.astype(np.float64), sigma_psd=factor * noise_sigma(image))
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class Baseline:
    """A classical filter with one parameter and the grid it is tuned over."""

    name: str
    parameter: str  # how the parameter reads in a table: "sigma 1.5" (px), "w 0.5s" (x noise)
    grid: tuple[float, ...]
    apply: Filter
    requires: str | None = None  # the module it needs, when it is not always installed

    @property
    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def describe(self, value: float) -> str:
        return self.parameter.format(value)


BASELINES = MappingProxyType(
    {
        b.name: b
        for b in (
            Baseline(
                "gaussian", "sigma {:g}", (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), gaussian_blur
            ),
            Baseline("tv", "w {:g}s", (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0), _tv, "skimage"),
            Baseline("nlm", "h {:g}s", (0.6, 1.0, 1.6, 2.5, 4.0, 6.4, 10.0, 16.0), _nlm, "skimage"),
            Baseline("bm3d", "sigma {:g}s", (1.0, 2.0, 4.0), _bm3d, "bm3d"),
        )
    }
)


def resolve(names: Sequence[str]) -> tuple[list[Baseline], list[str]]:
    """The baselines named (or "all"), and a note for each one that cannot run here."""
    wanted = list(BASELINES) if list(names) == ["all"] else list(names)
    unknown = [name for name in wanted if name not in BASELINES]
    if unknown:
        raise ValueError(f"baseline {unknown[0]!r}: choose from {', '.join(BASELINES)} or all")
    chosen, skipped = [], []
    for name in wanted:
        baseline = BASELINES[name]
        if baseline.available:
            chosen.append(baseline)
        else:
            skipped.append(f"{name}: not run, `{baseline.requires}` is not installed")
    return chosen, skipped


def filter_slices(baseline: Baseline, noisy: np.ndarray, value: float) -> np.ndarray:
    """(n, H, W) -> (n, H, W) float32, each slice filtered on its own."""
    return np.stack([baseline.apply(image, value) for image in noisy]).astype(np.float32)


@dataclass(frozen=True)
class Tuned:
    """A baseline's chosen parameter and its mean validation PSNR."""

    baseline: Baseline
    value: float
    validation_psnr: float

    @property
    def described(self) -> str:
        return self.baseline.describe(self.value)


def tune(
    baseline: Baseline, noisy: np.ndarray, truth: np.ndarray, data_range: float | None = None
) -> Tuned:
    """The grid value that maximises mean PSNR of the filtered `noisy` (n, H, W) against `truth`:
    call it with validation slices, never with the ones you score. Ties go to the first value."""
    if noisy.shape != truth.shape or noisy.ndim != 3:
        raise ValueError(f"noisy {noisy.shape} and truth {truth.shape} must be equal (n, H, W)")
    if data_range is None:
        data_range = float(truth.max() - truth.min()) or 1.0
    reference = torch.from_numpy(np.ascontiguousarray(truth))
    best: Tuned | None = None
    for value in baseline.grid:
        filtered = torch.from_numpy(filter_slices(baseline, noisy, value))
        score = float(psnr(filtered, reference, data_range).mean())
        if best is None or score > best.validation_psnr:
            best = Tuned(baseline, value, score)
    assert best is not None  # every grid has a value
    return best
