"""`tomocast demo`: service + simulated detector + viewer on this machine, then a summary.

Everything goes over real loopback TCP sockets on free ports, so the demo never collides with a
service already running. It ends by itself and prints slices received, per-stage latency, the
rotation centre used (and where it came from), and PSNR/SSIM against the phantom for plain FBP
and for the denoised slices.
A detector fault asked for (`--center-offset`, `--rings`, `--zingers`, `--half-acquisition`,
`service.sim.simulate.Faults`) turns on its repair (`[preprocess]`), so the summary shows it
repaired.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from service.app import Service
from service.client import Detector, Subscriber
from service.clients.view import receive, scan_event
from service.clients.writers import ScanProgress, save_comparison_png
from service.config import load_settings
from service.events import ScanCompleted, ScanEnded, ScanFailed, SliceHeader
from service.sim.simulate import Faults, SimulatedScan, simulate_scan


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    faults = Faults(
        center_offset=args.center_offset,
        rings=args.rings,
        zingers=args.zingers,
        half_acquisition=args.half_acquisition,
    )
    settings = load_settings(
        None,
        {
            "preprocess": repairs(faults),
            "ingest": {"endpoint": "tcp://127.0.0.1:*"},
            "publish": {"endpoint": "tcp://127.0.0.1:*", "recon": True},
            "metrics": {"port": 0},
            "worker": {"device": args.device},
            "model": {"path": args.model},
        },
    )
    say = sys.stdout.write
    say(
        f"simulating a {args.phantom} phantom scan (attenuation {args.attenuation:g}x): "
        f"{args.rows} rows x {args.cols} cols x {args.angles} "
        f"angles, {args.photons:g} photons/pixel\n"
    )
    scan = simulate_scan(
        "demo",
        rows=args.rows,
        cols=args.cols,
        n_angles=args.angles,
        photons=args.photons,
        seed=args.seed,
        family=args.phantom,
        attenuation=args.attenuation,
        faults=faults,
    )
    service = Service(settings)
    t_start = time.monotonic()
    endpoints = service.start()
    say(
        f"service ready in {time.monotonic() - t_start:.1f} s on {service.device}: ingest "
        f"{endpoints.ingest}, publish {endpoints.publish}, metrics "
        f"http://127.0.0.1:{endpoints.metrics_port}/metrics\n"
    )
    try:
        with Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer:
            info = viewer.wait_ready()
            sender = threading.Thread(target=_send, args=(endpoints.ingest, scan), daemon=True)
            t_send = time.monotonic()
            sender.start()
            volumes, progress, ended, verdicts = _collect(viewer, args.rows, scan.truth.shape[-1])
            sender.join()
            elapsed = time.monotonic() - t_send
    finally:
        service.stop()
    axis = _axis(scan, faults)
    say(_summary(info, scan.truth, volumes, progress, ended, elapsed, out, axis))
    say(_guard_summary(verdicts))
    return 0


def repairs(faults: Faults) -> dict[str, Any]:
    """The `[preprocess]` settings that repair `faults` (the centre is estimated by default)."""
    settings: dict[str, Any] = {}
    if faults.rings:
        settings["stripe_removal"] = "auto"
    if faults.zingers:
        settings["zingers"] = "auto"
    if faults.half_acquisition:
        settings["half_acquisition"] = True
    return settings


def _axis(scan: SimulatedScan, faults: Faults) -> float:
    """Where the simulated rotation axis is (tomocast's convention)."""
    return faults.geometry(scan.start.cols, scan.start.n_angles, scan.start.center)[0]


def _send(endpoint: str, scan: SimulatedScan) -> None:
    start = scan.start
    with Detector(endpoint) as detector:
        detector.send_scan(
            start.scan_id,
            scan.projections,
            darks=scan.darks,
            flats=scan.flats,
            chunk=8,
            center=start.center,
            theta=None if start.theta is None else list(start.theta),
        )


def _collect(
    viewer: Subscriber,
    rows: int,
    cols: int,
) -> tuple[dict[str, np.ndarray], ScanProgress, ScanEnded | None, list[SliceHeader]]:
    """The scan's slices by topic, its progress, its end, and the headers of topic `slice` (the
    no-harm guard's verdicts)."""
    verdicts: list[SliceHeader] = []
    volumes = {
        topic: np.full((rows, cols, cols), np.nan, np.float32) for topic in ("recon", "slice")
    }
    progress = ScanProgress("demo")
    ended: ScanEnded | None = None
    for message in receive(viewer, scans=1, timeout=600.0):
        if message.data is None:
            event = scan_event(message)
            if isinstance(event, ScanEnded):
                ended = event
            continue
        header = message.slice_header()
        if message.topic == "slice":
            verdicts.append(header)
        if message.data is None or message.data.shape != (cols, cols):
            # a half-acquisition scan's stitched width may differ from the phantom's by a pixel
            volumes[message.topic][header.index] = _fit(message.data, cols)
            continue
        volumes[message.topic][header.index] = message.data
        if message.topic == "slice":
            progress.add(header)
    return volumes, progress, ended, verdicts


def _guard_summary(verdicts: list[SliceHeader]) -> str:
    """One line: how many slices went out denoised and the guard's scores (docs/operations.md,
    "No-harm guard"); nothing when no slice was scored."""
    scores = [h.consistency for h in verdicts if h.consistency is not None]
    if not verdicts or not any(h.denoised is not None for h in verdicts):
        return ""
    kept = sum(bool(h.denoised) for h in verdicts)
    line = f"no-harm guard: {kept}/{len(verdicts)} slices published denoised"
    if scores:
        line += (
            f", consistency median {float(np.median(scores)):.2f} "
            f"({min(scores):.2f}-{max(scores):.2f}; kept when <= the threshold)"
        )
    return line + "\n"


def _fit(data: np.ndarray | None, size: int) -> np.ndarray:
    """`data` cropped or padded (NaN-free: zeros) to size x size about its top-left corner."""
    out = np.zeros((size, size), np.float32)
    if data is not None:
        n = min(size, data.shape[-1])
        out[:n, :n] = data[:n, :n]
    return out


def _quality(truth: np.ndarray, volume: np.ndarray) -> tuple[float, float]:
    """Mean PSNR and SSIM over the slices, inside the reconstruction circle."""
    n = truth.shape[-1]
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    circle = (xx**2 + yy**2) <= (n / 2) ** 2
    data_range = float(truth.max() - truth.min())
    psnr, ssim = [], []
    for t, v in zip(truth, volume, strict=True):
        t, v = np.where(circle, t, 0), np.where(circle, v, 0)
        psnr.append(peak_signal_noise_ratio(t, v, data_range=data_range))
        ssim.append(structural_similarity(t, v, data_range=data_range))
    return float(np.mean(psnr)), float(np.mean(ssim))


def _summary(
    info: dict[str, Any],
    truth: np.ndarray,
    volumes: dict[str, np.ndarray],
    progress: ScanProgress,
    ended: ScanEnded | None,
    elapsed: float,
    out: Path,
    axis: float | None = None,
) -> str:
    lines = ["", "=== tomocast demo summary ==="]
    model = info.get("model", "?")
    if info.get("trained") is False or str(model).startswith("placeholder"):
        lines.append(
            f"model: {model}  (PLACEHOLDER: an untrained smoothing filter shipped until "
            "a trained TomoGAN exists; not a TomoGAN result)"
        )
    else:
        lines.append(f"model: {model}")
    lines.append(f"device: {info.get('device')}   scan sent and processed in {elapsed:.1f} s")
    if isinstance(ended, ScanFailed):
        lines.append(f"SCAN FAILED: {ended.reason}")
        return "\n".join(lines) + "\n"
    lines.append(progress.format_summary())
    if isinstance(ended, ScanCompleted) and ended.center is not None:
        true_axis = "" if axis is None else f" (the simulated axis: {axis:.2f})"
        lines.append(f"rotation centre: {ended.center:.2f} px, {ended.center_source}{true_axis}")
        if ended.preprocessing:
            applied = ", ".join(f"{k} = {v}" for k, v in ended.preprocessing.items())
            lines.append(f"preprocessing: {applied}")
    received = {topic: int(np.isfinite(v[:, 0, 0]).sum()) for topic, v in volumes.items()}
    lines.append(
        f"slices received: {received['slice']}/{len(truth)} denoised, "
        f"{received['recon']}/{len(truth)} plain FBP"
    )
    if min(received.values()) == len(truth):
        for label, topic in (("plain FBP", "recon"), ("FBP + denoiser", "slice")):
            psnr, ssim = _quality(truth, volumes[topic])
            lines.append(f"{label:>15}: PSNR {psnr:6.2f} dB   SSIM {ssim:.3f}   (vs the phantom)")
        row = len(truth) // 2
        path = out / "compare.png"
        save_comparison_png(
            path,
            [
                ("phantom", truth[row]),
                ("FBP", volumes["recon"][row]),
                ("denoised", volumes["slice"][row]),
            ],
        )
        lines.append(f"wrote {path} (phantom | FBP | denoised, row {row})")
    return "\n".join(lines) + "\n"
