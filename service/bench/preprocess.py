"""The preprocessing chain's cost per slice next to FBP's, measured in the same run.

Each step of `workers.preprocess` (flat-field and -log, zingers, stripe removal, Paganin phase
retrieval, the rotation-centre estimate) is timed on a simulated raw 16-bit foam scan of the
given width, on the given device, beside the service's FBP ("auto") on the same data
(`workers.preprocess.cost.measure_costs`: least of --repeat runs after a warm-up; `--clock cpu`
times the thread's CPU time instead of the elapsed time, for a shared machine). The ratio
column is the step's time over FBP's per slice: what the step adds to the reconstruct path.
The centre is estimated once per scan, so its row is per estimate, not per slice.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Any

from service.bench import add_common_arguments, command_line, emit, heading, machine, set_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tomocast bench preprocess`."""
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[512, 1024],
        metavar="COLS",
        help="detector columns",
    )
    parser.add_argument(
        "--angles", type=int, default=None, help="projections (default: 1.5 x COLS)"
    )
    parser.add_argument("--rows", type=int, default=8, help="detector rows timed at once")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per step (least kept)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: the timing thread's CPU time, which other jobs on a "
        "shared machine do not inflate (with --threads 1 the two agree on an idle machine; "
        "CPU device only)",
    )
    add_common_arguments(parser, seed_help="phantom and noise seed", threads=True)


def _command(args: argparse.Namespace) -> str:
    flags = ["--sizes", "--angles", "--rows", "--repeat", "--clock", "--threads", "--device"]
    flags.append("--seed")
    return command_line("preprocess", args, flags)


def _table(results: list[dict[str, Any]]) -> str:
    lines = ["| cols | step | seconds | per | x FBP per slice |", "|---:|---|---:|---|---:|"]
    for row in results:
        lines.append(
            f"| {row['cols']} | {row['step']} | {row['seconds'] * 1e3:.2f} ms | {row['per']} "
            f"| {row['fbp_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """`tomocast bench preprocess`: see the module doc."""
    if min(args.sizes) < 16 or min(args.rows, args.repeat, args.angles or 2) < 1:
        sys.stderr.write(
            "tomocast bench preprocess: --sizes must be >= 16, --rows, --repeat, --angles >= 1\n"
        )
        return 2
    if args.clock == "cpu" and not str(args.device).startswith("cpu"):
        sys.stderr.write("tomocast bench preprocess: --clock cpu times the CPU device only\n")
        return 2
    import torch

    from workers.preprocess.cost import measure_costs

    set_threads(args)
    load_before, device = os.getloadavg()[0], torch.device(args.device)
    results: list[dict[str, Any]] = []
    for cols in args.sizes:
        costs = measure_costs(
            cols,
            args.angles,
            args.rows,
            device,
            repeat=args.repeat,
            seed=args.seed,
            clock=args.clock,
        )
        results += [{"cols": cols, **asdict(cost)} for cost in costs]
    report = {
        "command": _command(args),
        "machine": machine(device, load_before),
        "rows": args.rows,
        "clock": args.clock,
        "phantom": "foam, raw 16-bit counts",
        "results": results,
    }
    angles = "1.5 x cols" if args.angles is None else str(args.angles)
    about = (
        f"{args.rows} rows, angles = {angles}; FBP = the service's choice (auto); "
        f"clock: {args.clock}\n\n"
    )
    emit(args, report, heading(report) + about + _table(results))
    return 0
