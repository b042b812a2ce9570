"""Training data in TomoGAN's HDF5 forms, and random adjacent-slice patches drawn from it.

Two forms, as the original TomoGAN code reads them:

- one file (`--data FILE`, TomoGAN's `-dsfn`): data sets `train_ns`, `train_gt`, `test_ns`,
  `test_gt`, each (N, H, W): noisy (low-dose) reconstructions and their targets, slice for slice.
- two files (`-ld low-dose.h5 -nd normal-dose.h5`, the talk's `train.py` call): data set `images`
  (N, H, W) in each. The last `test_fraction` of the slices (a contiguous block, so no test slice
  is a neighbour of a training slice) is held out for validation.

A data set may carry the attribute `volume_rows`: the number of slices of each volume stacked in
it (`tomocast dataset` writes it), so adjacent-slice stacks never reach across two samples;
without it the stack is one volume. A sample is the `depth` slices around a centre slice as
channels (edge slices replicated, as `workers.denoise.adjacent_stack` does in the service) and
the target's centre slice.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from service.errors import DataError

ONE_FILE_DATASETS = ("train_ns", "train_gt", "test_ns", "test_gt")
TWO_FILE_DATASET = "images"
# The `units` attribute of slices whose values scale with the pixel size (what the service
# reconstructs and `tomocast dataset` writes).
PER_PIXEL_UNITS = "attenuation per pixel"
# Normalisation percentiles: robust to a few hot pixels, and for a foam exactly (0, mu).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


@dataclass(frozen=True)
class SlicePairs:
    """Noisy slices and their targets, (N, H, W) float32 each, in `volumes` stacked volumes.

    Plain data: read it from any thread, never write to it.
    """

    noisy: np.ndarray
    target: np.ndarray
    volume_rows: tuple[int, ...]

    def __post_init__(self) -> None:
        if sum(self.volume_rows) != len(self.noisy) or min(self.volume_rows, default=1) < 1:
            raise DataError(
                f"volume_rows={self.volume_rows} does not add up to the {len(self.noisy)} slices"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        n, h, w = self.noisy.shape
        return n, h, w

    def stack(self, centres: np.ndarray, depth: int) -> np.ndarray:
        """(len(centres), depth, H, W) noisy slices around each centre, edges replicated
        within the centre's own volume."""
        starts = np.cumsum((0, *self.volume_rows))
        volume = np.searchsorted(starts, centres, side="right") - 1
        lo, hi = starts[volume], starts[volume + 1] - 1
        offsets = np.arange(depth) - depth // 2
        index = np.clip(centres[:, None] + offsets[None, :], lo[:, None], hi[:, None])
        return self.noisy[index]


@dataclass(frozen=True)
class TrainingData:
    """The train and test pairs of one data set, and how to normalise them."""

    train: SlicePairs
    test: SlicePairs
    source: str  # what the data set is, in words (goes into the model metadata)
    input_offset: float
    input_scale: float
    # The noisy slices declare attenuation per pixel (HDF5 attribute units = PER_PIXEL_UNITS).
    per_pixel_units: bool = False

    @property
    def reference_width(self) -> int | None:
        """The slice width the normalisation is fitted at (`ModelMetadata.reference_width`), for
        data in attenuation per pixel, whose values scale with the pixel size; None (absolute
        normalisation) for data in other or unknown units."""
        return int(self.train.shape[2]) if self.per_pixel_units else None

    @property
    def reference_level(self) -> float | None:
        """The median intensity level (`workers.intensity`) of the training volumes' noisy
        slices: the level the network is trained at (`ModelMetadata.reference_level`, which the
        denoise engine maps each scan to); None when every volume is zero."""
        import torch

        from workers.intensity import intensity_level

        starts = np.cumsum((0, *self.train.volume_rows))
        levels = [
            intensity_level(torch.from_numpy(self.train.noisy[first:last]))
            for first, last in itertools.pairwise(starts)
        ]
        positive = [level for level in levels if level > 0]
        return float(np.median(positive)) if positive else None


