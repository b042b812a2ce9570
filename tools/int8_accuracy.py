"""The engine's int8 against its fp32 for the default denoiser, per low-dose condition and slice
width, fed as the engine feeds a scan at the trained level: the PSNR each gives against the
phantom, what int8 loses, and rms / max of (int8 - fp32) in units of the phantom's range. The
figures of docs/benchmarks.md, "int8 accuracy"; the test (tests/unit/workers/test_denoise.py)
asserts the tolerances at 128 and 256 px.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/int8_accuracy.py --sizes 128 256 512

`--fp32-modules` replaces `workers.quantize.FP32_MODULES` for the run (e.g. `--fp32-modules
head` quantizes the stem too); where int8's own check refuses the variant, the refusal is
printed. `--model` scores other weights, e.g. an earlier default from git history.

Foam phantom `EVALUATION_SEED + 11`, 3 slices, 180 views at full dose (so a wider slice is also
a sparser one), conditions `workers.quantize.CONDITIONS`.
"""

from __future__ import annotations

import argparse

import torch

import workers.quantize as quantize
from models.training.metrics import psnr
from workers.denoise import load_denoiser
from workers.lowdose import EVALUATION_SEED
from workers.quantize import CONDITIONS, QuantizationError, calibration_units, foam_stacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--model", default=None, help="artifact (default: the service's)")
    parser.add_argument(
        "--fp32-modules", nargs="*", default=None, help="modules left fp32 (default: the engine's)"
    )
    args = parser.parse_args()
    if args.fp32_modules is not None:
        quantize.FP32_MODULES = tuple(args.fp32_modules)
        print(f"fp32 modules: {', '.join(quantize.FP32_MODULES) or 'none'}")
    try:
        engines = {p: load_denoiser(args.model, "cpu", precision=p) for p in ("fp32", "int8")}
    except QuantizationError as exc:
        raise SystemExit(f"int8 refused: {exc}") from None
    metadata = engines["fp32"].metadata
    offset, scale = metadata.scaled(1.0)
    units = calibration_units(metadata.reference_level, metadata.input_scale)
    print(f"{metadata.name}: int8 {engines['int8'].precision}")
    print("| px | condition (every n-th view, photons) | fp32 dB | int8 dB | lost | rms | max |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        stacks, truth = foam_stacks(3, seed=EVALUATION_SEED + 11, rows=3, size=size)
        out = {
            p: (e.denoise(offset + scale * stacks * units, scale=1.0) - offset) / scale / units
            for p, e in engines.items()
        }
        for (views, photons), part in zip(
            CONDITIONS, torch.arange(len(stacks)).chunk(len(CONDITIONS)), strict=True
        ):
            fp32 = float(psnr(out["fp32"][part], truth[part], 1.0).mean())
            int8 = float(psnr(out["int8"][part], truth[part], 1.0).mean())
            difference = out["int8"][part] - out["fp32"][part]
            print(
                f"| {size} | 1/{views}, {photons or 'no noise'} | {fp32:.2f} | {int8:.2f} | "
                f"{fp32 - int8:.2f} | {float(difference.pow(2).mean().sqrt()):.4f} | "
                f"{float(difference.abs().max()):.3f} |"
            )


if __name__ == "__main__":
    main()
