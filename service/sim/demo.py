"""`tomocast demo`: service + simulated detector + viewer on this machine, then a summary.

Everything goes over real loopback TCP sockets on free ports, so the demo never collides with a
service already running. It ends by itself and prints slices received, per-stage latency, and
PSNR/SSIM against the phantom for plain FBP and for the denoised slices.
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
from service.events import ScanEnded, ScanFailed
from service.sim.simulate import simulate_scan


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        None,
        {
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
            volumes, progress, ended = _collect(viewer, args.rows, args.cols)
            sender.join()
            elapsed = time.monotonic() - t_send
    finally:
        service.stop()
    say(_summary(info, scan.truth, volumes, progress, ended, elapsed, out))
    return 0


def _send(endpoint: str, scan: Any) -> None:
    with Detector(endpoint) as detector:
        detector.send_scan(
            scan.start.scan_id, scan.projections, darks=scan.darks, flats=scan.flats, chunk=8
        )


def _collect(
    viewer: Subscriber,
    rows: int,
    cols: int,
) -> tuple[dict[str, np.ndarray], ScanProgress, ScanEnded | None]:
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
        volumes[message.topic][header.index] = message.data
        if message.topic == "slice":
            progress.add(header)
    return volumes, progress, ended


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
