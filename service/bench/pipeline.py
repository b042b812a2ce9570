"""`tomocast bench pipeline`: simulated scans through a real service on loopback, timed.

A `service.app.Service` starts on free `tcp://127.0.0.1` ports (as `tomocast serve` would,
same settings tree); a DAQ thread pushes foam scans (`service.sim.simulate`) at `--rate` projections
per second (or as fast as the service takes them) with `service.client.Detector`; a viewer
(`Subscriber`) takes every slice and event. Scans are simulated before the clock starts.

Reported, from the slice headers and the scan_completed events:
- ms/slice per stage (header `timing`: fbp, denoise, guard; publish from the service's histogram),
- slices/s: slices published / (last slice published - first projection sent),
- p50/p95/p99 end-to-end latency: a slice's `t_published - t_last_projection` (its scan's last
  projection received -> the slice published),
- tail: a scan's last projection -> its last slice published (what an operator waits for).

`--burst-and-paced` sends each scan twice: first in a burst (as fast as the service takes it),
then the same data at `--rate`, each copy once the one before has ended (so no scan's tail
shares the machine with the next scan's arrival); the report has both tails and their ratio,
measured in one run (what incremental reconstruction, `--incremental`, is judged by).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.bench import add_common_arguments, command_line, emit, heading, machine, set_threads
from service.events import Event, ScanEnded, ScanFailed

BURST_SUFFIX = "-burst"  # scan_id of a scan's burst copy (--burst-and-paced)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=32, help="detector rows (slices per scan)")
    parser.add_argument(
        "--cols", type=int, default=256, help="detector columns (slices are COLS^2)"
    )
    parser.add_argument(
        "--angles", type=int, default=None, help="projections per scan (1.5 x COLS)"
    )
    parser.add_argument("--scans", type=int, default=3, help="scans sent one after the other")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="projections per second the DAQ sends (default: as fast as taken)",
    )
    parser.add_argument("--chunk", type=int, default=8, help="projections per message")
    parser.add_argument("--batch", type=int, default=8, help="worker.batch_rows")
    parser.add_argument(
        "--photons", type=float, default=1000.0, help="flat-field photons per pixel"
    )
    parser.add_argument(
        "--model", default=None, help="denoiser artifact (default: the shipped one)"
    )
    parser.add_argument("--no-denoise", action="store_true", help="model.enabled = false")
    parser.add_argument(
        "--no-prepare",
        action="store_true",
        help="worker.prepare_geometry = false: "
        "each scan's FBP geometry is built by its first batch, not at scan_start",
    )
    parser.add_argument(
        "--sinogram-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="ingest.sinogram_dtype: storage of the scans being assembled",
    )
    parser.add_argument(
        "--precision",
        default=None,
        help="model.precision (auto, artifact, fp32, int8, ...; default: the service's setting)",
    )
    parser.add_argument(
        "--fbp-method",
        choices=["auto", "direct", "gridding"],
        default="auto",
        help="worker.fbp_method",
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="incremental.enabled = true: FBP folded in while each scan arrives",
    )
    parser.add_argument("--block-angles", type=int, default=None, help="incremental.block_angles")
    parser.add_argument(
        "--declare-center",
        action="store_true",
        help="scan_start declares the rotation centre (else preprocess.center = auto "
        "estimates it at scan end; incremental needs it declared)",
    )
    parser.add_argument(
        "--burst-and-paced",
        action="store_true",
        help="send each scan first in a burst, then again at --rate; report both tails",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds"
    )
    add_common_arguments(parser, seed_help="phantom and noise seed", threads=True)


@dataclass
class _Seen:
    """What the viewer took and the DAQ did during a run."""

    headers: list[dict[str, Any]] = field(default_factory=list)  # slice headers
    events: list[Event] = field(default_factory=list)  # scan lifecycle events
    sent: list[float] = field(default_factory=list)  # when each scan's first message went
    dropped: int = 0  # slices the viewer lost


def run(args: argparse.Namespace) -> int:
    from service.app import Service
    from service.config import load_settings

    set_threads(args)
    angles = args.angles or round(1.5 * args.cols)
    scans = _simulate(args, angles)
    if args.burst_and_paced and args.rate is None:
        raise SystemExit("bench pipeline: --burst-and-paced needs --rate")
    load_before = os.getloadavg()[0]
    service = Service(load_settings(None, _overrides(args)))
    started = time.perf_counter()
    endpoints = service.start()
    startup = time.perf_counter() - started
    try:
        seen = _stream(scans, endpoints, args)
    finally:
        service.stop()
    report = _report(args, angles, startup, seen, service, load_before)
    emit(args, report, _table(report))
    return 0 if not any(isinstance(e, ScanFailed) for e in seen.events) else 1


def _simulate(args: argparse.Namespace, angles: int) -> list[Any]:
    """The scans to send, simulated before the clock starts."""
    from service.sim.simulate import simulate_scan

    return [
        simulate_scan(
            f"bench-{i}",
            rows=args.rows,
            cols=args.cols,
            n_angles=angles,
            photons=args.photons,
            seed=args.seed + i,
        )
        for i in range(args.scans)
    ]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The service's settings: free loopback ports, and what the flags set."""
    overrides: dict[str, Any] = {
        "ingest": {"endpoint": "tcp://127.0.0.1:*", "sinogram_dtype": args.sinogram_dtype},
        "publish": {"endpoint": "tcp://127.0.0.1:*"},
        "metrics": {"port": 0},
        "worker": {
            "device": args.device,
            "batch_rows": args.batch,
            "prepare_geometry": not args.no_prepare,
            "fbp_method": args.fbp_method,
        },
        "model": {"enabled": not args.no_denoise, "path": args.model},
        "incremental": {"enabled": args.incremental},
    }
    if args.block_angles is not None:
        overrides["incremental"]["block_angles"] = args.block_angles
    if args.precision is not None:
        overrides["model"]["precision"] = args.precision
    return overrides


