"""TomoGAN's two HDF5 forms, their errors, adjacent-slice stacks and random patches."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from models.training.dataset import (
    PatchSampler,
    SlicePairs,
    load_one_file,
    load_training_data,
    load_two_files,
    validation_set,
)
from service.errors import DataError


def _slices(n: int, size: int = 16, offset: float = 0.0) -> np.ndarray:
    # Slice i is filled with i + offset, so a stack shows which slices it took.
    return (np.arange(n, dtype=np.float32)[:, None, None] + offset) * np.ones(
        (size, size), np.float32
    )


def _one_file(path: Path, skip: str | None = None, train_rows: object = None) -> Path:
    with h5py.File(path, "w") as file:
        for name, data in (
            ("train_ns", _slices(10, offset=0.5)),
            ("train_gt", _slices(10)),
            ("test_ns", _slices(4, offset=0.5)),
            ("test_gt", _slices(4)),
        ):
            if name != skip:
                dataset = file.create_dataset(name, data=data)
                if train_rows is not None and name.startswith("train"):
                    dataset.attrs["volume_rows"] = train_rows
    return path


def _images(path: Path, data: np.ndarray, name: str = "images") -> Path:
    with h5py.File(path, "w") as file:
        file.create_dataset(name, data=data)
    return path


def test_one_file_form(tmp_path: Path) -> None:
    data = load_one_file(_one_file(tmp_path / "d.h5"))
    assert data.train.shape == (10, 16, 16) and data.test.shape == (4, 16, 16)
    assert data.train.volume_rows == (10,)
    assert "d.h5" in data.source and "10 train / 4 test" in data.source
    low, high = np.percentile(_slices(10), [0.5, 99.5])
    assert (data.input_offset, data.input_scale) == pytest.approx((low, high - low))


def test_two_file_form_holds_out_the_last_slices(tmp_path: Path) -> None:
    low = _images(tmp_path / "low.h5", _slices(20, offset=0.5))
    normal = _images(tmp_path / "normal.h5", _slices(20))
    data = load_training_data(low_dose=low, normal_dose=normal)
    assert data.train.shape[0] == 18 and data.test.shape[0] == 2
    np.testing.assert_array_equal(data.test.target[:, 0, 0], [18, 19])


@pytest.mark.parametrize("missing", ["train_ns", "train_gt", "test_ns", "test_gt"])
def test_one_file_names_the_missing_dataset(tmp_path: Path, missing: str) -> None:
    path = _one_file(tmp_path / "d.h5", skip=missing)
    with pytest.raises(DataError, match=f"no data set '{missing}'"):
        load_one_file(path)


def test_two_files_name_the_missing_dataset_and_file(tmp_path: Path) -> None:
    low = _images(tmp_path / "low.h5", _slices(20), name="data")
    normal = _images(tmp_path / "normal.h5", _slices(20))
    with pytest.raises(DataError, match=r"low\.h5 has no data set 'images'.*holds data"):
        load_two_files(low, normal)
    with pytest.raises(DataError, match=r"nowhere\.h5 does not exist"):
        load_two_files(tmp_path / "nowhere.h5", normal)


def test_refuses_files_that_are_not_hdf5_or_do_not_match(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        load_one_file(text)
    low = _images(tmp_path / "low.h5", _slices(20))
    normal = _images(tmp_path / "normal.h5", _slices(19))
    with pytest.raises(DataError, match="differ in shape"):
        load_two_files(low, normal)
    flat = _images(tmp_path / "flat.h5", np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match=r"must be \(N, H, W\)"):
        load_two_files(flat, flat)


def test_refuses_ambiguous_or_missing_choice(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="either --data"):
        load_training_data(tmp_path / "a.h5", low_dose=tmp_path / "b.h5")
    with pytest.raises(DataError, match="-ld"):
        load_training_data(low_dose=tmp_path / "b.h5")


def test_stack_replicates_edges_within_each_volume() -> None:
    pairs = SlicePairs(_slices(7), _slices(7), volume_rows=(3, 4))
    stack = pairs.stack(np.array([0, 2, 3, 6]), depth=3)[:, :, 0, 0]
    np.testing.assert_array_equal(stack, [[0, 0, 1], [1, 2, 2], [3, 3, 4], [5, 6, 6]])
    with pytest.raises(DataError, match="does not add up"):
        SlicePairs(_slices(7), _slices(7), volume_rows=(3, 3))


def test_volume_rows_attribute_is_read(tmp_path: Path) -> None:
    data = load_one_file(_one_file(tmp_path / "d.h5", train_rows=[5, 5]))
    assert data.train.volume_rows == (5, 5)
    with pytest.raises(DataError, match=r"d2\.h5:train_ns: volume_rows=\(5, 4\)"):
        load_one_file(_one_file(tmp_path / "d2.h5", train_rows=[5, 4]))


def test_patches_pair_input_centre_with_target() -> None:
    rng = np.random.default_rng(0)
    noisy = rng.random((6, 20, 24), dtype=np.float32)
    pairs = SlicePairs(noisy, noisy * 2, volume_rows=(6,))
    inputs, targets = PatchSampler(pairs, depth=3, patch=8, rng=rng).batch(16)
    assert inputs.shape == (16, 3, 8, 8) and targets.shape == (16, 1, 8, 8)
    assert inputs.dtype == targets.dtype == np.float32
    # Augmentation flips input and target alike: the target is still twice the centre slice.
    np.testing.assert_allclose(targets[:, 0], 2 * inputs[:, 1], rtol=1e-6)


def test_patches_are_deterministic_per_seed() -> None:
    pairs = SlicePairs(_slices(6, 32), _slices(6, 32), volume_rows=(6,))
    first = PatchSampler(pairs, 3, 16, np.random.default_rng(5)).batch(4)
    second = PatchSampler(pairs, 3, 16, np.random.default_rng(5)).batch(4)
    np.testing.assert_array_equal(first[0], second[0])


def test_patch_larger_than_slices_is_refused() -> None:
    pairs = SlicePairs(_slices(4), _slices(4), volume_rows=(4,))
    with pytest.raises(DataError, match="patch=32 is larger"):
        PatchSampler(pairs, 3, 32, np.random.default_rng(0))


def test_validation_set_is_evenly_spaced_whole_slices() -> None:
    pairs = SlicePairs(_slices(9), _slices(9), volume_rows=(9,))
    inputs, targets = validation_set(pairs, depth=3, count=3)
    assert inputs.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(targets[:, 0, 0, 0], [0, 4, 8])
