"""int8 on the CPU two ways, measured in one run: today's engine path (`workers.quantize`,
torch.ao.quantization FX, oneDNN u8s8, eager) against torchao's pt2e flow (torch.export ->
prepare_pt2e / convert_pt2e with X86InductorQuantizer's default config -> torch.compile, inductor
with freezing), both against eager fp32. The figures of docs/benchmarks.md, "int8 through
torchao's pt2e flow".

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/pt2e_int8.py --threads 1 --clock cpu
    PYTHONPATH=. OMP_NUM_THREADS=2 python tools/pt2e_int8.py --threads 2 --clock wall

torchao is not a tomocast dependency: `pip install torchao==0.18.0` (a CPU-only wheel, no
dependencies) before running it.

Same weights (the shipped default, `workers.denoise.default_artifact_path`), same inputs in the
network's units as `tomocast bench denoise`: foam FBP stacks at low dose (`foam_stacks`, seed
--seed) of --size px, depth from the artifact. Both int8 variants calibrate on what the engine
calibrates on (`foam_stacks(depth, CALIBRATION_SEED)`, min/max activations, per-channel
symmetric weights).

Speed: variants timed interleaved, in a shuffled order each round, --repeat rounds after one
untimed call; median and best per slice. `--clock cpu` is the calling thread's CPU time
(time.thread_time), which a neighbour's job on a shared machine does not inflate; one thread
only (worker threads' time would be missed). Set-up (wall seconds): building the variant
(load; quantize_int8's calibration and check; pt2e's export, calibration, conversion) plus its
first call at that shape (for pt2e, inductor's compilation of that shape). Inductor's cache is
a fresh directory unless --warm-cache, so the compile is what a first start on a machine costs.

Accuracy: rms and max of (variant - eager fp32) in units of the data range (the phantom spans
[0, 1]), on the timed stacks and per low-dose condition on the held-out foam phantom
(`EVALUATION_SEED + 11`) fed at the engine's input units (`calibration_units`), with PSNR
against the phantom: the conditions and inputs of
tests/unit/workers/test_denoise.py::test_int8_matches_fp32_within_tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# test_denoise.py's stated tolerances (where fp32 denoises to >= USEFUL_DB)
INT8_RMS, INT8_MAX, INT8_PSNR_LOSS_DB, USEFUL_DB = 0.01, 0.15, 0.5, 15.0
VARIANTS = ("eager-fp32", "engine-int8", "pt2e-int8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="default: cpu with one thread, wall otherwise",
    )
    parser.add_argument("--size", type=int, default=512, help="timed slices are SIZE x SIZE")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds (>= 5)")
    parser.add_argument("--accuracy-sizes", type=int, nargs="*", default=[256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's usual cache")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also split each int8 variant's time at the first batch into convolutions and the "
        "rest (torch.profiler, wall clock)",
    )
    args = parser.parse_args(argv)
    clock_name = args.clock or ("cpu" if args.threads == 1 else "wall")
    if clock_name == "cpu" and args.threads != 1:
        parser.error("--clock cpu times one thread only: use --threads 1 or --clock wall")
    if args.repeat < 5:
        parser.error("--repeat must be at least 5")
    if not args.warm_cache:  # read when inductor first writes, so before anything compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pt2e-inductor-")

    import torch

    torch.set_num_threads(args.threads)
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    load_before = os.getloadavg()[0]
    network, metadata = _network()
    builders = _builders(network, metadata.arch, metadata.depth)
    built, build_s, notes = {}, {}, {}
    for name, build in builders.items():
        started = time.perf_counter()
        built[name], notes[name] = build()
        build_s[name] = time.perf_counter() - started

    from workers.quantize import foam_stacks

    stacks, _ = foam_stacks(metadata.depth, seed=args.seed, rows=3, size=args.size)
    speed = [
        row
        for batch in args.batches
        for row in _time_case(built, build_s, stacks[:batch].contiguous(), clock, args)
    ]
    accuracy = [row for size in args.accuracy_sizes for row in _accuracy(built, metadata, size)]
    load_after = os.getloadavg()[0]
    print(_report(args, clock_name, speed, accuracy, notes, (load_before, load_after)))
    if args.profile:
        print(_profile(built, stacks[: args.batches[0]].contiguous()))
    return 0


def _network() -> tuple[Any, Any]:
    """The shipped default's weights in its Python class (eager fp32) and its metadata."""
    from models.artifact import load_artifact
    from models.networks import build_generator
    from workers.denoise import default_artifact_path

    module, metadata = load_artifact(default_artifact_path("cpu"), "cpu")
    network = build_generator(metadata.arch, metadata.depth).eval()
    network.load_state_dict(module.state_dict())
    return network, metadata


Network = Callable[[Any], Any]  # (batch, depth, H, W) network units -> (batch, H, W)


