"""The no-harm guard's cost per slice next to the denoiser's, measured in the same run.

For each width: a simulated raw 16-bit foam scan (`service.sim.simulate.simulate_scan`, --rows
detector rows, --angles projections, --photons per pixel), flat-field corrected, reconstructed
with the service's FBP (auto) and denoised by the artifact as the service runs it
(`workers.denoise.load_denoiser`, --precision, one call for the --rows slices). The guard is the
service's (`service.guard.ScanGuard`, default `[guard]` settings unless --max-angles) on those
slices, twice: with the photon variance from the flat's counts (raw-count scans) and with the
variance estimated from the sinogram (`normalized` scans). Each is timed --repeat times after a
warm-up, the device synchronised around each call; least and median per slice are reported,
and the ratio of the guard's least to the denoiser's least: what the guard adds to the denoise
path. The last columns say what the guard decided on these slices.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from service.bench import add_common_arguments, command_line, emit, heading, machine, set_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tomocast bench guard`."""
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512], metavar="COLS", help="slice widths"
    )
    parser.add_argument("--angles", type=int, default=360, help="projections per scan")
    parser.add_argument("--rows", type=int, default=8, help="slices denoised and guarded at once")
    parser.add_argument("--photons", type=float, default=1000.0, help="counts per flat pixel")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (least and median)")
    parser.add_argument("--model", default=None, help="artifact (default: the shipped model)")
    parser.add_argument(
        "--precision", default="auto", help="denoiser precision, as model.precision"
    )
    parser.add_argument(
        "--max-angles", type=int, default=None, help="guard.max_angles (default: the setting's)"
    )
    add_common_arguments(parser, seed_help="phantom and noise seed", threads=True)


def _command(args: argparse.Namespace) -> str:
    flags = [
        "--sizes",
        "--angles",
        "--rows",
        "--photons",
        "--repeat",
        "--model",
        "--precision",
        "--max-angles",
        "--threads",
        "--device",
        "--seed",
    ]
    return command_line("guard", args, flags)


def _timed(call: Callable[[], Any], device: Any, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls after one warm-up, the device idle around each."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    seconds = []
    for _ in range(repeat):
        sync()
        started = time.perf_counter()
        call()
        sync()
        seconds.append(time.perf_counter() - started)
    return seconds


def _case(args: argparse.Namespace, engine: Any, cols: int, device: Any) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from service.config import GuardSettings
    from service.guard import ScanGuard
    from service.sim.simulate import simulate_scan
    from service.sinogram import CompletedScan
    from workers.denoise import adjacent_stack
    from workers.recon import recon

    scan = simulate_scan(
        "bench-guard",
        rows=args.rows,
        cols=cols,
        n_angles=args.angles,
        photons=args.photons,
        n_dark=4,
        n_flat=4,
        seed=args.seed,
    )
    dark = scan.darks.astype(np.float64).mean(axis=0)
    flat = scan.flats.astype(np.float64).mean(axis=0)
    ratio = (scan.projections.astype(np.float64) - dark) / (flat - dark)
    tomo = (-np.log(np.clip(ratio, 1e-6, None))).astype(np.float32)
    center = cols / 2
    fbp = torch.from_numpy(recon(tomo, scan.theta, center=center, device=str(device))).to(device)
    sinogram = torch.from_numpy(np.ascontiguousarray(tomo.transpose(1, 0, 2))).to(device)
    theta = torch.from_numpy(scan.theta.astype(np.float32)).to(device)
    stack = adjacent_stack(fbp, 0, args.rows, engine.depth)
    scale = engine.scale_for(fbp)
    with torch.inference_mode():
        denoised = engine.denoise(stack, scale=scale)
        denoise_s = _timed(lambda: engine.denoise(stack, scale=scale), device, args.repeat)
    settings = (
        GuardSettings() if args.max_angles is None else GuardSettings(max_angles=args.max_angles)
    )
    counts = torch.from_numpy((flat - dark).astype(np.float32)).to(device)
    rows: list[dict[str, Any]] = [_row(cols, "denoise", denoise_s, args.rows, denoise_s)]
    for variance, flat_counts in (("photon", counts), ("estimated", None)):
        completed = CompletedScan(
            scan.start, sinogram, scan.theta, center, 0, 0, 0, 0.0, 0.0, flat_counts=flat_counts
        )
        guard = ScanGuard(settings, completed, theta, center)

        def check(guard: ScanGuard = guard) -> Any:
            return guard.check(0, denoised, fbp)[1].result()

        with torch.inference_mode():
            verdict = check()
            guard_s = _timed(check, device, args.repeat)
        row = _row(cols, f"guard ({variance} variance)", guard_s, args.rows, denoise_s)
        row["kept"] = float(np.mean(verdict.denoised))
        row["consistency_median"] = float(np.nanmedian(verdict.consistency))
        row["max_angles"] = settings.max_angles
        rows.append(row)
    return rows


def _row(
    cols: int, what: str, seconds: list[float], slices: int, denoise_s: list[float]
) -> dict[str, Any]:
    return {
        "cols": cols,
        "what": what,
        "ms_per_slice_min": 1e3 * min(seconds) / slices,
        "ms_per_slice_median": 1e3 * statistics.median(seconds) / slices,
        "of_denoise": min(seconds) / min(denoise_s),
    }


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| cols | what | ms/slice (least) | ms/slice (median) | x denoise | kept | "
        "consistency (median) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        kept = f"{row['kept']:.0%}" if "kept" in row else ""
        median = f"{row['consistency_median']:.3g}" if "consistency_median" in row else ""
        lines.append(
            f"| {row['cols']} | {row['what']} | {row['ms_per_slice_min']:.2f} | "
            f"{row['ms_per_slice_median']:.2f} | {row['of_denoise']:.3f} | {kept} | {median} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """`tomocast bench guard`: see the module doc."""
    if min(args.sizes) < 16 or min(args.rows, args.repeat, args.angles) < 1:
        sys.stderr.write(
            "tomocast bench guard: --sizes must be >= 16, --rows, --repeat, --angles >= 1\n"
        )
        return 2
    import torch

    from workers.denoise import load_denoiser

    set_threads(args)
    load_before, device = os.getloadavg()[0], torch.device(args.device)
    engine = load_denoiser(args.model, device, precision=args.precision)
    results: list[dict[str, Any]] = []
    for cols in args.sizes:
        results += _case(args, engine, cols, device)
    report = {
        "bench": "guard",
        "command": _command(args),
        "machine": machine(device, load_before),
        "model": engine.name,
        "precision": engine.precision,
        "results": results,
    }
    about = (
        f"model {engine.name} ({engine.precision}), {args.rows} slices per call, "
        f"{args.angles} angles, {args.photons:g} photons; x denoise = least over least\n\n"
    )
    emit(args, report, heading(report) + about + _table(results))
    return 0
