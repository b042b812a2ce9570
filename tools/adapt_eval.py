"""The figures of docs/adaptation.md: a simulated scan, and the scores of denoisers on it.

python tools/adapt_eval.py scan --family cells --photons 200 --seed 1000000 --out DIR
    writes DIR/scan.h5 (DXchange, line integrals) and DIR/truth.h5 (the phantom's voxels)
python tools/adapt_eval.py score DIR --model A.pt --model B.pt
    the full scan's FBP (as the service reconstructs it), each model run as the engine runs
    it (CPU fp32, one factor for the scan), scored against the phantom: PSNR and SSIM (data
    range = the phantom's), detail SNR (models.training.metrics.detail_snr); means over rows;
    --blend FRAC also scores the last model inside its own output's support (smoothed, above
    FRAC of its maximum) with the first model outside it (an experiment: docs/adaptation.md)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from models.training.metrics import DETAIL_SIGMA, SUPPORT_FRACTION, detail_snr, psnr, ssim
from models.training.selfsupervised import read_scan
from workers.denoise import adjacent_stack, load_denoiser
from workers.lowdose import Condition, render, render_measured
from workers.recon import recon


def make_scan(args: argparse.Namespace) -> int:
    """The scan `tomocast evaluate` scores at (family, seed, photons): the same phantom and
    noise draw (its conditions in its order: 1/8, 1/16 views, 1,000, 200 photons), written as
    a DXchange file of line integrals (no flats: `read_dxchange` takes them as corrected)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [Condition(sparse=8), Condition(sparse=16)]
    chosen += [Condition(photons=p) for p in (1000.0, 200.0)]
    if args.photons not in (1000.0, 200.0):
        chosen.append(Condition(photons=args.photons))
    measured = render_measured(
        args.seed, args.rows, args.cols, args.angles, chosen, family=args.family
    )
    scan = next(m for m in measured if m.photons == args.photons)
    with h5py.File(out / "scan.h5", "w") as f:
        f.create_dataset("implements", data="exchange")
        exchange = f.create_group("exchange")
        exchange.create_dataset("data", data=scan.sinogram)
        exchange.create_dataset("theta", data=np.degrees(scan.theta)).attrs["units"] = "degrees"
        exchange.attrs["scan_id"] = f"{args.family}-{args.seed}-{args.photons:g}"
        exchange.attrs["center"] = scan.center
    # What Noise2Inverse learns to predict at best: the noise-free FBP of all the views.
    (clean,) = render(
        args.seed, args.rows, args.cols, args.angles, [Condition()], "fbp", family=args.family
    )
    with h5py.File(out / "truth.h5", "w") as f:
        f.create_dataset("truth/volume", data=scan.volume.target)
        f.create_dataset("truth/fbp", data=clean.noisy)
    sys.stdout.write(f"{out / 'scan.h5'} {out / 'truth.h5'}\n")
    return 0


def interior(truth: np.ndarray) -> np.ndarray:
    """The sample's inside as detail_snr takes it: the truth's support (values above
    SUPPORT_FRACTION of its peak), eroded by 2 DETAIL_SIGMA px."""
    t = torch.from_numpy(truth)[:, None].double()
    outside = (t.abs() <= SUPPORT_FRACTION * t.abs().amax()).double()
    margin = int(np.ceil(2 * DETAIL_SIGMA))
    grown = F.max_pool2d(outside, 2 * margin + 1, stride=1, padding=margin)
    return (grown[:, 0] == 0).numpy()


def scores(image: np.ndarray, truth: np.ndarray) -> tuple[float, float, float, float]:
    """PSNR, SSIM, detail SNR (means over rows) and PSNR inside the sample (all its pixels)."""
    data_range = float(truth.max() - truth.min()) or 1.0
    a, b = torch.from_numpy(image), torch.from_numpy(truth)
    inside = interior(truth)
    error = float(np.mean((image[inside] - truth[inside]) ** 2))
    return (
        float(psnr(a, b, data_range).mean()),
        float(ssim(a, b, data_range).mean()),
        float(np.nanmean(detail_snr(a, b).numpy())),
        float(10 * np.log10(data_range**2 / max(error, 1e-30))),
    )


def support(image: np.ndarray, fraction: float) -> np.ndarray:
    """Where `image` (rows, H, W), smoothed (Gaussian, sigma 2 px), exceeds `fraction` of its
    maximum: the sample as a denoised slice shows it, no truth used."""
    t = torch.from_numpy(image)[:, None]
    kernel = torch.exp(-(torch.arange(-6, 7.0) ** 2) / 8)
    kernel = kernel / kernel.sum()
    smooth = F.conv2d(t, kernel.view(1, 1, 1, -1), padding=(0, 6))
    smooth = F.conv2d(smooth, kernel.view(1, 1, -1, 1), padding=(6, 0))
    return (smooth[:, 0] > fraction * float(smooth.amax())).numpy()


def score(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    scan = read_scan(folder / "scan.h5")
    with h5py.File(folder / "truth.h5", "r") as f:
        truth = np.asarray(f[f"truth/{args.reference}"], dtype=np.float32)
    fbp = recon(scan.sinogram, scan.theta, scan.center, device="cpu")
    rows = [("FBP", *scores(fbp, truth))]
    volume = torch.from_numpy(fbp)
    outputs = []
    for model in args.model:
        engine = load_denoiser(model, "cpu")
        factor = engine.scale_for(volume)
        stack = adjacent_stack(volume, 0, len(volume), engine.depth)
        out = torch.cat([engine.denoise(part, scale=factor) for part in torch.split(stack, 4)])
        outputs.append((engine.name, out.numpy()))
        rows.append((engine.name, *scores(out.numpy(), truth)))
    if args.blend is not None and len(outputs) >= 2:
        (first, outside), (last, inside) = outputs[0], outputs[-1]
        blended = np.where(support(inside, args.blend), inside, outside)
        name = f"{last} inside its support ({args.blend:g}), {first} outside"
        rows.append((name, *scores(blended, truth)))
    sys.stdout.write(
        "| method | PSNR (dB) | SSIM | detail SNR (dB) | PSNR inside the sample (dB) |\n"
        "|---|---:|---:|---:|---:|\n"
    )
    for name, p, s, d, i in rows:
        sys.stdout.write(f"| {name} | {p:.2f} | {s:.3f} | {d:.2f} | {i:.2f} |\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("scan")
    p.add_argument("--family", default="cells")
    p.add_argument("--photons", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=1_000_000)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--cols", type=int, default=256)
    p.add_argument("--angles", type=int, default=360)
    p.add_argument("--out", required=True)
    p.set_defaults(run=make_scan)
    s = sub.add_parser("score")
    s.add_argument("folder")
    s.add_argument("--model", action="append", default=[])
    s.add_argument(
        "--reference",
        choices=["volume", "fbp"],
        default="volume",
        help="score against the phantom's voxels (volume) or the noise-free FBP (fbp)",
    )
    s.add_argument("--blend", type=float, help="see the module docstring")
    s.set_defaults(run=score)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