def _builders(network: Any, arch: str, depth: int) -> dict[str, Callable[[], tuple[Any, str]]]:
    import torch

    def eager() -> tuple[Any, str]:
        return (lambda x: network(x)[:, 0]), ""

    def engine_int8() -> tuple[Any, str]:
        from models.artifact import load_artifact
        from workers.denoise import default_artifact_path
        from workers.quantize import quantize_int8

        scripted, _ = load_artifact(default_artifact_path("cpu"), "cpu")
        quantized, check = quantize_int8(scripted, arch, depth)
        # as the engine feeds it (DenoiseEngine._to_network)
        return (
            lambda x: quantized(x.contiguous(memory_format=torch.channels_last))[:, 0],
            f"quantize_int8's own check rms {check.rms:.4f}",
        )

    def pt2e_int8() -> tuple[Any, str]:
        return _pt2e(network, depth)

    return {"eager-fp32": eager, "engine-int8": engine_int8, "pt2e-int8": pt2e_int8}


def _pt2e(network: Any, depth: int) -> tuple[Any, str]:
    """torchao's pt2e int8: export (batch, H and W dynamic, H and W multiples of 8), prepare
    with X86InductorQuantizer's default config, calibrate on the engine's calibration stacks,
    convert; compiled (inductor, freezing) per input shape at its first call."""
    import torch
    import torch._inductor.config as inductor
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from workers.quantize import CALIBRATION_SEED, foam_stacks

    calibration, _ = foam_stacks(depth, CALIBRATION_SEED)
    started = time.perf_counter()
    shapes = {
        "x": {
            0: Dim("batch", min=1, max=1024),
            2: 8 * Dim("height8", min=1, max=2048),
            3: 8 * Dim("width8", min=1, max=2048),
        }
    }
    exported = torch.export.export(
        copy.deepcopy(network), (calibration[:2],), dynamic_shapes=shapes
    ).module()
    export_s = time.perf_counter() - started
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(calibration)
    converted = convert_pt2e(prepared)
    calibrate_s = time.perf_counter() - started - export_s
    inductor.freezing = True  # weights become constants: prepacked for oneDNN's qconv
    compiled: dict[tuple[int, ...], Any] = {}

    def run(x: Any) -> Any:
        # one compiled graph per shape, static (dynamic=False), as a service meeting that
        # (batch, H, W) would hold it
        key = tuple(x.shape)
        if key not in compiled:
            compiled[key] = torch.compile(converted, dynamic=False)
        return compiled[key](x)[:, 0]

    return run, f"export {export_s:.1f} s, prepare+calibrate+convert {calibrate_s:.1f} s"


