"""`tomocast view`: subscribe to the publisher, save slices, show progress and a summary."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

from tqdm import tqdm

from service.cli import client_keys
from service.client import Published, Subscriber
from service.clients.sinks import HDF5SliceSink, PNGSliceSink, ScanProgress, SliceSink

log = logging.getLogger(__name__)


def receive(
    subscriber: Subscriber,
    scans: int | None,
    timeout: float | None,
) -> Iterator[Published]:
    """Published messages until `scans` scans have ended (completed or failed) or nothing came
    for `timeout` seconds."""
    ended = 0
    while scans is None or ended < scans:
        message = subscriber.recv(timeout)
        if message is None:
            log.warning("nothing received for %.0f s: stopping", timeout)
            return
        yield message
        if message.topic == "event" and message.header.get("event") in (
            "scan_completed",
            "scan_failed",
        ):
            ended += 1


def run_view(args: argparse.Namespace) -> int:
    if getattr(args, "web", False):
        from service.clients.web.server import run_web

        return run_web(args)
    topics = ("slice", "event", "recon") if args.recon else ("slice", "event")
    sinks: list[SliceSink] = []
    if args.out is not None:
        sinks.append(HDF5SliceSink(args.out))
    if args.png is not None:
        sinks.append(PNGSliceSink(args.png))
    progress: dict[str, ScanProgress] = {}
    bars: dict[str, tqdm] = {}
    with Subscriber(args.connect, topics, curve=client_keys(args)) as subscriber:
        info = subscriber.wait_ready(timeout=args.timeout or 30.0)
        sys.stderr.write(f"connected to {args.connect}: {info}\n")
        try:
            for message in receive(subscriber, args.scans, args.timeout):
                header = message.header
                scan_id = header.get("scan_id", "?")
                if message.topic == "event":
                    event = header.get("event")
                    if event in ("scan_completed", "scan_failed"):
                        if scan_id in bars:
                            bars.pop(scan_id).close()
                        if event == "scan_failed":
                            sys.stdout.write(f"scan {scan_id} failed: {header.get('reason')}\n")
                        elif scan_id in progress:
                            sys.stdout.write(progress[scan_id].format_summary() + "\n")
                        if subscriber.dropped:
                            sys.stdout.write(
                                f"this viewer fell behind and lost messages "
                                f"(per topic): {subscriber.dropped}\n"
                            )
                    continue
                assert message.data is not None
                for sink in sinks:
                    sink.write({**header, "topic": message.topic}, message.data)
                if message.topic != "slice":
                    continue
                tracker = progress.setdefault(scan_id, ScanProgress(scan_id))
                tracker.add(header)
                if scan_id not in bars:
                    bars[scan_id] = tqdm(
                        total=header["rows"], desc=scan_id, unit="slice", file=sys.stderr
                    )
                bars[scan_id].update(1)
        finally:
            for bar in bars.values():
                bar.close()
            for sink in sinks:
                sink.close()
    return 0
