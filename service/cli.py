"""`tomocast` command line: one sub-command per verb, each a thin shell over a module."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import TomocastError

if TYPE_CHECKING:
    from service.security import ClientKeys

log = logging.getLogger("tomocast")

# Modules that add their own sub-commands: each has `add_commands(command)`, where
# `command(name, func, help)` returns the sub-parser to fill. Their imports stay light: heavy
# imports belong inside the command functions.
COMMAND_MODULES: tuple[str, ...] = ("models.training.cli", "service.security", "service.bench")
Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


# workers.phantoms.FAMILIES, spelled out so that building the parser imports nothing heavy
PHANTOM_FAMILIES = ("foam", "granular", "fibres", "layered", "cells", "inclusions")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import Service
    from service.config import load_settings, overrides_from_args

    settings = load_settings(args.config, overrides_from_args(args))
    setup_logging(settings.log_level)
    service = Service(settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    stop.wait()
    log.info(
        "stopping: finishing complete scans (drain timeout %.0f s)", settings.worker.drain_timeout_s
    )
    drained = service.stop()
    log.info("stopped%s", "" if drained else " before every complete scan was finished")
    return 0 if drained else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from service.sim.cli import run_simulate

    return run_simulate(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from service.sim.cli import run_replay

    return run_replay(args)


def cmd_view(args: argparse.Namespace) -> int:
    from service.clients.view import run_view

    return run_view(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from service.sim.demo import run_demo

    return run_demo(args)


def cmd_export_slices(args: argparse.Namespace) -> int:
    from service.clients.export import run_export

    return run_export(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomocast", description="Streaming tomography: projections in, denoised slices out."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = _command_factory(sub)
    _add_serve(sub)
    _add_simulate(command)
    _add_replay(command)
    _add_view(command)
    _add_demo(command)
    _add_export_slices(command)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(command)
    return parser


def _command_factory(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> Command:
    """`command(name, func, help)`: a sub-command that runs `func`, its defaults in its help
    and a --log-level of its own."""

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.set_defaults(func=func)
        if name != "serve":
            p.add_argument(
                "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
            )
        return p

    return command


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`serve`: every setting as a flag (its log level is a setting too)."""
    from service.config import add_settings_flags

    serve = sub.add_parser(
        "serve",
        help="run the service (ingest, worker, publisher, metrics)",
        description="Run the service. Settings come from --config (TOML), "
        "then TOMOCAST_* environment variables (TOMOCAST_INGEST__ENDPOINT=...), "
        "then these flags.",
    )
    serve.set_defaults(func=cmd_serve)
    add_settings_flags(serve)


def _add_simulate(command: Command) -> None:
    sim = command(
        "simulate", cmd_simulate, "a simulated detector: foam phantom scans pushed to the service"
    )
    sim.add_argument("--connect", default="tcp://127.0.0.1:5555", help="ingest endpoint")
    sim.add_argument("--rows", type=int, default=64, help="detector rows (slices)")
    sim.add_argument("--cols", type=int, default=256, help="detector columns")
    sim.add_argument("--angles", type=int, default=360, help="projections over [0, pi)")
    sim.add_argument(
        "--photons",
        type=float,
        default=1000.0,
        help="photons per pixel in the flat field (lower = noisier)",
    )
    sim.add_argument(
        "--rate",
        type=float,
        default=None,
        help="projections per second (default: as fast as the service takes them)",
    )
    sim.add_argument("--chunk", type=int, default=8, help="projections per message")
    sim.add_argument("--scans", type=int, default=1, help="scans to send")
    sim.add_argument("--scan-id", default="sim", help="scan id (numbered when --scans > 1)")
    sim.add_argument("--seed", type=int, default=0, help="phantom and noise seed")
    sim.add_argument(
        "--phantom",
        default="foam",
        choices=PHANTOM_FAMILIES,
        help="sample (workers.phantoms)",
    )
    sim.add_argument(
        "--attenuation", type=float, default=1.0, help="times the family's default attenuation"
    )
    sim.add_argument("--center", type=float, default=None, help="rotation axis (cols/2)")
    sim.add_argument(
        "--save-truth",
        type=Path,
        default=None,
        metavar="FILE.h5",
        help="keep the phantom volume in this HDF5 file",
    )
    _add_fault_flags(sim)
    _add_continuous_flags(sim)
    add_curve_flags(sim)


