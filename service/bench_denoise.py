"""`tomocast bench denoise`: the denoise engine against the same weights run plainly.

Every variant runs the artifact's weights on the same stacks: foam FBP slices (low dose, like the
service's input) synthesised at each size and mapped into the network's units. `eager` is the
baseline the speed-ups are quoted against: the network's PyTorch class with the artifact's
weights, fp32, default (NCHW) layout. The others are what docs/benchmarks.md compares:

- `script`: the artifact's TorchScript module as loaded; `frozen`: torch.jit.freeze +
  optimize_for_inference (oneDNN conv fusion), channels_last;
- `compile`: torch.compile (inductor, freezing) of `eager`, channels_last; its compile time is
  reported as set-up;
- `engine-fp32`, `engine-bf16`, `engine-int8`, `engine` (auto): `workers.denoise.DenoiseEngine`
  (which also normalises, pads and crops).

Set-up is construction (load, quantization) plus the first call at each shape (compilation).

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
from collections.abc import Callable
from typing import Any

VARIANTS = ("eager", "script", "frozen", "compile", "engine-fp32", "engine-bf16", "engine-int8",
            "engine")
DEFAULT_VARIANTS = ("eager", "script", "frozen", "engine-fp32", "engine-int8")


def _add(parser: argparse.ArgumentParser, *flags: str, **options: Any) -> None:
    # `tomocast bench` shares some flags across its benches (--device, --json, ...): reuse those.
    with contextlib.suppress(argparse.ArgumentError):
        parser.add_argument(*flags, **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--sizes", type=int, nargs="+", default=[512], metavar="PX",
         help="slice sizes (PX x PX)")
    _add(parser, "--batches", type=int, nargs="+", default=[1, 4], metavar="N",
         help="slices per network call")
    _add(parser, "--repeat", type=int, default=5, help="timed rounds (min and median reported)")
    _add(parser, "--variants", default=",".join(DEFAULT_VARIANTS),
         help=f"comma-separated, first is the baseline; of: {', '.join(VARIANTS)}")
    _add(parser, "--model", default=None, help="artifact (default: the shipped model)")
    _add(parser, "--threads", type=int, default=None, help="torch threads (default: torch's)")
    _add(parser, "--memory-limit", type=int, default=None, metavar="BYTES",
         help="engine variants: activation memory per network call (tiles beyond it)")
    _add(parser, "--device", default="cpu", help="cpu, cuda or cuda:N")
    _add(parser, "--seed", type=int, default=0, help="phantom seed and round order")
    _add(parser, "--json", action="store_true", help="one JSON document instead of a table")


def run(args: argparse.Namespace) -> int:
    import torch

    from workers.denoise import default_artifact_path

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise SystemExit(f"bench denoise: unknown variant(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    path = args.model or default_artifact_path(device)
    load_before = os.getloadavg()[0]
    variants, setup = {}, {}
    for name in names:
        started = time.perf_counter()
        variants[name] = _build(name, path, device, args.memory_limit)
        setup[name] = time.perf_counter() - started
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            rows += _time_case(variants, setup, size, batch, device, args)
    report = {"bench": "denoise", "model": str(path), "machine": _machine(device, load_before),
              "command": _command(args), "results": rows}
    _emit(args, report, _table(report))
    return 0


def _build(name: str, path: Any, device: Any, memory_limit: int | None
           ) -> Callable[[Any], Any]:
    """`name`'s network: (batch, depth, H, W) stacks in the network's units -> (batch, H, W)."""
    import torch

    from models.artifact import load_artifact
    from models.networks import build_generator
    from workers.denoise import DenoiseEngine

    if name.startswith("engine"):
        precision = name.partition("-")[2] or "auto"
        engine = DenoiseEngine(path, device, precision=precision,
                               memory_limit_bytes=memory_limit)
        def run(x: torch.Tensor) -> torch.Tensor:
            # Network units in and out, as the other variants: map through this width's scale.
            offset, scale = engine.metadata.normalisation(x.shape[-1])
            return (engine.denoise(x * scale + offset) - offset) / scale

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
    compiled = torch.compile(network, dynamic=False)
    return lambda x: compiled(x.contiguous(memory_format=channels_last))[:, 0]


def _time_case(variants: dict[str, Callable[[Any], Any]], setup: dict[str, float], size: int,
               batch: int, device: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from workers.quantize import foam_stacks

    depth = _depth(args, device)
    stacks, _ = foam_stacks(depth, seed=args.seed, rows=max(depth, (batch + 3) // 4), size=size)
    x = stacks[:batch].to(device)
    outputs: dict[str, Any] = {}
    first_call: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for name, network in variants.items():
            started = time.perf_counter()
            outputs[name] = network(x).float().cpu()  # compiles (or captures) for this shape
            first_call[name] = time.perf_counter() - started
            network(x)
        order = list(variants)
        shuffle = random.Random(args.seed)
        for _ in range(args.repeat):
            shuffle.shuffle(order)
            for name in order:
                started = time.perf_counter()
                variants[name](x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - started) / batch)
    baseline = next(iter(variants))
    base_min, base_median = min(times[baseline]), statistics.median(times[baseline])
    rows = []
    for name, values in times.items():
        difference = outputs[name] - outputs[baseline]
        rows.append({"variant": name, "size": size, "batch": batch,
                     "ms_per_slice_min": 1e3 * min(values),
                     "ms_per_slice_median": 1e3 * statistics.median(values),
                     "speedup_min": base_min / min(values),
                     "speedup_median": base_median / statistics.median(values),
                     "setup_s": setup[name] + first_call[name],
                     "rms_vs_baseline": float(difference.pow(2).mean().sqrt()),
                     "max_vs_baseline": float(difference.abs().max())})
    return rows


def _depth(args: argparse.Namespace, device: Any) -> int:
    from models.artifact import load_artifact
    from workers.denoise import default_artifact_path

    return load_artifact(args.model or default_artifact_path(device), "cpu")[1].depth


def _machine(device: Any, load_before: float) -> dict[str, Any]:
    from service.bench import machine

    return machine(device, load_before)


def _command(args: argparse.Namespace) -> str:
    import shlex

    extra = [] if args.threads is None else ["--threads", str(args.threads)]
    extra += [] if args.memory_limit is None else ["--memory-limit", str(args.memory_limit)]
    extra += [] if args.model is None else ["--model", str(args.model)]
    return shlex.join(["tomocast", "bench", "denoise", "--sizes", *map(str, args.sizes),
                       "--batches", *map(str, args.batches), "--repeat", str(args.repeat),
                       "--variants", args.variants, "--device", args.device,
                       "--seed", str(args.seed), *extra])


def _table(report: dict[str, Any]) -> str:
    from service.bench import describe

    lines = [f"{report['command']}", f"{describe(report['machine'])}", "",
             "| size | batch | variant | ms/slice min | ms/slice median | speed-up (median) | "
             "speed-up (min) | set-up s | rms vs base | max vs base |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['size']} | {r['batch']} | {r['variant']} | {r['ms_per_slice_min']:.1f} | "
              f"{r['ms_per_slice_median']:.1f} | {r['speedup_median']:.2f}x | "
              f"{r['speedup_min']:.2f}x | {r['setup_s']:.1f} | {r['rms_vs_baseline']:.4f} | "
              f"{r['max_vs_baseline']:.4f} |" for r in report["results"]]
    return "\n".join(lines) + "\n"


def _emit(args: argparse.Namespace, report: dict[str, Any], table: str) -> None:
    from service.bench import emit

    emit(args, report, table)