def level_normalised(data: TrainingData) -> TrainingData:
    """`data` with each volume (noisy and target alike) divided by its factor, the volume's
    intensity level over the training volumes' median (`TrainingData.reference_level`): what
    the denoise engine does to each scan (`workers.denoise.DenoiseEngine.scale_for`), so that
    a data set spanning decades of attenuation trains the network at one level. Offset and
    scale are fitted again on the rescaled targets; `source` is kept (resuming checks it)."""
    import torch

    from workers.intensity import intensity_level

    level = data.reference_level
    if level is None:
        return data

    def rescaled(pairs: SlicePairs) -> SlicePairs:
        noisy, target = pairs.noisy.copy(), pairs.target.copy()
        starts = np.cumsum((0, *pairs.volume_rows))
        for first, last in itertools.pairwise(starts):
            measured = intensity_level(torch.from_numpy(noisy[first:last]))
            if measured > 0:
                noisy[first:last] *= level / measured
                target[first:last] *= level / measured
        return SlicePairs(noisy, target, pairs.volume_rows)

    train = rescaled(data.train)
    offset, scale = normalisation(train.target)
    return TrainingData(
        train, rescaled(data.test), data.source, offset, scale, data.per_pixel_units
    )


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path} is not a readable HDF5 file ({exc})") from exc


def _read(file: h5py.File, path: Path, name: str, form: str) -> tuple[np.ndarray, tuple[int, ...]]:
    if name not in file:
        present = ", ".join(sorted(file.keys())) or "nothing"
        raise DataError(
            f"{path} has no data set '{name}' ({form} needs it; the file holds {present})"
        )
    dataset = file[name]
    if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 3:
        shape = getattr(dataset, "shape", "a group")
        raise DataError(f"{path}:{name} must be (N, H, W) slices, got {shape}")
    images = dataset[()].astype(np.float32, copy=False)
    rows = tuple(int(r) for r in np.atleast_1d(dataset.attrs.get("volume_rows", len(images))))
    if sum(rows) != len(images) or min(rows) < 1:
        raise DataError(
            f"{path}:{name}: volume_rows={rows} does not add up to its {len(images)} slices"
        )
    return images, rows


def _per_pixel(file: h5py.File, name: str) -> bool:
    """Whether data set `name` declares attenuation per pixel (`tomocast dataset` does)."""
    units = file[name].attrs.get("units", "")
    return (units.decode() if isinstance(units, bytes) else str(units)) == PER_PIXEL_UNITS


def _pairs(noisy: np.ndarray, target: np.ndarray, rows: tuple[int, ...], what: str) -> SlicePairs:
    if noisy.shape != target.shape:
        raise DataError(
            f"{what}: noisy slices {noisy.shape} and targets {target.shape} differ in shape"
        )
    if len(noisy) == 0:
        raise DataError(f"{what}: no slices")
    return SlicePairs(noisy, target, rows)


def normalisation(target: np.ndarray) -> tuple[float, float]:
    """(offset, scale) mapping the targets' robust range to [0, 1]."""
    low, high = np.percentile(target, (LOW_PERCENTILE, HIGH_PERCENTILE))
    scale = float(high - low)
    return float(low), scale if scale > 0 else 1.0


def load_one_file(path: str | Path) -> TrainingData:
    """The one-file form: `train_ns`, `train_gt`, `test_ns`, `test_gt`."""
    path = Path(path)
    form = "the one-file form (--data)"
    with _open(path) as file:
        arrays = {name: _read(file, path, name, form) for name in ONE_FILE_DATASETS}
        described = str(file.attrs.get("description", ""))
        per_pixel = _per_pixel(file, "train_ns")
    (train_ns, rows), (train_gt, _) = arrays["train_ns"], arrays["train_gt"]
    (test_ns, test_rows), (test_gt, _) = arrays["test_ns"], arrays["test_gt"]
    train = _pairs(train_ns, train_gt, rows, f"{path} train_ns/train_gt")
    test = _pairs(test_ns, test_gt, test_rows, f"{path} test_ns/test_gt")
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"{path}: train slices are {train.shape[1:]}, test slices {test.shape[1:]}")
    offset, scale = normalisation(train.target)
    source = (
        f"{path.name}: {train.shape[0]} train / {test.shape[0]} test slices of "
        f"{train.shape[1]}x{train.shape[2]}" + (f" ({described})" if described else "")
    )
    return TrainingData(train, test, source, offset, scale, per_pixel)


