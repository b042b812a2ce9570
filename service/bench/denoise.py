"""`tomocast bench denoise`: the denoise engine against the same weights run plainly.

Every variant runs the artifact's weights on the same stacks: foam FBP slices (low dose, like the
service's input) synthesised at each size and mapped into the network's units. `eager` is the
baseline the speed-ups are quoted against: the network's PyTorch class with the artifact's
weights, fp32, default (NCHW) layout. The others are what docs/benchmarks.md compares:

- `script`: the artifact's TorchScript module as loaded; `frozen`: torch.jit.freeze +
  optimize_for_inference (oneDNN conv fusion), channels_last;
- `compile`: torch.compile (inductor, freezing) of `eager`, channels_last; its compile time is
  reported as set-up. It is compiled for each (size, batch) case (dynamic=False), more shapes
  than dynamo's default recompile limit in a big run, after which it would silently run
  eager: the limit is raised for the run to hold every case, and the report says so;
- `engine-fp32`, `engine-fp16`, `engine-bf16`, `engine-int8`, `engine` (auto):
  `workers.denoise.DenoiseEngine` (which also normalises, pads and crops).

Set-up is construction (load, quantization) plus the first call at each shape (compilation).
The phantom stacks are rendered once per size and shared by its batches. A variant that runs
out of device memory in a case is reported as "out of memory" there, and the run goes on.

Variants are timed interleaved, in a shuffled order each round, so that a neighbour's load on a
shared machine spreads over all of them; min and median per slice are reported. Accuracy is the
rms and max of (variant - eager) in units of the data range.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from service.bench import add_common_arguments, command_line, emit, heading, machine, set_threads

VARIANTS = (
    "eager",
    "script",
    "frozen",
    "compile",
    "engine-fp32",
    "engine-fp16",
    "engine-bf16",
    "engine-int8",
    "engine",
)
OUT_OF_MEMORY = "out of memory"
DEFAULT_VARIANTS = ("eager", "script", "frozen", "engine-fp32", "engine-int8")
# variant -> its network: (batch, depth, H, W) stacks in the network's units -> (batch, H, W)
Variants = dict[str, Callable[[Any], Any]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[512], metavar="PX", help="slice sizes (PX x PX)"
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 4],
        metavar="N",
        help="slices per network call",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed rounds (min and median reported)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, first is the baseline; of: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--model", default=None, help="artifact (default: the shipped model)")
    parser.add_argument(
        "--memory-limit",
        type=int,
        default=None,
        metavar="BYTES",
        help="engine variants: activation memory per network call (tiles beyond it)",
    )
    add_common_arguments(parser, seed_help="phantom seed and round order", threads=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from workers.denoise import default_artifact_path

    set_threads(args)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise SystemExit(
            f"bench denoise: unknown variant(s) {', '.join(unknown)}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    device = torch.device(args.device)
    path = args.model or default_artifact_path(device)
    depth = _depth(path)
    load_before = os.getloadavg()[0]
    variants, setup = {}, {}
    for name in names:
        started = time.perf_counter()
        variants[name] = _build(name, path, device, args.memory_limit)
        setup[name] = time.perf_counter() - started
    cases = len(args.sizes) * len(args.batches)
    compiling, note = (
        _recompile_limit(cases) if "compile" in variants else (contextlib.nullcontext(), None)
    )
    with compiling:
        rows = [
            row
            for stacks in _cases(depth, args)
            for row in _time_case(variants, setup, stacks, device, args)
        ]
    report = {
        "bench": "denoise",
        "model": str(path),
        "machine": machine(device, load_before),
        "command": _command(args),
        "results": rows,
    }
    if note is not None:
        report["compile"] = note
    emit(args, report, _table(report))
    return 0


def _cases(depth: int, args: argparse.Namespace) -> Iterator[Any]:
    """The stacks of every (size, batch) case, (batch, depth, size, size)."""
    from workers.quantize import foam_stacks

    for size in args.sizes:
        # one render per size (a CPU FBP of the phantoms, slow at large sizes), enough stacks
        # for the largest batch
        stacks, _ = foam_stacks(
            depth, seed=args.seed, rows=max(depth, (max(args.batches) + 3) // 4), size=size
        )
        for batch in args.batches:
            yield stacks[:batch]


def _recompile_limit(cases: int) -> tuple[contextlib.AbstractContextManager[Any], str]:
    """A context that lets dynamo keep one graph per case, and what it did in words. Dynamo
    keeps its graphs on the forward's code object, which every torch.compile of the network
    shares, so a fresh compile per case would count against the same limit: raising it is
    what keeps the big shapes compiled. The limit is `recompile_limit` in current torch (2.13:
    `cache_size_limit` is its alias), `cache_size_limit` in older ones: whichever exists."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    before = int(getattr(dynamo, name))
    limit = max(before, cases)  # the shipped networks compile to one graph, no breaks
    return (
        dynamo.patch({name: limit}),
        f"compiled once per (size, batch) case, dynamic=False: {cases} cases, "
        f"torch._dynamo.config.{name} {before} -> {limit} for this run",
    )


