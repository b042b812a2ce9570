"""`tomocast simulate` and `tomocast replay`: push scans to a running service."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from service.cli import client_keys
from service.client import Detector
from service.errors import DataError
from service.sim.nxtomo import is_nxtomo, iter_nxtomo_chunks, read_nxtomo
from service.sim.replay import iter_projection_chunks, read_dxchange
from service.sim.simulate import Faults, ScanPacer, simulate_scan, write_truth


def run_simulate(args: argparse.Namespace) -> int:
    if args.continuous:
        return run_continuous(args)
    with Detector(args.connect, curve=client_keys(args)) as detector:
        for i in range(args.scans):
            scan_id = args.scan_id if args.scans == 1 else f"{args.scan_id}-{i:04d}"
            scan = simulate_scan(
                scan_id,
                rows=args.rows,
                cols=args.cols,
                n_angles=args.angles,
                photons=args.photons,
                seed=args.seed + i,
                center=args.center,
                family=args.phantom,
                attenuation=args.attenuation,
                faults=Faults(
                    center_offset=args.center_offset,
                    rings=args.rings,
                    zingers=args.zingers,
                    half_acquisition=args.half_acquisition,
                ),
            )
            if args.save_truth is not None:
                path = args.save_truth if args.scans == 1 else _numbered(args.save_truth, i)
                write_truth(path, scan)
            pacer = ScanPacer(args.rate)
            with tqdm(total=args.angles, desc=scan_id, unit="proj", file=sys.stderr) as bar:
                detector.send_scan(
                    scan_id,
                    scan.projections,
                    darks=scan.darks,
                    flats=scan.flats,
                    chunk=args.chunk,
                    pace=pacer.wait,
                    progress=bar.update,
                    center=scan.start.center,
                    theta=None if scan.start.theta is None else list(scan.start.theta),
                    meta=scan.start.meta,
                )
    return 0


def run_continuous(args: argparse.Namespace) -> int:
    """`simulate --continuous`: `--turns` turns of a growing inclusion, `--angles` a half-turn."""
    from service.sim.continuous import send_continuous

    with (
        Detector(args.connect, curve=client_keys(args)) as detector,
        tqdm(total=2 * args.angles * args.turns, desc=args.scan_id, file=sys.stderr) as bar,
    ):
        send_continuous(
            detector,
            args.scan_id,
            rows=args.rows,
            cols=args.cols,
            half_turn=args.angles,
            turns=args.turns,
            window=args.window,
            every=args.every,
            center=args.center,
            chunk=args.chunk,
            pace=ScanPacer(args.rate).wait,
            progress=bar.update,
        )
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """Stream a DXchange or NXtomo file chunk by chunk: memory stays at one chunk, whatever
    its size."""
    nexus = is_nxtomo(args.file)
    if nexus:
        scan = read_nxtomo(args.file, args.entry, load_projections=False)
    elif args.entry is not None:
        raise DataError(f"{args.file}: --entry is for NXtomo files; this one has no NXtomo entry")
    else:
        scan = read_dxchange(args.file, load_projections=False)
    scan_id = args.scan_id or scan.scan_id
    start = replace(scan.scan_start(), scan_id=scan_id)
    if args.center is not None:
        start = replace(start, center=args.center)
    pacer = ScanPacer(args.rate)
    with (
        Detector(args.connect, curve=client_keys(args)) as detector,
        tqdm(total=start.n_angles, desc=scan_id, unit="proj", file=sys.stderr) as bar,
    ):
        detector.start_scan(
            scan_id,
            start.rows,
            start.cols,
            start.n_angles,
            start.dtype,
            theta=start.theta,
            center=start.center,
            n_dark=start.n_dark,
            n_flat=start.n_flat,
            normalized=start.normalized,
            meta=start.meta,
        )
        for kind, frames in (("dark", scan.darks), ("flat", scan.flats)):
            if len(frames) and not start.normalized:
                detector.send_frames(kind, scan_id, 0, frames)  # type: ignore[arg-type]
        chunks = (
            iter_nxtomo_chunks(args.file, args.chunk, start.dtype, args.entry)
            if nexus
            else iter_projection_chunks(args.file, args.chunk, start.dtype)
        )
        for index, chunk in chunks:
            pacer.wait(len(chunk))
            detector.send_frames("projections", scan_id, index, chunk)
            bar.update(len(chunk))
        detector.end_scan(scan_id, start.n_angles)
    return 0


def _numbered(path: Path, i: int) -> Path:
    return path.with_name(f"{path.stem}-{i:04d}{path.suffix}")