def load_two_files(
    low_dose: str | Path, normal_dose: str | Path, test_fraction: float = 0.1
) -> TrainingData:
    """The two-file form: `images` in each; the last `test_fraction` of slices is the test set."""
    low_dose, normal_dose = Path(low_dose), Path(normal_dose)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    with _open(low_dose) as file:
        noisy, rows = _read(file, low_dose, TWO_FILE_DATASET, "the low-dose file (-ld)")
        per_pixel = _per_pixel(file, TWO_FILE_DATASET)
    with _open(normal_dose) as file:
        target, _ = _read(file, normal_dose, TWO_FILE_DATASET, "the normal-dose file (-nd)")
    _pairs(noisy, target, rows, f"{low_dose} vs {normal_dose}")
    n = len(noisy)
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 1:
        raise DataError(f"{low_dose}: {n} slice(s) are too few to hold out a test set")
    train_rows: tuple[int, ...]
    test_rows: tuple[int, ...]
    if rows == (n,):
        train_rows, test_rows = (n - n_test,), (n_test,)
    else:
        train_rows, test_rows = _split_rows(rows, n - n_test)
    train = SlicePairs(noisy[: n - n_test], target[: n - n_test], train_rows)
    test = SlicePairs(noisy[n - n_test :], target[n - n_test :], test_rows)
    offset, scale = normalisation(train.target)
    source = (
        f"{low_dose.name} / {normal_dose.name}: {n - n_test} train / {n_test} test slices "
        f"of {noisy.shape[1]}x{noisy.shape[2]}"
    )
    return TrainingData(train, test, source, offset, scale, per_pixel)


def _split_rows(rows: tuple[int, ...], at: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    before: list[int] = []
    after: list[int] = []
    seen = 0
    for count in rows:
        cut = min(max(at - seen, 0), count)
        if cut:
            before.append(cut)
        if count - cut:
            after.append(count - cut)
        seen += count
    return tuple(before), tuple(after)


def load_training_data(
    data: str | Path | None = None,
    low_dose: str | Path | None = None,
    normal_dose: str | Path | None = None,
) -> TrainingData:
    """Either form, as the command line names it; DataError when the choice is unclear."""
    if data is not None and (low_dose is not None or normal_dose is not None):
        raise DataError("give either --data FILE or -ld/-nd FILES, not both")
    if data is not None:
        return load_one_file(data)
    if low_dose is None or normal_dose is None:
        raise DataError(
            "training data: give --data FILE (train_ns/train_gt/test_ns/test_gt) "
            "or both -ld LOW_DOSE.h5 and -nd NORMAL_DOSE.h5 (data set 'images')"
        )
    return load_two_files(low_dose, normal_dose)


class PatchSampler:
    """Random (depth, patch, patch) input / (1, patch, patch) target pairs, with random flips
    and transposes (the parallel-beam geometry has no preferred handedness).

    Threading: owns its random generator; use from one thread.
    """

    def __init__(
        self,
        pairs: SlicePairs,
        depth: int,
        patch: int,
        rng: np.random.Generator,
        augment: bool = True,
    ) -> None:
        _, height, width = pairs.shape
        if patch > min(height, width):
            raise DataError(
                f"patch={patch} is larger than the {height}x{width} slices: lower --patch"
            )
        self.pairs, self.depth, self.patch, self.rng, self.augment = (
            pairs,
            depth,
            patch,
            rng,
            augment,
        )

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(size, depth, patch, patch) inputs and (size, 1, patch, patch) targets, float32."""
        n, height, width = self.pairs.shape
        p = self.patch
        centres = self.rng.integers(0, n, size)
        top = self.rng.integers(0, height - p + 1, size)
        left = self.rng.integers(0, width - p + 1, size)
        stacks = self.pairs.stack(centres, self.depth)
        rows = top[:, None] + np.arange(p)
        cols = left[:, None] + np.arange(p)
        sample = np.arange(size)[:, None, None, None]
        inputs = stacks[
            sample,
            np.arange(self.depth)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
        targets = self.pairs.target[centres[:, None, None], rows[:, :, None], cols[:, None, :]]
        targets = targets[:, None]
        if self.augment:
            flips = self.rng.integers(0, 2, (size, 3)).astype(bool)
            for i in range(size):
                inputs[i], targets[i] = _augment(inputs[i], targets[i], flips[i])
        return (
            np.ascontiguousarray(inputs, dtype=np.float32),
            np.ascontiguousarray(targets, dtype=np.float32),
        )


def _augment(
    inputs: np.ndarray, target: np.ndarray, flips: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if flips[0]:
        inputs, target = inputs[:, ::-1], target[:, ::-1]
    if flips[1]:
        inputs, target = inputs[:, :, ::-1], target[:, :, ::-1]
    if flips[2]:
        inputs, target = inputs.transpose(0, 2, 1), target.transpose(0, 2, 1)
    return inputs, target


def validation_set(pairs: SlicePairs, depth: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` evenly spaced whole test slices: (n, depth, H, W) inputs, (n, 1, H, W)
    targets. Fixed, so validation figures of different steps and runs compare."""
    n = pairs.shape[0]
    centres = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    return pairs.stack(centres, depth), pairs.target[centres][:, None]
