"""`tomocast dataset`: training pairs from simulated foam scans, in TomoGAN's one-file form.

Each phantom is a `workers.phantom.FoamPhantom` (`rows` slices of `size` x `size`, seed
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
from pathlib import Path

import h5py
import numpy as np

from models.training.dataset import PER_PIXEL_UNITS
from service.errors import DataError
from workers.lowdose import EVALUATION_SEED, Condition, Volume, render

log = logging.getLogger(__name__)


def conditions(
    sparse: Iterable[int] = (), photons: Iterable[float] = (), combined: bool = False
) -> list[Condition]:
    """Sparse-view conditions, then photon-limited ones (all views); with `combined` also
    every sparse x photons pair."""
    sparse, photons = list(sparse), [float(p) for p in photons]
    out = [Condition(sparse=k) for k in sparse] + [Condition(photons=p) for p in photons]
    if combined:
        out += [Condition(k, p) for k in sparse for p in photons]
    if not out:
        raise ValueError("no low-dose condition: give sparse factors and/or photon counts")
    return out


def _write_split(file: h5py.File, split: str, volumes: list[Volume]) -> None:
    noisy = file.create_dataset(f"{split}_ns", data=np.concatenate([v.noisy for v in volumes]))
    target = file.create_dataset(f"{split}_gt", data=np.concatenate([v.target for v in volumes]))
    rows = np.array([len(v.noisy) for v in volumes], dtype=np.int64)
    for dataset in (noisy, target):
        dataset.attrs["volume_rows"] = rows
        dataset.attrs["seeds"] = np.array([v.seed for v in volumes], dtype=np.int64)
        dataset.attrs["conditions"] = json.dumps([v.condition.label for v in volumes])
        dataset.attrs["units"] = PER_PIXEL_UNITS


def synthesize(
    out: str | Path,
    chosen: Sequence[Condition],
    phantoms: int = 16,
    test_phantoms: int = 2,
    rows: int = 16,
    size: int = 256,
    angles: int = 360,
    target: str = "phantom",
    seed: int = 0,
    progress: bool = True,
    command: str = "",
) -> Path:
    """Write the one-file data set to `out`: phantoms seed .. seed+phantoms-1 for training,
    the next `test_phantoms` seeds for testing, each under every condition."""
    from tqdm import tqdm

    if phantoms < 1 or test_phantoms < 1:
        raise DataError(f"phantoms={phantoms}, test_phantoms={test_phantoms}: need >= 1 each")
    if seed + phantoms + test_phantoms > EVALUATION_SEED:
        raise DataError(
            f"seeds {seed}..{seed + phantoms + test_phantoms - 1} reach the "
            f"evaluation seeds ({EVALUATION_SEED} on): pick a lower --seed"
        )
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
            f"{seed + phantoms + test_phantoms - 1}"
        )
        file.attrs["command"] = command
    partial.replace(out)
    log.info(
        "wrote %s: %d train and %d test slices",
        out,
        sum(len(v.noisy) for v in splits["train"]),
        sum(len(v.noisy) for v in splits["test"]),
    )
    return out