def _add_continuous_flags(sim: argparse.ArgumentParser) -> None:
    group = sim.add_argument_group("continuous rotation (protocol v1.1; docs/protocol.md)")
    group.add_argument(
        "--continuous",
        action="store_true",
        help="an open-ended rotation of a growing inclusion (--angles: projections a half-turn)",
    )
    group.add_argument("--turns", type=int, default=3, help="full turns to send")
    group.add_argument(
        "--window", type=int, default=None, help="projections per reconstruction (a half-turn)"
    )
    group.add_argument(
        "--every", type=int, default=None, help="projections between reconstructions (window)"
    )


def _add_fault_flags(sim: argparse.ArgumentParser) -> None:
    faults = sim.add_argument_group("detector faults (service.sim.simulate.Faults; off by default)")
    faults.add_argument(
        "--center-offset",
        type=float,
        default=0.0,
        metavar="PX",
        help="rotation axis this many pixels off the detector's middle, no centre declared",
    )
    faults.add_argument(
        "--rings",
        type=float,
        default=0.0,
        metavar="SPREAD",
        help="per-pixel gain spread the flats miss (e.g. 0.02): ring artifacts",
    )
    faults.add_argument(
        "--zingers",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of projection pixels saturated by zingers (e.g. 0.0002)",
    )
    faults.add_argument(
        "--half-acquisition",
        action="store_true",
        help="360-degree scan, axis near the detector's right edge, no centre declared",
    )


def _add_replay(command: Command) -> None:
    rep = command(
        "replay",
        cmd_replay,
        "push a recorded scan to the service: DXchange (/exchange/data, data_dark, data_white, "
        "theta) or NeXus NXtomo (compressed data sets need hdf5plugin)",
    )
    rep.add_argument("file", type=Path)
    rep.add_argument(
        "--entry", default=None, help="NXtomo: the entry to replay, when the file has several"
    )
    rep.add_argument("--connect", default="tcp://127.0.0.1:5555", help="ingest endpoint")
    rep.add_argument("--scan-id", default=None, help="scan id (default: the file's stem)")
    rep.add_argument("--chunk", type=int, default=8, help="projections per message")
    rep.add_argument("--rate", type=float, default=None, help="projections per second")
    rep.add_argument("--center", type=float, default=None, help="rotation axis (cols/2)")
    add_curve_flags(rep)


def _add_export_slices(command: Command) -> None:
    export = command(
        "export-slices",
        cmd_export_slices,
        "write an archive's slices (tomocast's NeXus archive, a `view --out` file, or an "
        "older /exchange archive) as float32 TIFF: one ImageJ/Fiji stack per scan",
    )
    export.add_argument("archive", type=Path)
    export.add_argument("--tiff", type=Path, required=True, help="directory for the TIFF files")
    export.add_argument(
        "--entry", default=None, help="the scan (NXentry) when the file holds several"
    )
    export.add_argument("--recon", action="store_true", help="the plain FBP slices instead")
    export.add_argument(
        "--separate",
        action="store_true",
        help="one TIFF per slice (DIR/<scan>/slice_00012.tif) instead of one stack",
    )


