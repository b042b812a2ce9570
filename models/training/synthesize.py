"""`tomocast dataset`: training pairs from simulated scans, in TomoGAN's one-file form.

Phantom i (seed `seed + i`, `rows` slices of `size` x `size`) is of family
`families[i % len(families)]` (`workers.phantoms.FAMILIES`; never `HELD_OUT` unless asked
explicitly), at an attenuation drawn log-uniformly from `attenuation` = (low, high) (default
(1, 1): each family's own), projected analytically at `angles` views over [0, pi). Its low-dose
versions are the FBP (`workers.recon.recon`) of

- sparse views: every k-th projection (k = 2 ... 32: 1/k of the angles), and/or
- photon-limited projections: counts ~ Poisson(photons * exp(-p)) per detector pixel, back to
  line integrals by -log(max(counts, 1) / photons) (a count of 0 would be infinite attenuation),

optionally with detector effects (`workers.lowdose.Condition`: dark current, scintillator blur,
rings, zingers, centre errors; `with_effects`), each condition a separate volume of the same
phantom. With every option at its default but `families=("foam",)` the data set is the one
`tomocast dataset` wrote before families and effects existed, number for number. The target is
the voxelised phantom (attenuation per pixel, the service's units) or, with `target="fbp"`, the
noise-free FBP of all `angles` views. Test phantoms take the seeds after the training ones;
`tomocast evaluate` uses seeds from EVALUATION_SEED on, which no default data set reaches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from models.training.dataset import PER_PIXEL_UNITS
from service.errors import DataError
from workers.lowdose import EVALUATION_SEED, Condition, Volume, render
from workers.phantoms import FAMILIES, HELD_OUT, TRAINING_FAMILIES

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


EFFECTS = ("dark", "blur", "rings", "zingers", "center_error")


def with_effects(
    chosen: Sequence[Condition], effects: dict[str, float], alone: bool = False
) -> list[Condition]:
    """`chosen`, then each of them with every effect in `effects` (name -> strength, names from
    `EFFECTS`) at once, and with `alone` also with each effect on its own (dark current only
    where the condition counts photons)."""
    unknown = sorted(set(effects) - set(EFFECTS))
    if unknown:
        raise ValueError(f"unknown effect(s) {', '.join(unknown)}: choose from {EFFECTS}")
    active = {name: value for name, value in effects.items() if value}
    if not active:
        return list(chosen)
    out = list(chosen)
    for base in chosen:
        usable = {k: v for k, v in active.items() if k != "dark" or base.photons is not None}
        if usable:
            out.append(replace(base, **usable))  # type: ignore[arg-type]
        if alone and len(usable) > 1:
            out += [
                replace(base, **{name: value})  # type: ignore[arg-type]
                for name, value in usable.items()
            ]
    return out


def check_families(families: Sequence[str], allow_held_out: bool = False) -> tuple[str, ...]:
    """`families` checked: known names, and the held-out family only with `allow_held_out`."""
    if not families:
        raise DataError("no phantom family: name at least one")
    for family in families:
        if family not in FAMILIES:
            raise DataError(f"family {family!r}: choose from {', '.join(FAMILIES)}")
    if HELD_OUT in families and not allow_held_out:
        raise DataError(
            f"family {HELD_OUT!r} is held out of training (evaluation scores it to show "
            "generalisation honestly): leave it out, or pass --allow-held-out for data that "
            "will never train a shipped model"
        )
    return tuple(families)


def attenuation_for(phantom_seed: int, attenuation: tuple[float, float]) -> float:
    """Phantom `phantom_seed`'s attenuation, log-uniform in [low, high] (exactly low when
    low == high), from its own random stream."""
    low, high = attenuation
    if not 0 < low <= high:
        raise DataError(f"attenuation=({low}, {high}): need 0 < low <= high")
    if low == high:
        return low
    draw = np.random.default_rng((phantom_seed, 0xA77E)).random()
    return float(np.exp(np.log(low) + draw * (np.log(high) - np.log(low))))


def _write_split(file: h5py.File, split: str, volumes: list[Volume]) -> None:
    noisy = file.create_dataset(f"{split}_ns", data=np.concatenate([v.noisy for v in volumes]))
    target = file.create_dataset(f"{split}_gt", data=np.concatenate([v.target for v in volumes]))
    rows = np.array([len(v.noisy) for v in volumes], dtype=np.int64)
    for dataset in (noisy, target):
        dataset.attrs["volume_rows"] = rows
        dataset.attrs["seeds"] = np.array([v.seed for v in volumes], dtype=np.int64)
        dataset.attrs["conditions"] = json.dumps([v.condition.label for v in volumes])
        if any(v.family != "foam" or v.attenuation != 1.0 for v in volumes):
            dataset.attrs["families"] = json.dumps([v.family for v in volumes])
            dataset.attrs["attenuations"] = np.array([v.attenuation for v in volumes])
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
    families: Sequence[str] = TRAINING_FAMILIES,
    attenuation: tuple[float, float] = (1.0, 1.0),
    allow_held_out: bool = False,
) -> Path:
    """Write the one-file data set to `out`: phantoms seed .. seed+phantoms-1 for training,
    the next `test_phantoms` seeds for testing, each under every condition; phantom i of family
    families[i % len(families)] at `attenuation_for` its seed. DataError for the held-out
    family unless `allow_held_out`."""
    from tqdm import tqdm

    if phantoms < 1 or test_phantoms < 1:
        raise DataError(f"phantoms={phantoms}, test_phantoms={test_phantoms}: need >= 1 each")
    if seed + phantoms + test_phantoms > EVALUATION_SEED:
        raise DataError(
            f"seeds {seed}..{seed + phantoms + test_phantoms - 1} reach the "
            f"evaluation seeds ({EVALUATION_SEED} on): pick a lower --seed"
        )
    families = check_families(families, allow_held_out)
    attenuation_for(seed, attenuation)  # checks the range before any work
    out = Path(out)
    splits: dict[str, list[Volume]] = {"train": [], "test": []}
    seeds = [("train", seed + i) for i in range(phantoms)]
    seeds += [("test", seed + phantoms + i) for i in range(test_phantoms)]
    for index, (split, phantom_seed) in enumerate(
        tqdm(seeds, desc="dataset", unit="phantom", disable=not progress)
    ):
        family = families[index % len(families)]
        scale = attenuation_for(phantom_seed, attenuation)
        splits[split] += render(
            phantom_seed, rows, size, angles, chosen, target, family=family, attenuation=scale
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with h5py.File(partial, "w") as file:
        for split, volumes in splits.items():
            _write_split(file, split, volumes)
        spread = (
            ""
            if attenuation == (1.0, 1.0)
            else (f", attenuation {attenuation[0]:g}-{attenuation[1]:g}x (log-uniform)")
        )
        file.attrs["description"] = (
            f"{'+'.join(families)} phantoms {size}x{size}x{rows}{spread}, {angles} views; "
            "low dose: "
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
