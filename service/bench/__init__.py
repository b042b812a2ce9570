"""`tomocast bench WHAT`: tomocast's compute stages timed against the codes the field uses.

Each WHAT is a module named in `BENCHES` with `add_arguments(parser)`, which fills the
`tomocast bench WHAT` sub-parser (its own flags and defaults, then the ones every bench shares:
`add_common_arguments`), and `run(args) -> int`. Its heavy imports (torch, the peers) stay
inside `run`, so building the parser, and `tomocast --help`, stays fast. Every bench reports the
same way: `command_line` spells out the flags that shape its figures, `machine` says what they
were measured on, `heading` opens its table with both, and `emit` prints the table or the JSON.
Another stage adds a module and a line to `BENCHES`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shlex
import sys
from collections.abc import Iterable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.cli import Command

# what -> the module that times it
BENCHES: MappingProxyType[str, str] = MappingProxyType(
    {
        "recon": "service.bench.recon",
        "denoise": "service.bench.denoise",
        "pipeline": "service.bench.pipeline",
        "preprocess": "service.bench.preprocess",
        "guard": "service.bench.guard",
        "cluster": "service.bench.cluster",
        "archive": "service.bench.archive",
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


THREADS_HELP = "torch threads (default: torch's)"


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    seed_help: str,
    device_help: str = "cpu, cuda or cuda:N",
    threads: bool = False,
) -> None:
    """The flags every bench shares, after its own: --threads (with `threads`: the bench sets
    torch's thread count, `set_threads`), --device, --seed and --json. A flag the parser has
    already (a parent parser's) is kept as it is."""
    flags: list[tuple[str, dict[str, Any]]] = []
    if threads:
        flags.append(("--threads", {"type": int, "default": None, "help": THREADS_HELP}))
    flags += [
        ("--device", {"default": "cpu", "help": device_help}),
        ("--seed", {"type": int, "default": 0, "help": seed_help}),
        ("--json", {"action": "store_true", "help": "one JSON document instead of a table"}),
    ]
    for flag, options in flags:
        with contextlib.suppress(argparse.ArgumentError):
            parser.add_argument(flag, **options)


def set_threads(args: argparse.Namespace) -> None:
    """torch's intra-op threads as --threads asks (left as they are without it)."""
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


def command_line(what: str, args: argparse.Namespace, flags: Iterable[str], **values: Any) -> str:
    """`tomocast bench WHAT` with the flags that shape its figures, spelled out in the order
    given: what docs/benchmarks.md quotes. A flag's value is `args`' (or `values`', by the
    flag's dest: `--peer-budget` is `peer_budget`); None or False leaves the flag out, True
    writes it alone, a list as its items, anything else as str() does."""
    words = ["tomocast", "bench", what]
    for flag in flags:
        dest = flag.lstrip("-").replace("-", "_")
        value = values[dest] if dest in values else getattr(args, dest)
        if value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, list | tuple):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


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


def heading(report: dict[str, Any]) -> str:
    """The first lines of every bench's table: the command, then the machine."""
    return f"{report['command']}\n{describe(report['machine'])}\n"


def emit(args: argparse.Namespace, report: dict[str, Any], table: str) -> None:
    """The report as JSON (--json) or the table, on stdout."""
    sys.stdout.write(json.dumps(report, indent=1) + "\n" if args.json else table)
