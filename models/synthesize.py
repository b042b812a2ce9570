"""`tomocast dataset`: training pairs from simulated foam scans, in TomoGAN's one-file form.

Each phantom is a `service.phantom.FoamPhantom` (`rows` slices of `size` x `size`, seed
`seed + i`), projected analytically at `angles` views over [0, pi). Its low-dose versions are the
FBP (`workers.recon.recon`) of

- sparse views: every k-th projection (k = 2 ... 32: 1/k of the angles), and/or
- photon-limited projections: counts ~ Poisson(photons * exp(-p)) per detector pixel, back to
  line integrals by -log(max(counts, 1) / photons) (a count of 0 would be infinite attenuation),

each condition a separate volume of the same phantom. The target is the voxelised phantom
(attenuation per pixel, the service's units) or, with `target="fbp"`, the noise-free FBP of all
`angles` views. Test phantoms take the seeds after the training ones; `tomocast evaluate` uses
seeds from EVALUATION_SEED on, which no default data set reaches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from models.dataset import PER_PIXEL_UNITS
from service.errors import DataError
from service.phantom import FoamPhantom

log = logging.getLogger(__name__)

EVALUATION_SEED = 1_000_000


@dataclass(frozen=True)
class Condition:
    """One low-dose acquisition: keep every `sparse`-th view, and count `photons` per pixel
    (None: noise-free)."""

    sparse: int = 1
    photons: float | None = None

    def __post_init__(self) -> None:
        if self.sparse < 1:
            raise ValueError(f"sparse={self.sparse} must be >= 1 (1 keeps every view)")
        if self.photons is not None and self.photons <= 0:
            raise ValueError(f"photons={self.photons} must be > 0")

    @property
    def label(self) -> str:
        parts = [f"1/{self.sparse} views"] if self.sparse > 1 else []
        if self.photons is not None:
            parts.append(f"{self.photons:,.0f} photons")
        return ", ".join(parts) or "full dose"


def conditions(sparse: Iterable[int] = (), photons: Iterable[float] = (),
               combined: bool = False) -> list[Condition]:
    """Sparse-view conditions, then photon-limited ones (all views); with `combined` also
    every sparse x photons pair."""
    sparse, photons = list(sparse), [float(p) for p in photons]
    out = [Condition(sparse=k) for k in sparse] + [Condition(photons=p) for p in photons]
    if combined:
        out += [Condition(k, p) for k in sparse for p in photons]
    if not out:
        raise ValueError("no low-dose condition: give sparse factors and/or photon counts")
    return out


def low_dose_reconstruction(line_integrals: np.ndarray, theta: np.ndarray, condition: Condition,
                            rng: np.random.Generator, device: str | None = "cpu") -> np.ndarray:
    """(rows, N, N) FBP of (angles, rows, cols) noise-free line integrals under `condition`."""
    from workers.recon import recon

    views = line_integrals[:: condition.sparse]
    angles = theta[:: condition.sparse]
    if condition.photons is not None:
        counts = rng.poisson(condition.photons * np.exp(-views.astype(np.float64)))
        views = -np.log(np.maximum(counts, 1) / condition.photons)
    return recon(views.astype(np.float32), angles, device=device)


@dataclass(frozen=True)
class Volume:
    """One phantom under one condition: (rows, N, N) noisy and target slices."""

    noisy: np.ndarray
    target: np.ndarray
    seed: int
    condition: Condition


def render(seed: int, rows: int, size: int, angles: int, chosen: Sequence[Condition],
           target: str = "phantom", device: str | None = "cpu") -> list[Volume]:
    """The volumes of one phantom (seed `seed`) under each of `chosen`."""
    from workers.recon import recon

    phantom = FoamPhantom.random(rows, size, seed=seed)
    theta = np.linspace(0.0, np.pi, angles, endpoint=False)
    line_integrals = phantom.project(theta)
    if target == "phantom":
        truth = phantom.voxelize()
    elif target == "fbp":
        truth = recon(line_integrals, theta, device=device)
    else:
        raise ValueError(f"target={target!r}: choose phantom or fbp")
    # A noise stream per (phantom, condition), so adding a condition changes no other volume.
    return [Volume(low_dose_reconstruction(line_integrals, theta, condition,
                                           np.random.default_rng((seed, index)), device),
                   truth, seed, condition)
            for index, condition in enumerate(chosen)]


def _write_split(file: h5py.File, split: str, volumes: list[Volume]) -> None:
    noisy = file.create_dataset(f"{split}_ns", data=np.concatenate([v.noisy for v in volumes]))
    target = file.create_dataset(f"{split}_gt", data=np.concatenate([v.target for v in volumes]))
    rows = np.array([len(v.noisy) for v in volumes], dtype=np.int64)
    for dataset in (noisy, target):
        dataset.attrs["volume_rows"] = rows
        dataset.attrs["seeds"] = np.array([v.seed for v in volumes], dtype=np.int64)
        dataset.attrs["conditions"] = json.dumps([v.condition.label for v in volumes])
        dataset.attrs["units"] = PER_PIXEL_UNITS


def synthesize(out: str | Path, chosen: Sequence[Condition], phantoms: int = 16,
               test_phantoms: int = 2, rows: int = 16, size: int = 256, angles: int = 360,
               target: str = "phantom", seed: int = 0, progress: bool = True,
               command: str = "") -> Path:
    """Write the one-file data set to `out`: phantoms seed .. seed+phantoms-1 for training,
    the next `test_phantoms` seeds for testing, each under every condition."""
    from tqdm import tqdm

    if phantoms < 1 or test_phantoms < 1:
        raise DataError(f"phantoms={phantoms}, test_phantoms={test_phantoms}: need >= 1 each")
    if seed + phantoms + test_phantoms > EVALUATION_SEED:
        raise DataError(f"seeds {seed}..{seed + phantoms + test_phantoms - 1} reach the "
                        f"evaluation seeds ({EVALUATION_SEED} on): pick a lower --seed")
    out = Path(out)
    splits: dict[str, list[Volume]] = {"train": [], "test": []}
    seeds = [("train", seed + i) for i in range(phantoms)]
    seeds += [("test", seed + phantoms + i) for i in range(test_phantoms)]
    for split, phantom_seed in tqdm(seeds, desc="dataset", unit="phantom", disable=not progress):
        splits[split] += render(phantom_seed, rows, size, angles, chosen, target)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with h5py.File(partial, "w") as file:
        for split, volumes in splits.items():
            _write_split(file, split, volumes)
        file.attrs["description"] = (
            f"foam phantoms {size}x{size}x{rows}, {angles} views; low dose: "
            f"{'; '.join(c.label for c in chosen)}; target: {target}; train seeds "
            f"{seed}-{seed + phantoms - 1}, test seeds {seed + phantoms}-"
            f"{seed + phantoms + test_phantoms - 1}")
        file.attrs["command"] = command
    partial.replace(out)
    log.info("wrote %s: %d train and %d test slices", out,
             sum(len(v.noisy) for v in splits["train"]), sum(len(v.noisy) for v in splits["test"]))
    return out
