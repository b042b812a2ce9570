"""`tomocast view`: subscribe to the publisher, save slices, show progress and a summary."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

from tqdm import tqdm

from service.cli import client_keys
from service.client import Published, Subscriber
from service.clients.writers import HDF5SliceFile, PNGSliceFiles, ScanProgress, SliceWriter
from service.events import PREVIEW_TOPIC, Event, PreviewHeader, ScanEnded, ScanFailed

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
        if isinstance(scan_event(message), ScanEnded):
            ended += 1


def scan_event(message: Published) -> Event | None:
    """The scan event `message` carries; None for a slice, and for an event this version
    does not know (one log line)."""
    try:
        return message.event()
    except ValueError as exc:
        log.warning("event not understood, ignored: %s", exc)
        return None


def run_view(args: argparse.Namespace) -> int:
    if getattr(args, "web", False):
        from service.clients.web.server import run_web

        return run_web(args)
    topics: tuple[str, ...] = ("slice", "event", "recon") if args.recon else ("slice", "event")
    if getattr(args, "previews", False):
        topics += (PREVIEW_TOPIC,)
    sinks: list[SliceWriter] = []
    if args.out is not None:
        sinks.append(HDF5SliceFile(args.out))
    if args.png is not None:
        sinks.append(PNGSliceFiles(args.png))
    progress: dict[str, ScanProgress] = {}
    bars: dict[str, tqdm] = {}
    with Subscriber(args.connect, topics, curve=client_keys(args)) as subscriber:
        info = subscriber.wait_ready(timeout=args.timeout or 30.0)
        sys.stderr.write(f"connected to {args.connect}: {info}\n")
        try:
            for message in receive(subscriber, args.scans, args.timeout):
                if message.data is None:
                    event = scan_event(message)
                    if isinstance(event, ScanEnded):
                        _ended(event, subscriber, progress, bars)
                    continue
                if message.topic == PREVIEW_TOPIC:
                    _preview(message)
                    continue
                try:
                    header = message.slice_header()
                except ValueError as exc:
                    log.warning("slice dropped: %s", exc)
                    continue
                for sink in sinks:
                    sink.write(header, message.data, message.topic)
                if message.topic != "slice":
                    continue
                progress.setdefault(header.scan_id, ScanProgress(header.scan_id)).add(header)
                if header.scan_id not in bars:
                    bars[header.scan_id] = tqdm(
                        total=header.rows, desc=header.scan_id, unit="slice", file=sys.stderr
                    )
                bars[header.scan_id].update(1)
        finally:
            for bar in bars.values():
                bar.close()
            for sink in sinks:
                sink.close()
    return 0


def _preview(message: Published) -> None:
    """One line per preview: which row, how much of the scan, about which centre."""
    try:
        header = PreviewHeader.decode(message.header)
    except ValueError as exc:
        log.warning("preview not understood, ignored: %s", exc)
        return
    behind = (header.t_published or header.t_last_projection) - header.t_last_projection
    where = f"row {header.index}" if header.plane == "xy" else f"xz at slice row {header.index}"
    sys.stderr.write(
        f"preview {header.scan_id} {where}: {100 * header.fraction:.0f}% of "
        f"{header.n_angles} angles, centre {header.center:g} ({header.center_source}), "
        f"{behind:.2f} s behind the detector\n"
    )


def _ended(
    event: ScanEnded,
    subscriber: Subscriber,
    progress: dict[str, ScanProgress],
    bars: dict[str, tqdm],
) -> None:
    """A scan's last event: close its progress bar, print its summary or why it failed."""
    if event.scan_id in bars:
        bars.pop(event.scan_id).close()
    if isinstance(event, ScanFailed):
        sys.stdout.write(f"scan {event.scan_id} failed: {event.reason}\n")
    elif event.scan_id in progress:
        sys.stdout.write(progress[event.scan_id].format_summary() + "\n")
    if subscriber.dropped:
        sys.stdout.write(
            f"this viewer fell behind and lost messages (per topic): {subscriber.dropped}\n"
        )
