"""Concatenate the training sets of several one-file training data sets (`tomocast dataset`)
into one, keeping the first file's test set: how docs/model-card.md's "second stage" data
(`mix256.h5`) was made.

    PYTHONPATH=. python tools/concat_training_data.py OUT.h5 FIRST.h5 MORE.h5 [...]

Per-volume attributes of each data set (volume_rows, seeds, attenuations) are concatenated with
the slices, `families` (a JSON list) too; the others are taken from the first file.
"""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np

TRAIN, TEST = ("train_ns", "train_gt"), ("test_ns", "test_gt")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write(__doc__ or "")
        return 2
    out, *sources = argv
    files = [h5py.File(path, "r") for path in sources]
    try:
        with h5py.File(out, "x") as target:
            target.attrs["command"] = " ; ".join(str(f.attrs.get("command", "")) for f in files)
            target.attrs["description"] = " + ".join(
                str(f.attrs.get("description", "")) for f in files
            )
            for name in TRAIN:
                made = target.create_dataset(
                    name, data=np.concatenate([f[name][()] for f in files])
                )
                for key, first in files[0][name].attrs.items():
                    values = [f[name].attrs[key] for f in files]
                    if key == "families":
                        made.attrs[key] = json.dumps([f for v in values for f in json.loads(v)])
                    elif np.ndim(first) == 1:
                        made.attrs[key] = np.concatenate(values)
                    else:
                        made.attrs[key] = first
            for name in TEST:
                made = target.create_dataset(name, data=files[0][name][()])
                for key, value in files[0][name].attrs.items():
                    made.attrs[key] = value
    finally:
        for f in files:
            f.close()
    print(f"{out} written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