def _time_case(
    built: dict[str, Network],
    build_s: dict[str, float],
    x: Any,
    clock: Callable[[], float],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    import torch

    outputs, first_s = {}, {}
    with torch.no_grad():
        for name, network in built.items():
            started = time.perf_counter()
            outputs[name] = network(x)
            first_s[name] = time.perf_counter() - started
            network(x)
        times: dict[str, list[float]] = {name: [] for name in built}
        order = list(built)
        shuffle = random.Random(args.seed)
        for _ in range(args.repeat):
            shuffle.shuffle(order)
            for name in order:
                started = clock()
                built[name](x)
                times[name].append((clock() - started) / x.shape[0])
    base = statistics.median(times["eager-fp32"])
    rows = []
    for name, values in times.items():
        difference = outputs[name] - outputs["eager-fp32"]
        rows.append(
            {
                "batch": x.shape[0],
                "variant": name,
                "setup_s": build_s[name] + first_s[name],
                "first_call_s": first_s[name],
                "median_ms": 1e3 * statistics.median(values),
                "best_ms": 1e3 * min(values),
                "speedup": base / statistics.median(values),
                "rms": float(difference.pow(2).mean().sqrt()),
                "max": float(difference.abs().max()),
            }
        )
    return rows


def _accuracy(built: dict[str, Network], metadata: Any, size: int) -> list[dict[str, Any]]:
    """Per condition on the held-out phantom at the engine's input units: PSNR against the
    phantom and (variant - fp32) in units of the phantom's range, as test_denoise asserts."""
    import torch

    from models.training.metrics import psnr
    from workers.lowdose import EVALUATION_SEED
    from workers.quantize import CONDITIONS, calibration_units, foam_stacks

    stacks, truth = foam_stacks(metadata.depth, seed=EVALUATION_SEED + 11, rows=3, size=size)
    units = calibration_units(metadata.reference_level, metadata.input_scale)
    with torch.no_grad():
        out = {name: network(stacks * units) / units for name, network in built.items()}
    rows = []
    parts = torch.arange(len(stacks)).chunk(len(CONDITIONS))  # one condition each
    for (sparse, photons), part in zip(CONDITIONS, parts, strict=True):
        row: dict[str, Any] = {"size": size, "condition": _condition(sparse, photons)}
        reference = float(psnr(out["eager-fp32"][part], truth[part], 1.0).mean())
        for name in VARIANTS:
            difference = out[name][part] - out["eager-fp32"][part]
            row[name] = {
                "psnr": float(psnr(out[name][part], truth[part], 1.0).mean()),
                "rms": float(difference.pow(2).mean().sqrt()),
                "max": float(difference.abs().max()),
            }
            loss = reference - row[name]["psnr"]
            row[name]["ok"] = loss <= INT8_PSNR_LOSS_DB and (
                reference < USEFUL_DB
                or (row[name]["rms"] <= INT8_RMS and row[name]["max"] <= INT8_MAX)
            )
        rows.append(row)
    return rows


CONVOLUTIONS = ("onednn::qconv_pointwise", "quantized::conv2d_relu", "quantized::conv2d")


def _profile(built: dict[str, Network], x: Any) -> str:
    """Where each int8 variant's time goes: oneDNN's int8 convolutions against everything else
    (for pt2e mostly inductor's generated kernels: quantize, bilinear upsample, cat)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    lines = [
        "",
        f"Profile (torch.profiler, wall clock, batch {x.shape[0]}, one call after the timed ones):",
        "",
        "| variant | total ms | int8 convolutions ms | everything else ms | largest other ops |",
        "|---|---:|---:|---:|---|",
    ]
    for name in ("engine-int8", "pt2e-int8"):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            built[name](x)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        conv = sum(e.self_cpu_time_total for e in events if e.key in CONVOLUTIONS) / 1e3
        others = sorted(
            (e for e in events if e.key not in CONVOLUTIONS),
            key=lambda e: e.self_cpu_time_total,
            reverse=True,
        )[:3]
        largest = ", ".join(
            f"{e.key.strip('# ')} {e.self_cpu_time_total / 1e3:.0f}" for e in others
        )
        lines.append(
            f"| {name} | {total:.0f} | {conv:.0f} ({conv / total:.0%}) | {total - conv:.0f} "
            f"({(total - conv) / total:.0%}) | {largest} |"
        )
    return "\n".join(lines)


def _condition(sparse: int, photons: float | None) -> str:
    views = "" if sparse == 1 else f"1/{sparse} views"
    dose = "" if photons is None else f"{photons:,.0f} photons"
    return ", ".join(part for part in (views, dose) if part)


def _machine(threads: int, clock: str, loads: tuple[float, float]) -> str:
    import torch
    import torchao

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    return (
        f"{model}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"torchao {torchao.__version__}; "
        f"{threads} thread(s); clock {clock}; 1-min load average {loads[0]:.2f} before, "
        f"{loads[1]:.2f} after"
    )


def _report(
    args: argparse.Namespace,
    clock: str,
    speed: list[dict[str, Any]],
    accuracy: list[dict[str, Any]],
    notes: dict[str, str],
    loads: tuple[float, float],
) -> str:
    flags = shlex.join(sys.argv[1:])
    command = f"PYTHONPATH=. OMP_NUM_THREADS={args.threads} python tools/pt2e_int8.py {flags}"
    lines = [
        "```",
        command,
        "```",
        "",
        f"Machine: {_machine(args.threads, clock, loads)}. "
        f"Inductor cache: {'warm' if args.warm_cache else 'fresh (cold start)'}.",
        "",
        f"{args.size} x {args.size}, depth from the artifact; ms per slice on the {clock} clock, "
        f"{args.repeat} rounds; set-up in wall seconds (build + first call at that shape).",
        "",
        "| batch | variant | set-up s | first call s | ms/slice median | ms/slice best | "
        "speed vs eager fp32 (median) | rms vs fp32 | max vs fp32 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['variant']} | {r['setup_s']:.1f} | {r['first_call_s']:.1f} | "
        f"{r['median_ms']:.0f} | {r['best_ms']:.0f} | {r['speedup']:.2f}x | {r['rms']:.4f} | "
        f"{r['max']:.3f} |"
        for r in speed
    ]
    lines += ["", "Build: " + "; ".join(f"{k}: {v}" for k, v in notes.items() if v), ""]
    if accuracy:
        lines += [
            "Held-out foam phantom (EVALUATION_SEED + 11) at the engine's input units; "
            "(variant - fp32) in units of the data range; 'ok': within test_denoise's "
            f"tolerance (PSNR loss <= {INT8_PSNR_LOSS_DB} dB; where fp32 >= {USEFUL_DB:.0f} dB "
            f"also rms <= {INT8_RMS}, max <= {INT8_MAX}).",
            "",
            "| size | condition | PSNR fp32 dB | PSNR engine-int8 | PSNR pt2e-int8 | "
            "engine-int8 rms / max | pt2e-int8 rms / max | engine ok | pt2e ok |",
            "|---:|---|---:|---:|---:|---:|---:|:-:|:-:|",
        ]
        for r in accuracy:
            e, p = r["engine-int8"], r["pt2e-int8"]
            lines.append(
                f"| {r['size']} | {r['condition']} | {r['eager-fp32']['psnr']:.2f} | "
                f"{e['psnr']:.2f} | {p['psnr']:.2f} | {e['rms']:.4f} / {e['max']:.3f} | "
                f"{p['rms']:.4f} / {p['max']:.3f} | {'yes' if e['ok'] else 'NO'} | "
                f"{'yes' if p['ok'] else 'NO'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