def _stream(scans: list[Any], endpoints: Any, args: argparse.Namespace) -> _Seen:
    """Send `scans` from a DAQ thread and take every slice and event until each scan has
    completed or failed; SystemExit when nothing arrives for --timeout seconds."""
    from service.client import Detector, Subscriber
    from service.sim.simulate import ScanPacer

    seen = _Seen()
    copies = 2 if args.burst_and_paced else 1
    with Subscriber(endpoints.publish, ("slice", "event")) as viewer:
        viewer.wait_ready()

        # the scans' ends, set by this thread as their events arrive
        ended = {
            f"{scan.start.scan_id}{suffix}": threading.Event()
            for scan in scans
            for suffix in ("", BURST_SUFFIX)
        }

        def send(detector: Detector, scan: Any, scan_id: str, pacer: ScanPacer) -> None:
            options = {"center": scan.start.rotation_center()} if args.declare_center else {}
            seen.sent.append(time.time())
            detector.send_scan(
                scan_id,
                scan.projections,
                darks=scan.darks,
                flats=scan.flats,
                chunk=args.chunk,
                pace=pacer.wait,
                **options,
            )

        def daq() -> None:
            pacer = ScanPacer(args.rate)
            with Detector(endpoints.ingest) as detector:
                for scan in scans:
                    if args.burst_and_paced:
                        burst = f"{scan.start.scan_id}{BURST_SUFFIX}"
                        send(detector, scan, burst, ScanPacer(None))
                        # the paced copy starts once the burst is done: one scan at a time
                        if not ended[burst].wait(args.timeout):
                            return
                        pacer = ScanPacer(args.rate)
                    send(detector, scan, scan.start.scan_id, pacer)
                    # nor does the next burst begin before this scan is done
                    if args.burst_and_paced and not ended[scan.start.scan_id].wait(args.timeout):
                        return

        sender = threading.Thread(target=daq, name="bench-daq", daemon=True)
        sender.start()
        deadline = time.monotonic() + args.timeout
        while sum(isinstance(e, ScanEnded) for e in seen.events) < copies * len(scans):
            message = viewer.recv(timeout=max(0.0, deadline - time.monotonic()))
            if message is None:
                raise SystemExit(f"bench pipeline: no message for {args.timeout:g} s")
            event = message.event()
            if event is not None:
                seen.events.append(event)
                if isinstance(event, ScanEnded) and event.scan_id in ended:
                    ended[event.scan_id].set()
            else:
                seen.headers.append(message.header)
        sender.join()
        seen.dropped = sum(viewer.dropped.values())
    return seen


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(np.asarray(values), (50, 95, 99))
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": max(values)}