def _build(name: str, path: Any, device: Any, memory_limit: int | None) -> Callable[[Any], Any]:
    """`name`'s network: (batch, depth, H, W) stacks in the network's units -> (batch, H, W)."""
    import torch

    from models.artifact import load_artifact
    from models.networks import build_generator
    from workers.denoise import DenoiseEngine, clear_int8_cache

    if name.startswith("engine"):
        precision = name.partition("-")[2] or "auto"
        clear_int8_cache()  # each variant's set-up as a fresh process pays it
        engine = DenoiseEngine(path, device, precision=precision, memory_limit_bytes=memory_limit)

        def run(x: torch.Tensor) -> torch.Tensor:
            # Network units in and out, as the other variants: the engine at the training level
            offset, scale = engine.metadata.scaled(1.0)
            return (engine.denoise(x * scale + offset, scale=1.0) - offset) / scale

        return run
    module, metadata = load_artifact(path, device)
    channels_last = torch.channels_last
    if name == "script":
        return lambda x: module(x)[:, 0]
    if name == "frozen":
        with warnings.catch_warnings():  # TorchScript is deprecated; kept as a measured option
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(module))
        return lambda x: frozen(x.contiguous(memory_format=channels_last))[:, 0]
    network = build_generator(metadata.arch, metadata.depth).to(device).eval()
    network.load_state_dict(module.state_dict())
    if name == "eager":
        return lambda x: network(x)[:, 0]
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights become constants: prepacked for oneDNN
    network = network.to(memory_format=channels_last)  # type: ignore[call-overload]
    compiled: Callable[[Any], Any] = torch.compile(network, dynamic=False)
    return lambda x: compiled(x.contiguous(memory_format=channels_last))[:, 0]


