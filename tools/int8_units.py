"""int8 against fp32 for the default denoiser, per low-dose condition, fed two ways: the values
the engine gives the network for a scan at its trained level
(`workers.quantize.calibration_units`), and the phantom's [0, 1] range. The figures of
docs/model-card.md, "The demo and the engine's speed with the new default", and of the
tolerance comment in tests/unit/workers/test_denoise.py.

    OMP_NUM_THREADS=2 PYTHONPATH=. python tools/int8_units.py
"""

from __future__ import annotations

import torch

from models.training.metrics import psnr
from workers.denoise import load_denoiser
from workers.lowdose import EVALUATION_SEED
from workers.quantize import CONDITIONS, calibration_units, foam_stacks

USEFUL_DB = 15.0  # as the test: conditions where fp32 itself denoises to at least this


def main() -> None:
    engines = {p: load_denoiser(None, "cpu", precision=p) for p in ("fp32", "int8")}
    metadata = engines["fp32"].metadata
    offset, scale = metadata.scaled(1.0)
    for units in (1.0, calibration_units(metadata.reference_level, metadata.input_scale)):
        for size in (128, 256):
            stacks, truth = foam_stacks(3, seed=EVALUATION_SEED + 11, rows=3, size=size)
            out = {
                p: (e.denoise(offset + scale * stacks * units, scale=1.0) - offset) / scale / units
                for p, e in engines.items()
            }
            for part in torch.arange(len(stacks)).chunk(len(CONDITIONS)):
                reference = float(psnr(out["fp32"][part], truth[part], 1.0).mean())
                if reference < USEFUL_DB:
                    continue
                diff = out["int8"][part] - out["fp32"][part]
                loss = reference - float(psnr(out["int8"][part], truth[part], 1.0).mean())
                print(
                    f"input x{units:.3f} {size} px: rms {float(diff.pow(2).mean().sqrt()):.4f} "
                    f"max {float(diff.abs().max()):.3f} PSNR loss {loss:+.3f} dB"
                )


if __name__ == "__main__":
    main()
