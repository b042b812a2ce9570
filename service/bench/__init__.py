"""`tomocast bench WHAT`: tomocast's compute stages timed against the codes the field uses.

Each WHAT is a module named in `BENCHES` with `add_arguments(parser)`, which fills the
`tomocast bench WHAT` sub-parser (its own flags and defaults), and `run(args) -> int`. Its heavy
imports (torch, the peers) stay inside `run`, so building the parser, and `tomocast --help`,
stays fast. `bench recon` is `service.bench.recon`; another stage adds a module and a line to
`BENCHES`, and reports through `machine`, `describe` and `emit` below like recon does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]

# what -> the module that times it
BENCHES: MappingProxyType[str, str] = MappingProxyType(
    {
        "recon": "service.bench.recon",
        "denoise": "service.bench.denoise",
        "pipeline": "service.bench.pipeline",
    }
)


def add_commands(command: Command) -> None:
    """Add `bench WHAT` to the `tomocast` parser."""
    p = command(
        "bench",
        cmd_bench,
        "time tomocast's stages against the reference codes "
        "importable here (ms/slice, error vs a reference, ratios)",
    )
    whats = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what, name in BENCHES.items():
        module = importlib.import_module(name)
        summary = (module.__doc__ or what).strip().splitlines()[0]
        sub = whats.add_parser(
            what,
            help=summary,
            description=summary,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        # also accepted after WHAT; SUPPRESS keeps `bench --log-level X WHAT` working
        sub.add_argument(
            "--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
        )
        module.add_arguments(sub)


def cmd_bench(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHES[args.what]).run(args))


def machine(device: Any, load_before: float) -> dict[str, Any]:
    """What the figures were measured on, and how busy it was (1-minute load average before
    and after: on a shared machine, the noise to read them with)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    found = {
        "cpu": cpu,
        "cpus": cpus,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    return found


def describe(found: dict[str, Any]) -> str:
    """`machine`'s answer as one line for a table's heading."""
    gpu = f", {found['gpu']}" if "gpu" in found else ""
    return (
        f"{found['cpu']}, {found['cpus']} CPUs, torch {found['torch']} "
        f"({found['torch_threads']} threads), device {found['device']}{gpu}; 1-min load "
        f"average {found['load_average_before']} before, {found['load_average_after']} after"
    )


def emit(args: argparse.Namespace, report: dict[str, Any], table: str) -> None:
    """The report as JSON (--json) or the table, on stdout."""
    sys.stdout.write(json.dumps(report, indent=1) + "\n" if args.json else table)