def _time_case(
    variants: Variants,
    setup: dict[str, float],
    stacks: Any,
    device: Any,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Time every variant on `stacks` (batch, depth, size, size): a row per variant. One that
    runs out of device memory gets a row saying so, and the others are timed without it."""
    import torch

    x = stacks.to(device)
    failed: set[str] = set()
    with torch.inference_mode():
        outputs, first_call = _first_calls(variants, x, device, failed)
        times = _timed_rounds(variants, x, device, failed, args)
    batch, size = stacks.shape[0], stacks.shape[-1]
    baseline = next(iter(variants))
    rows = []
    for name, values in times.items():
        row: dict[str, Any] = {"variant": name, "size": size, "batch": batch}
        if name in failed:
            rows.append({**row, "error": OUT_OF_MEMORY})
            continue
        reference = None if baseline in failed else (times[baseline], outputs[baseline])
        row.update(
            {
                "ms_per_slice_min": 1e3 * min(values),
                "ms_per_slice_median": 1e3 * statistics.median(values),
                "setup_s": setup[name] + first_call[name],
                **_versus(values, outputs[name], reference),
            }
        )
        rows.append(row)
    return rows


def _first_calls(
    variants: Variants, x: Any, device: Any, failed: set[str]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Each variant's output on `x` (on the CPU, for the accuracy columns) and the seconds of
    its first call, which compiles or captures this shape; then one more untimed call."""
    outputs: dict[str, Any] = {}
    first_call: dict[str, float] = {}
    for name, network in variants.items():
        try:
            started = time.perf_counter()
            outputs[name] = network(x).float().cpu()
            first_call[name] = time.perf_counter() - started
            network(x)
        except RuntimeError as exc:
            _out_of_memory(exc, device, failed, name)
    return outputs, first_call


def _timed_rounds(
    variants: Variants,
    x: Any,
    device: Any,
    failed: set[str],
    args: argparse.Namespace,
) -> dict[str, list[float]]:
    """Seconds per slice of each variant in each of `args.repeat` rounds, the variants in a
    shuffled order each round; one that runs out of memory leaves the rounds."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in variants}
    order = [name for name in variants if name not in failed]
    shuffle = random.Random(args.seed)
    for _ in range(args.repeat):
        shuffle.shuffle(order)
        for name in list(order):
            try:
                started = time.perf_counter()
                variants[name](x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - started) / x.shape[0])
            except RuntimeError as exc:
                _out_of_memory(exc, device, failed, name)
                order.remove(name)
    return times


def _versus(
    values: list[float], output: Any, baseline: tuple[list[float], Any] | None
) -> dict[str, float | None]:
    """A variant against the baseline's (times, output): speed-ups and the difference in
    units of the data range; all None without a baseline to compare with."""
    if baseline is None:
        return dict.fromkeys(
            ("speedup_min", "speedup_median", "rms_vs_baseline", "max_vs_baseline")
        )
    base, reference = baseline
    difference = output - reference
    return {
        "speedup_min": min(base) / min(values),
        "speedup_median": statistics.median(base) / statistics.median(values),
        "rms_vs_baseline": float(difference.pow(2).mean().sqrt()),
        "max_vs_baseline": float(difference.abs().max()),
    }


def _out_of_memory(exc: RuntimeError, device: Any, failed: set[str], name: str) -> None:
    """Record `name` as out of memory if `exc` is that, else re-raise it. TorchScript's
    interpreter re-raises the allocator's torch.cuda.OutOfMemoryError as a plain RuntimeError
    (pytorch/pytorch#148642), so for the artifact's variants only the message tells; matching
    text is confined to here."""
    import torch

    if not isinstance(exc, torch.cuda.OutOfMemoryError) and "out of memory" not in str(exc):
        raise exc
    failed.add(name)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the failed call left cached goes back to the next case


def _depth(path: Any) -> int:
    from models.artifact import load_artifact

    return load_artifact(path, "cpu")[1].depth


def _command(args: argparse.Namespace) -> str:
    flags = ["--sizes", "--batches", "--repeat", "--variants", "--device", "--seed"]
    return command_line("denoise", args, [*flags, "--threads", "--memory-limit", "--model"])


def _table(report: dict[str, Any]) -> str:
    lines = [
        heading(report),
        "| size | batch | variant | ms/slice min | ms/slice median | speed-up (median) | "
        "speed-up (min) | set-up s | rms vs base | max vs base |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['size']} | {r['batch']} | {r['variant']} | " + " | ".join(_cells(r)) + " |"
        for r in report["results"]
    ]
    if "compile" in report:
        lines += ["", f"compile: {report['compile']}"]
    return "\n".join(lines) + "\n"


def _cells(row: dict[str, Any]) -> list[str]:
    """The table cells after the variant: "out of memory" in each for a variant that ran out,
    "-" where there is no baseline to compare with."""
    if "error" in row:
        return [row["error"]] * 7

    def cell(key: str, form: str, unit: str = "") -> str:
        return "-" if row[key] is None else format(row[key], form) + unit

    return [
        cell("ms_per_slice_min", ".1f"),
        cell("ms_per_slice_median", ".1f"),
        cell("speedup_median", ".2f", "x"),
        cell("speedup_min", ".2f", "x"),
        cell("setup_s", ".1f"),
        cell("rms_vs_baseline", ".4f"),
        cell("max_vs_baseline", ".4f"),
    ]
