"""Where the noise-free FBP of a phantom departs from it: PSNR inside the field of view (the
circle of diameter N every angle crosses), outside it (the slice's corners) and over the whole
slice; the figures behind the field-of-view targets of `models.training.selfsupervised`.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/fov_split.py --family cells --seed 1000000

Data range = the phantom's; 360 views, no noise, direct FBP (`workers.recon.recon`), means over
the rows' squared errors.
"""

from __future__ import annotations

import argparse

import numpy as np

from workers.phantoms import make_phantom
from workers.recon import recon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="cells")
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--angles", type=int, default=360)
    args = parser.parse_args()
    phantom = make_phantom(args.family, args.rows, args.size, seed=args.seed)
    theta = np.linspace(0.0, np.pi, args.angles, endpoint=False)
    truth = phantom.voxelize()
    fbp = recon(phantom.project(theta), theta, method="direct")
    span = float(truth.max() - truth.min())
    centre = (args.size - 1) / 2
    rows, cols = np.mgrid[: args.size, : args.size]
    inside = np.hypot(rows - centre, cols - centre) <= args.size / 2
    for name, where in (("whole slice", np.ones_like(inside)), ("inside", inside)):
        mse = float(((fbp - truth)[:, where] ** 2).mean())
        print(f"{name:12s} PSNR {10 * np.log10(span**2 / mse):6.2f} dB")
    mse = float(((fbp - truth)[:, ~inside] ** 2).mean())
    print(f"{'outside':12s} PSNR {10 * np.log10(span**2 / mse):6.2f} dB")


if __name__ == "__main__":
    main()
