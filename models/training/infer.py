"""`tomocast infer`: denoise the slices of an HDF5 file with a model artifact, as TomoGAN's
infer.py does: read the noisy slices, write `ns` (input), `dn` (denoised) and, when targets are
at hand, `gt`, all (N, H, W) float32.

Input: the one-file form's `test_ns` (with `test_gt` as the targets), else a data set `images`
(the two-file form; `-nd FILE` gives the targets), else the file's only 3-D data set; `--dataset`
picks one by name. Slices are denoised with their `depth` neighbours as the service does
(`workers.denoise`), each stacked volume (attribute `volume_rows`) on its own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from service.errors import DataError

if TYPE_CHECKING:
    from workers.denoise import DenoiseEngine

PREFERRED = ("test_ns", "images")
TARGET_FOR = {"test_ns": "test_gt", "train_ns": "train_gt"}


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path} is not a readable HDF5 file ({exc})") from exc


def _volumes(file: h5py.File, path: Path, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    if name not in file or not isinstance(file[name], h5py.Dataset):
        present = ", ".join(sorted(file.keys())) or "nothing"
        raise DataError(f"{path} has no data set '{name}' (it holds {present})")
    dataset = file[name]
    if dataset.ndim != 3:
        raise DataError(f"{path}:{name} must be (N, H, W) slices, got shape {dataset.shape}")
    images = dataset[()].astype(np.float32, copy=False)
    return images, tuple(int(r) for r in dataset.attrs.get("volume_rows", (len(images),)))


def read_noisy(
    path: Path, dataset: str | None = None
) -> tuple[np.ndarray, tuple[int, ...], np.ndarray | None, str]:
    """(slices, volume_rows, targets or None, data set name) from `path`."""
    with _open(path) as file:
        if dataset is None:
            found = [name for name in PREFERRED if name in file]
            cubes = [
                name
                for name, item in file.items()
                if isinstance(item, h5py.Dataset) and item.ndim == 3
            ]
            if found:
                dataset = found[0]
            elif len(cubes) == 1:
                dataset = cubes[0]
            else:
                raise DataError(
                    f"{path}: no data set {' or '.join(PREFERRED)} and "
                    f"{len(cubes)} 3-D data sets ({', '.join(cubes)}): name one "
                    "with --dataset"
                )
        noisy, rows = _volumes(file, path, dataset)
        target_name = TARGET_FOR.get(dataset)
        target = None
        if target_name is not None and target_name in file:
            target, _ = _volumes(file, path, target_name)
    return noisy, rows, target, dataset


def denoise_volumes(
    engine: DenoiseEngine,
    noisy: np.ndarray,
    volume_rows: tuple[int, ...],
    batch: int = 8,
    progress: bool = True,
) -> np.ndarray:
    """Denoise every slice of `noisy`, each stacked volume on its own with one intensity factor
    (`DenoiseEngine.scale_for` of the whole volume), as the service does per scan."""
    from tqdm import tqdm

    from workers.denoise import adjacent_stack

    out = np.empty_like(noisy)
    with tqdm(
        total=len(noisy), desc=f"denoise {engine.name}", unit="slice", disable=not progress
    ) as bar:
        first = 0
        for rows in volume_rows:
            volume = torch.from_numpy(noisy[first : first + rows]).to(engine.device)
            factor = engine.scale_for(volume)
            for start in range(0, rows, batch):
                stop = min(rows, start + batch)
                stack = adjacent_stack(volume, start, stop, engine.depth)
                out[first + start : first + stop] = (
                    engine.denoise(stack, scale=factor).cpu().numpy()
                )
                bar.update(stop - start)
            first += rows
    return out


def infer_file(
    low_dose: str | Path,
    out: str | Path,
    model: str | Path | None = None,
    normal_dose: str | Path | None = None,
    dataset: str | None = None,
    device: str = "cpu",
    batch: int = 8,
    progress: bool = True,
    field_width: int | None = None,
) -> str:
    """Denoise `low_dose` into `out`; returns a one-line report (with PSNR/SSIM when targets
    are known). `field_width`: see `workers.denoise.DenoiseEngine`."""
    from models.training.metrics import psnr, ssim
    from workers.denoise import load_denoiser

    low_dose, out = Path(low_dose), Path(out)
    noisy, rows, target, name = read_noisy(low_dose, dataset)
    if normal_dose is not None:
        target, _, _, _ = read_noisy(Path(normal_dose), dataset or "images")
        if target.shape != noisy.shape:
            raise DataError(f"{normal_dose} holds {target.shape} slices, {low_dose} {noisy.shape}")
    engine = load_denoiser(model, device, field_width=field_width)
    started = time.perf_counter()
    denoised = denoise_volumes(engine, noisy, rows, batch, progress)
    seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as file:
        for key, value in (("ns", noisy), ("dn", denoised), ("gt", target)):
            if value is not None:
                file.create_dataset(key, data=value, dtype=np.float32).attrs["volume_rows"] = rows
        file.attrs["model"] = engine.name
        file.attrs["source"] = f"{low_dose}:{name}"
    report = (
        f"denoised {len(noisy)} slices of {low_dose}:{name} with {engine.name} in "
        f"{seconds:.1f} s -> {out}"
    )
    if target is not None:
        data_range = float(target.max() - target.min()) or 1.0
        scores = {}
        for label, images in (("ns", noisy), ("dn", denoised)):
            a, b = torch.from_numpy(images), torch.from_numpy(target)
            scores[label] = (
                float(psnr(a, b, data_range).mean()),
                float(ssim(a, b, data_range).mean()),
            )
        report += (
            f"; PSNR {scores['ns'][0]:.2f} -> {scores['dn'][0]:.2f} dB, SSIM "
            f"{scores['ns'][1]:.4f} -> {scores['dn'][1]:.4f}"
        )
    return report
