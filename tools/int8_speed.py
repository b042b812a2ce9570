"""The engine's int8 as quantized by `workers/quantize.py` at earlier commits and in the working
tree, timed in one process, interleaved, beside eager fp32 (the ratio `tomocast bench denoise`
reports): how a change to the quantization moves int8's speed, on the same weights and the same
machine state. Prints a markdown table; also the PSNR each int8 loses against fp32 on the
held-out foam phantom of tools/int8_accuracy.py (1/8 views, no noise).

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/int8_speed.py --against 2ebd8d6 b83fbc8 \
        --sizes 256 512

Each commit's `workers/quantize.py` is read with `git show` and imported as its own module; its
`quantize_int8` replaces the engine's for that engine's construction only. The clock is the
thread's CPU time (other jobs on a shared machine stretch elapsed time, not this).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import workers.denoise as denoise
from models.tomogan import TomoGANGenerator
from models.training.metrics import psnr
from workers.lowdose import EVALUATION_SEED
from workers.quantize import calibration_units, foam_stacks


def _quantize_at(commit: str, directory: Path) -> object:
    source = subprocess.run(
        ["git", "show", f"{commit}:workers/quantize.py"], check=True, capture_output=True, text=True
    ).stdout
    path = directory / f"quantize_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"quantize_{commit}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.quantize_int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", nargs="*", default=[], help="commits to compare")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--model", default=None, help="artifact (default: the service's)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's top operators of each int8 engine at each size",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    working_tree = denoise.quantize_int8
    engines: dict[str, denoise.DenoiseEngine] = {}
    with tempfile.TemporaryDirectory() as directory:
        for commit in args.against:
            denoise.quantize_int8 = _quantize_at(commit, Path(directory))  # type: ignore[assignment]
            denoise.clear_int8_cache()  # one artifact: each engine quantizes with its own file
            engines[commit] = denoise.load_denoiser(args.model, "cpu", precision="int8")
        denoise.quantize_int8 = working_tree
        denoise.clear_int8_cache()
        engines["working tree"] = denoise.load_denoiser(args.model, "cpu", precision="int8")
    fp32 = denoise.load_denoiser(args.model, "cpu", precision="fp32")
    for name, engine in engines.items():
        if engine.precision != "int8":
            raise SystemExit(f"{name}: int8 refused, the engine fell back to {engine.precision}")
    module, metadata = fp32._module, fp32.metadata  # the eager baseline: the artifact's weights
    eager = TomoGANGenerator(metadata.depth).eval()
    eager.load_state_dict(module.state_dict())
    print(f"{metadata.name}, one thread, batch {args.batch}, {args.repeat} rounds, CPU time")
    print("| px | variant | ms/slice min | median | vs eager (median) | dB lost, 1/8 views |")
    print("|---:|---|---:|---:|---:|---:|")
    offset, scale = metadata.scaled(1.0)
    units = calibration_units(metadata.reference_level, metadata.input_scale)
    for size in args.sizes:
        stacks, truth = foam_stacks(3, seed=EVALUATION_SEED + 11, rows=3, size=size)
        stacks, truth = stacks[:3], truth[:3]  # the first condition: 1/8 views, no noise
        fed = offset + scale * stacks * units
        denoised = (fp32.denoise(fed, scale=1.0) - offset) / scale / units
        reference = float(psnr(denoised, truth, 1.0).mean())
        x = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        runs: dict[str, Callable[[torch.Tensor], object]] = {"eager fp32": eager}
        runs |= {name: partial(e.denoise, scale=1.0) for name, e in engines.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            for run in runs.values():  # warm-up at this shape
                run(x)
            for _ in range(args.repeat):
                for name, run in runs.items():
                    start = time.thread_time()
                    run(x)
                    times[name].append((time.thread_time() - start) / args.batch * 1e3)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name, engine in engines.items():
                with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                    engine.denoise(x, scale=1.0)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
                print(f"\n{size} px, {name}:\n{table}")
        base = statistics.median(times["eager fp32"])
        for name, measured in times.items():
            lost = ""
            if name in engines:
                out = (engines[name].denoise(fed, scale=1.0) - offset) / scale / units
                lost = f"{reference - float(psnr(out, truth, 1.0).mean()):.2f}"
            median = statistics.median(measured)
            print(
                f"| {size} | {name} | {min(measured):.1f} | {median:.1f} | "
                f"{base / median:.2f}x | {lost} |"
            )


if __name__ == "__main__":
    main()
