"""Mixed precision vs fp32 training: time per step and peak memory, same data, steps and seed.

    python -m models.training.bench_train --data FILE [--arch resattunet] [--steps 20]
        [--device cpu]

runs `tomocast train` once per precision, each in a fresh process (so one run's allocations do
not hide the other's peak), then prints a Markdown table from the runs' summary.json. Peak memory
is the CUDA allocator's peak on a GPU and the sampled resident-set growth on the CPU (see
`models.training.memory`); on the CPU "mixed" means bf16 autocast, which pays off only on CPUs with
native bf16 (AVX512-BF16/AMX), so measure before choosing it there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Run:
    precision: str
    seconds_per_step: float
    peak_bytes: int
    hardware: str
    what: str


def run_once(precision: str, args: argparse.Namespace, out: Path) -> Run:
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "train",
        "--data",
        str(args.data),
        "--arch",
        args.arch,
        "--depth",
        str(args.depth),
        "--patch",
        str(args.patch),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--precision",
        precision,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--seed",
        "0",
        "--lambda-adv",
        str(args.lambda_adv),
        "--val-every",
        str(args.steps + 1),
        "--val-slices",
        "1",
        "--checkpoint-every",
        str(args.steps + 1),
        "--out",
        str(out),
        "--no-progress",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return Run(
        precision,
        float(summary["seconds_per_step"]),
        int(summary["peak_memory_bytes"]),
        str(summary["hardware"]),
        str(summary["peak_memory_what"]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.training.bench_train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="one-file HDF5 data set")
    parser.add_argument("--arch", default="resattunet", choices=["tomogan", "resattunet", "unet"])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--lambda-adv",
        type=float,
        default=0.0,
        help="0 (default) times the generator alone, as Li & Hu's U-Nets train",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for precision in ("fp32", "mixed"):
            rows.append(run_once(precision, args, Path(tmp) / precision))
    fp32, mixed = rows
    lines = [
        f"{args.arch}, depth {args.depth}, batch {args.batch} x {args.patch}x{args.patch}, "
        f"{args.steps} steps, {fp32.hardware}",
        "",
        "| precision | s/step | peak memory (MiB) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {run.precision} | {run.seconds_per_step:.3f} | {run.peak_bytes / 2**20:.0f} |"
        for run in rows
    ]
    speed = fp32.seconds_per_step / mixed.seconds_per_step
    memory = mixed.peak_bytes / max(fp32.peak_bytes, 1)
    lines += [
        "",
        f"mixed vs fp32: {speed:.2f}x the speed, {memory:.2f}x the peak memory ({fp32.what})",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