def _add_view(command: Command) -> None:
    view = command("view", cmd_view, "subscribe to the service and save what it publishes")
    view.add_argument("--connect", default="tcp://127.0.0.1:5556", help="publisher endpoint")
    view.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH.h5",
        help="write slices to this HDF5 file (one group per scan)",
    )
    view.add_argument(
        "--png",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each slice as an 8-bit PNG under DIR/<scan_id>/",
    )
    view.add_argument("--recon", action="store_true", help="also take plain FBP slices")
    view.add_argument(
        "--previews",
        action="store_true",
        help="also take previews (topic preview) while scans arrive: one line per preview, and "
        "with --web the preview (and the vertical xz cut) shown until the final slices come "
        "(previews are not saved)",
    )
    view.add_argument(
        "--scans",
        type=int,
        default=None,
        help="exit after this many scans have completed (default: run until ^C)",
    )
    view.add_argument(
        "--timeout", type=float, default=None, help="exit if nothing arrives for this many seconds"
    )
    _add_web_flags(view)
    add_curve_flags(view)


def _add_web_flags(view: argparse.ArgumentParser) -> None:
    """`view --web`: the live web viewer instead of files."""
    view.add_argument(
        "--web",
        action="store_true",
        help="serve a live web viewer (raw and "
        "denoised slices side by side) instead of writing files",
    )
    view.add_argument("--port", type=int, default=8080, help="--web: HTTP port (0: any free)")
    view.add_argument(
        "--host",
        default="127.0.0.1",
        help="--web: address to listen on (0.0.0.0 for other machines)",
    )
    view.add_argument(
        "--max-size",
        type=int,
        default=1024,
        metavar="PX",
        help="--web: slices are averaged down to at most PX pixels a side (lower it on slow links)",
    )


def _add_demo(command: Command) -> None:
    demo = command(
        "demo",
        cmd_demo,
        "service + simulated detector + viewer on this machine, with a quality and latency summary",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    demo.add_argument("--rows", type=int, default=64)
    demo.add_argument("--cols", type=int, default=256)
    demo.add_argument("--angles", type=int, default=360)
    demo.add_argument("--photons", type=float, default=300.0)
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    demo.add_argument("--model", type=Path, default=None, help="denoiser artifact")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument(
        "--phantom",
        default="foam",
        choices=PHANTOM_FAMILIES,
        help="sample (a phantom seed training never saw): cells is a family the shipped model "
        "was never trained on; the others are families it was trained on",
    )
    demo.add_argument(
        "--attenuation", type=float, default=1.0, help="times the family's default attenuation"
    )
    _add_fault_flags(demo)  # each fault asked for turns its repair on ([preprocess])


def add_curve_flags(parser: argparse.ArgumentParser) -> None:
    """--client-key and --server-key: a client's CURVE keys (`client_keys` reads them)."""
    group = parser.add_argument_group("CURVE (when the service has security.server_secret_key)")
    group.add_argument(
        "--client-key",
        type=Path,
        default=None,
        metavar="NAME.key_secret",
        help="this client's secret key file (tomocast keys generate)",
    )
    group.add_argument(
        "--server-key",
        type=Path,
        default=None,
        metavar="server.key",
        help="the service's public key file",
    )


def client_keys(args: argparse.Namespace) -> ClientKeys | None:
    """The CURVE keys given with --client-key/--server-key, or None."""
    from service.errors import ConfigError
    from service.security import ClientKeys

    if (args.client_key is None) != (args.server_key is None):
        raise ConfigError("give both --client-key and --server-key (CURVE), or neither")
    if args.client_key is None:
        return None
    return ClientKeys.from_files(args.client_key, args.server_key)


def main(argv: Sequence[str] | None = None) -> int:
    # The service runs ingest, FBP and denoise threads side by side; OpenMP's default spinning
    # barriers then make torch's multi-threaded kernels slower than one thread (figures:
    # docs/benchmarks.md, "Denoise engine (CPU)"). Must be set before torch is imported; an
    # explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":  # serve's level is a setting, set once they are loaded
        setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except TomocastError as exc:
        sys.stderr.write(f"tomocast {args.command}: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
