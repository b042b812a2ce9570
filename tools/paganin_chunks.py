"""Paganin phase retrieval's CPU time per frame when the projections come a few at a time, as
the service filters each chunk on arrival (`tomocast bench preprocess` times 4 frames a call).

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/paganin_chunks.py --sizes 512 1024 --chunks 1 4

Square frames of random transmission, 20 keV, 0.1 m, 1 um pixels, delta/beta 100 (the bench's
parameters: a kernel decay of 7 px); least of --repeat calls after a warm-up, the thread's CPU
time, one thread. `copy` returns a new array; `in place` filters the caller's own (where this
version of `paganin_filter` has `in_place`).
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable

import torch

from workers.preprocess.phase import paganin_filter

PHYSICS = (20.0, 0.1, 1e-6, 100.0)  # keV, m, m, delta/beta


def least(run: Callable[[], object], repeat: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        run()
        best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    in_place = "in_place" in inspect.signature(paganin_filter).parameters
    print("| cols | frames a call | copy, ms per frame | in place, ms per frame |")
    print("|---:|---:|---:|---:|")
    for cols in args.sizes:
        for count in args.chunks:
            frames = torch.rand(count, cols, cols) * 0.5 + 0.4
            copy = least(lambda f=frames: paganin_filter(f, *PHYSICS), args.repeat)
            own = (
                least(lambda f=frames: paganin_filter(f, *PHYSICS, in_place=True), args.repeat)
                if in_place
                else float("nan")
            )
            print(f"| {cols} | {count} | {copy / count * 1e3:.2f} | {own / count * 1e3:.2f} |")


if __name__ == "__main__":
    main()
