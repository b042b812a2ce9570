"""A scan's rows spread over 1, 2, ... engines: throughput and the ratio to one, in one run.

The same simulated scan (random line integrals: FBP and the denoiser cost the same whatever
the data) is reconstructed and denoised by the coordinator the service uses
(`service.cluster.Spread`) with each worker count of --workers in turn: local engines on
--device (threads of this process, torch limited to --threads per engine) or Ray actors on a
local Ray instance (one CPU each) with --engine ray. Each count does one warm-up scan, then
--repeat timed scans; the least is kept. Also reported: the bytes a work unit sends (its rows
with halo, float32) and returns (its slices), per slice published.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import Any

from service.bench import add_common_arguments, command_line, emit, heading, machine, set_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tomocast bench cluster`."""
    parser.add_argument("--engine", choices=["local", "ray"], default="local", help="engines")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="engine counts timed in turn"
    )
    parser.add_argument("--rows", type=int, default=64, help="detector rows (slices) per scan")
    parser.add_argument("--cols", type=int, default=256, help="detector columns")
    parser.add_argument("--angles", type=int, default=None, help="projections (default: cols)")
    parser.add_argument("--batch", type=int, default=8, help="worker.batch_rows")
    parser.add_argument("--unit-rows", type=int, default=16, help="cluster.unit_rows")
    parser.add_argument("--repeat", type=int, default=2, help="timed scans per count (least)")
    parser.add_argument(
        "--no-denoise", action="store_true", help="FBP only (model.enabled = false)"
    )
    add_common_arguments(parser, seed_help="sinogram seed", threads=True)


def _command(args: argparse.Namespace) -> str:
    flags = [
        "--engine",
        "--workers",
        "--rows",
        "--cols",
        "--angles",
        "--batch",
        "--unit-rows",
        "--repeat",
        "--no-denoise",
        "--threads",
        "--device",
        "--seed",
    ]
    return command_line("cluster", args, flags)


def _settings(args: argparse.Namespace, workers: int) -> Any:
    from service.config import Settings

    return Settings.model_validate(
        {
            "worker": {"device": args.device, "batch_rows": args.batch},
            "model": {"enabled": not args.no_denoise},
            "cluster": {"engine": args.engine, "workers": workers, "unit_rows": args.unit_rows},
        }
    )


def _engines(args: argparse.Namespace, workers: int) -> tuple[Any, list[Any], int]:
    """(settings, engines, the denoiser's halo) for `workers` engines of --engine."""
    import torch

    from service.engine import LocalEngine, RowEngine, load_model
    from service.ray_actors import start_ray_engines
    from workers.recon import make_reconstructor

    settings = _settings(args, workers)
    device = torch.device(args.device)
    if args.engine == "ray":
        engines, _ = start_ray_engines(settings)  # on the bench's Ray instance (`run`)
        model = load_model(settings.model, torch.device("cpu"))  # for its depth
        return settings, engines, model.depth // 2 if model is not None else 0
    local = []
    for index in range(workers):
        engine = RowEngine(
            settings.worker,
            False,
            make_reconstructor(settings.worker.fbp_method, device),
            load_model(settings.model, device),
        )
        engine.warm_up()
        local.append(LocalEngine(str(index), engine))
    denoiser = local[0].engine.denoiser
    return settings, local, denoiser.depth // 2 if denoiser is not None else 0


def _time_count(args: argparse.Namespace, workers: int, scan: Any) -> dict[str, Any]:
    from service.cluster import Spread
    from service.engine import ScanPart, plan_units
    from service.metrics import Metrics

    settings, engines, halo = _engines(args, workers)
    spread = Spread(engines, args.batch, halo, settings.model.enabled, settings.cluster, Metrics())
    never = threading.Event()
    times = []
    try:
        for attempt in range(args.repeat + 1):  # the first warms up the engines' geometry
            t0 = time.perf_counter()
            spread.reconstruct(scan, lambda batch: None, never)
            if attempt:
                times.append(time.perf_counter() - t0)
    finally:
        spread.close()
    units = plan_units(args.rows, args.batch, halo, args.unit_rows)
    sent = sum(ScanPart.of(scan, unit).on_host().nbytes for unit in units)
    best = min(times)
    return {
        "workers": workers,
        "seconds": best,
        "slices_per_s": args.rows / best,
        "sent_bytes_per_slice": sent / args.rows,
        "returned_bytes_per_slice": args.cols * args.cols * 4,
    }


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| workers | scan s | slices/s | x one worker | sent B/slice | returned B/slice |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['workers']} | {row['seconds']:.3f} | {row['slices_per_s']:.1f} "
            f"| {row['speedup']:.2f} | {row['sent_bytes_per_slice']:.0f} "
            f"| {row['returned_bytes_per_slice']} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """`tomocast bench cluster`: see the module doc."""
    if min(args.workers) < 1 or min(args.rows, args.repeat, args.batch, args.unit_rows) < 1:
        sys.stderr.write("tomocast bench cluster: counts and sizes must be >= 1\n")
        return 2
    if args.cols < 16:
        sys.stderr.write("tomocast bench cluster: --cols must be >= 16\n")
        return 2
    import numpy as np
    import torch

    from service.protocol import ScanStart
    from service.sinogram import CompletedScan

    set_threads(args)
    logging.getLogger("service.cluster").setLevel(logging.WARNING)
    load_before, device = os.getloadavg()[0], torch.device(args.device)
    angles = args.angles or args.cols
    rng = np.random.default_rng(args.seed)
    sinogram = torch.from_numpy(rng.random((args.rows, angles, args.cols), dtype=np.float32))
    start = ScanStart("bench", 0, args.rows, args.cols, angles, "float32")
    theta = np.linspace(0, np.pi, angles, endpoint=False)
    scan = CompletedScan(start, sinogram.to(device), theta, args.cols / 2, 0, 0, 0, 0.0, 0.0)
    results = []
    if args.engine == "ray":
        import ray

        ray.init(
            num_cpus=max(args.workers),
            num_gpus=0,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    try:
        for workers in args.workers:
            results.append(_time_count(args, workers, scan))
    finally:
        if args.engine == "ray":
            ray.shutdown()
    for row in results:
        row["speedup"] = results[0]["seconds"] / row["seconds"]
    report = {
        "command": _command(args),
        "machine": machine(device, load_before),
        "scan": {"rows": args.rows, "cols": args.cols, "angles": angles},
        "results": results,
    }
    about = (
        f"{args.engine} engines; scan {args.rows} rows x {args.cols} cols x {angles} angles, "
        f"batch {args.batch}, units of {args.unit_rows} rows, "
        f"{'FBP only' if args.no_denoise else 'FBP + denoise'}; x one worker: the first "
        "count's time over this one's\n\n"
    )
    emit(args, report, heading(report) + about + _table(results))
    return 0