def _report(
    args: argparse.Namespace,
    angles: int,
    startup: float,
    seen: _Seen,
    service: Any,
    load_before: float,
) -> dict[str, Any]:
    headers, events = seen.headers, seen.events
    stages: dict[str, float] = {}
    for stage in ("fbp", "denoise", "guard"):
        values = [h["timing"][stage] for h in headers if stage in h["timing"]]
        if values:
            stages[stage] = 1e3 * float(np.median(values))
    registry = service.metrics.registry
    total = registry.get_sample_value("tomocast_stage_seconds_sum", {"stage": "publish"}) or 0.0
    count = registry.get_sample_value("tomocast_stage_seconds_count", {"stage": "publish"}) or 0
    if count:
        stages["publish"] = 1e3 * total / count
    end_to_end = [h["t_published"] - h["t_last_projection"] for h in headers]
    last: dict[str, dict[str, Any]] = {}
    for h in headers:
        if h["scan_id"] not in last or h["t_published"] > last[h["scan_id"]]["t_published"]:
            last[h["scan_id"]] = h
    tail_of = {scan_id: h["t_published"] - h["t_last_projection"] for scan_id, h in last.items()}
    tails = [t for scan_id, t in tail_of.items() if not scan_id.endswith(BURST_SUFFIX)]
    bursts = [t for scan_id, t in tail_of.items() if scan_id.endswith(BURST_SUFFIX)]
    # each scan's paced tail over its own burst's: the ratio incremental reconstruction cuts.
    # The first scan's burst also builds the scan geometry (every later scan finds it cached):
    # with more than one scan the median leaves it out
    ratios = [
        tail_of[scan_id] / tail_of[f"{scan_id}{BURST_SUFFIX}"]
        for scan_id in tail_of
        if f"{scan_id}{BURST_SUFFIX}" in tail_of and tail_of[f"{scan_id}{BURST_SUFFIX}"] > 0
    ]
    warm = ratios[1:] if len(ratios) > 1 else ratios
    warm_bursts = bursts[1:] if len(bursts) > 1 else bursts
    warm_tails = tails[1:] if len(tails) > 1 and ratios else tails
    span = max((h["t_published"] for h in headers), default=0.0) - min(seen.sent, default=0.0)
    return {
        "bench": "pipeline",
        "command": _command(args),
        "machine": machine(service.device, load_before),
        "model": service.denoiser.name if service.denoiser else "none",
        "precision": getattr(service.denoiser, "precision", None),
        "scan": {
            "rows": args.rows,
            "cols": args.cols,
            "angles": angles,
            "scans": args.scans,
            "rate_projections_per_s": args.rate,
            "batch_rows": args.batch,
        },
        "startup_s": startup,
        "slices": len(headers),
        "dropped": seen.dropped,
        "failed_scans": sum(isinstance(e, ScanFailed) for e in events),
        "ms_per_slice": stages,
        "prepare_geometry": not args.no_prepare,
        "sinogram_dtype": args.sinogram_dtype,
        "slices_per_s": len(headers) / span if span > 0 else None,
        "end_to_end_ms": {k: 1e3 * v for k, v in _percentiles(end_to_end).items()},
        "scan_tail_s": {
            "median": float(np.median(tails)) if tails else None,
            "max": max(tails, default=None),
            "each": tails,
        },
        "fbp_method": args.fbp_method,
        "incremental": args.incremental,
        "center_declared": args.declare_center,
        "burst_tail_s": {
            "median": float(np.median(warm_bursts)) if warm_bursts else None,
            "each": bursts,
        },
        "paced_tail_s": {
            "median": float(np.median(warm_tails)) if ratios else None,
            "each": tails if ratios else [],
        },
        "paced_over_burst": {
            "median": float(np.median(warm)) if warm else None,
            "each": ratios,
        },
    }


def _command(args: argparse.Namespace) -> str:
    scan = ["--rows", "--cols", "--scans", "--chunk", "--batch", "--photons"]
    optional = ["--angles", "--rate", "--model", "--precision", "--threads", "--sinogram-dtype"]
    live = ["--fbp-method", "--incremental", "--block-angles", "--declare-center"]
    live.append("--burst-and-paced")
    return command_line(
        "pipeline",
        args,
        [*scan, "--device", "--seed", *optional, "--no-denoise", "--no-prepare", *live],
        photons=f"{args.photons:g}",
        sinogram_dtype=None if args.sinogram_dtype == "float32" else args.sinogram_dtype,
        fbp_method=None if args.fbp_method == "auto" else args.fbp_method,
    )


def _table(report: dict[str, Any]) -> str:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in report["ms_per_slice"].items())
    latency = report["end_to_end_ms"]
    tail = report["scan_tail_s"]
    rate = report["slices_per_s"]
    lines = [
        heading(report),
        "| what | value |",
        "|---|---|",
        f"| model (precision) | {report['model']} ({report['precision']}) |",
        f"| scans x rows x cols^2, angles | {report['scan']['scans']} x "
        f"{report['scan']['rows']} x {report['scan']['cols']}^2, {report['scan']['angles']} |",
        f"| service start-up | {report['startup_s']:.1f} s |",
        f"| slices published (dropped, failed scans) | {report['slices']} "
        f"({report['dropped']}, {report['failed_scans']}) |",
        f"| ms/slice by stage | {stages} |",
        f"| FBP geometry built at scan_start | {report['prepare_geometry']} |",
        f"| sinogram storage | {report['sinogram_dtype']} |",
        f"| slices/s | {rate:.1f} |" if rate else "| slices/s | - |",
    ]
    if latency:
        lines.append(
            f"| end-to-end latency p50 / p95 / p99 | {latency['p50']:.0f} / "
            f"{latency['p95']:.0f} / {latency['p99']:.0f} ms |"
        )
    if tail["max"] is not None:
        lines.append(
            f"| last projection -> last slice (median / max) | {tail['median']:.2f} / "
            f"{tail['max']:.2f} s |"
        )
    burst, paced, ratio = report["burst_tail_s"], report["paced_tail_s"], report["paced_over_burst"]
    if burst["median"] is not None and paced["median"] is not None:
        lines.append(
            f"| tail paced / in a burst (median without the first scan's cold burst) | "
            f"{paced['median']:.2f} / {burst['median']:.2f} s |"
        )
    if ratio["median"] is not None:
        each = ", ".join(f"{r:.2f}" for r in ratio["each"])
        lines.append(
            f"| paced tail / burst tail (median, as above; each scan) | "
            f"{ratio['median']:.2f}; {each} |"
        )
    lines.append(
        f"| FBP method, incremental, centre declared | {report['fbp_method']}, "
        f"{report['incremental']}, {report['center_declared']} |"
    )
    return "\n".join(lines) + "\n"
