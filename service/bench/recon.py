"""FBP: tomocast's two methods against every peer importable in the same run.

At each --sizes columns x 1.5 as many angles (or --angles), on a foam phantom with exact line
integrals (`workers.phantom`), it times tomocast's two FBP methods (direct and gridding) and the
peers it can import (scikit-image's iradon, astra-toolbox's CPU FBP, TomoPy's gridrec), and
reports ms/slice (min and median), the first call's seconds (set-up included), the relative L2
error against the phantom inside the reconstruction circle, and each engine's median as a
multiple of ours (the method `workers.recon.AutoFBP` picks there). Slow peers reconstruct one
slice at a time until --peer-budget is spent, and say how many they timed.

The row `tomocast recon()` is the TomoPy-style call a user's script makes,
`workers.recon.recon(tomo, theta, device=...)` on numpy (angles, rows, cols) in and out, called
again on the same geometry (its session keeps the reconstructor): its ratio is that call's time
per slice over the service path's (the reconstructor on tensors, geometry prepared).

`--clock cpu` times the calling thread's CPU time instead of the elapsed time, for a shared
machine whose other jobs scramble elapsed times (CPU device, with `OMP_NUM_THREADS=1`: work on
other threads, such as TomoPy's, goes uncounted).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from service.bench import add_common_arguments, command_line, emit, heading, machine

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("tomocast.bench")
_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
# What the timings read; set once by `run` from --clock (a bench is one command, one thread).
_now: Callable[[], float] = time.perf_counter


@dataclass
class Timing:
    """One engine at one size. Times are per slice; `ratio` is the engine's median over ours."""

    engine: str
    cols: int
    angles: int
    slices: int  # slices timed per repeat
    repeats: int
    ms_per_slice_min: float
    ms_per_slice_median: float
    first_call_s: float | None  # set-up included (geometry, matrices, peer objects)
    rel_error: float
    ours: bool = False
    ratio: float | None = None
    note: str = ""


@dataclass(frozen=True)
class _Case:
    """One size: the phantom's line integrals and slices in our geometry, and in scikit-image's
    (axis on detector column and image pixel cols // 2; the same as ours for odd cols)."""

    theta: np.ndarray
    sinograms: np.ndarray  # (batch, angles, cols) float32
    truth: np.ndarray  # (batch, cols, cols) float32
    skimage_sinograms: np.ndarray
    skimage_truth: np.ndarray
    inside: np.ndarray  # (cols, cols) bool: the reconstruction circle, ours
    skimage_inside: np.ndarray


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tomocast bench recon`."""
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[256, 512, 1024],
        metavar="COLS",
        help="detector columns (slices are COLS x COLS)",
    )
    parser.add_argument(
        "--angles",
        type=int,
        default=None,
        help="projections over [0, pi) at every size (default: 1.5 x COLS)",
    )
    parser.add_argument("--batch", type=int, default=8, help="slices per batch")
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="timed batches per engine (ours and fast peers; min and median reported)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this thread's CPU time, which other jobs on a shared "
        "machine do not inflate (CPU device only; work on other threads is not counted)",
    )
    parser.add_argument(
        "--peer-budget",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="slow peers time slices one by one, at least one, until it is spent",
    )
    add_common_arguments(
        parser,
        seed_help="phantom seed",
        device_help="tomocast's device: cpu, cuda or cuda:N (peers run on the CPU)",
    )
    # progress goes to the log: --log-level INFO shows which engine and size is being timed


def _command(args: argparse.Namespace) -> str:
    flags = ["--sizes", "--angles", "--batch", "--repeat", "--peer-budget", "--clock"]
    flags += ["--device", "--seed"]
    clock = None if args.clock == "wall" else args.clock  # the default stays unwritten
    return command_line("recon", args, flags, peer_budget=f"{args.peer_budget:g}", clock=clock)


def run(args: argparse.Namespace) -> int:
    """`tomocast bench recon`: see the module doc."""
    if min(args.sizes) < 8 or min(args.batch, args.repeat, args.angles or 1) < 1:
        sys.stderr.write(
            "tomocast bench recon: --sizes must be >= 8, --angles, --batch and --repeat >= 1\n"
        )
        return 2
    if args.clock == "cpu" and not str(args.device).startswith("cpu"):
        sys.stderr.write("tomocast bench recon: --clock cpu times the CPU device only\n")
        return 2
    import torch

    global _now
    _now = _CLOCKS[args.clock]
    load_before, device = os.getloadavg()[0], torch.device(args.device)
    results: list[Timing] = []
    notes: list[str] = []
    for cols in args.sizes:
        results += _time_size(cols, device, args, notes)
    report = {
        "command": _command(args),
        "machine": machine(device, load_before),
        "batch": args.batch,
        "phantom": "foam",
        "filter": "ramp",
        "notes": notes,
        "results": [asdict(t) for t in results],
    }
    angles = "1.5 x cols" if args.angles is None else str(args.angles)
    about = (
        f"batch {args.batch}, angles = {angles}, ramp filter, foam phantom (seed {args.seed}); "
        f"error: relative L2 vs the phantom inside the circle; clock: {args.clock}\n\n"
    )
    emit(args, report, heading(report) + about + _table(results, notes))
    return 0


def _time_size(cols: int, device: Any, args: argparse.Namespace, notes: list[str]) -> list[Timing]:
    """Ours (both methods) and every importable peer at `cols` columns, each engine's ratio to
    the method `AutoFBP` picks there; a peer that is not importable is named in `notes` once."""
    from workers.recon import AutoFBP

    angles = round(1.5 * cols) if args.angles is None else args.angles
    log.info("bench recon: foam phantom, %d columns x %d angles", cols, angles)
    case = _case(cols, angles, args.batch, args.seed)
    chosen = AutoFBP(device).method_for(angles, cols)
    size: list[Timing] = []
    for method in ("gridding", "direct"):
        log.info("bench recon: tomocast %s at %d columns", method, cols)
        size.append(_time_ours(method, case, device, args.repeat, method == chosen))
    log.info("bench recon: tomocast recon() at %d columns", cols)
    size.append(_time_api(case, device, args.repeat))
    for engine, module, peer in _PEERS:
        if importlib.util.find_spec(module) is None:
            if cols == args.sizes[0]:
                notes.append(f"{engine}: not importable here ({module}), not timed")
            continue
        log.info("bench recon: %s at %d columns", engine, cols)
        size.append(peer(case, args))
    ours = next(t for t in size if t.ours)
    for timing in size:
        timing.ratio = timing.ms_per_slice_median / ours.ms_per_slice_median
    return size


def _case(cols: int, angles: int, batch: int, seed: int) -> _Case:
    import numpy as np

    from workers.phantom import FoamPhantom

    # small pores, so every slice has a few hundred edges to get right
    phantom = FoamPhantom.random(
        rows=batch, size=cols, seed=seed, radius_range=(max(1.5, cols / 200), max(3.0, cols / 50))
    )
    theta = np.arange(angles) * np.pi / angles
    sinograms = np.ascontiguousarray(phantom.project(theta).transpose(1, 0, 2))
    truth = phantom.voxelize()
    offset = np.arange(cols) - (cols - 1) / 2  # from the axis, ours; scikit-image's is cols // 2
    inside = offset[:, None] ** 2 + offset[None, :] ** 2 <= (cols / 2 - 1) ** 2
    if cols % 2:
        return _Case(theta, sinograms, truth, sinograms, truth, inside, inside)
    # the same foam seen scikit-image's way: axis on detector column cols/2 and on pixel cols/2,
    # the centre of a (cols + 1)-pixel voxelisation
    skimage_sinograms = phantom.project(theta, center=cols / 2 + 0.5).transpose(1, 0, 2)
    skimage_truth = replace(phantom, size=cols + 1).voxelize()[:, :cols, :cols]
    offset -= 0.5
    return _Case(
        theta,
        sinograms,
        truth,
        np.ascontiguousarray(skimage_sinograms),
        np.ascontiguousarray(skimage_truth),
        inside,
        offset[:, None] ** 2 + offset[None, :] ** 2 <= (cols / 2 - 1) ** 2,
    )


def _rel_error(slices: np.ndarray, truth: np.ndarray, inside: np.ndarray) -> float:
    import numpy as np

    return float(np.linalg.norm((slices - truth)[:, inside]) / np.linalg.norm(truth[:, inside]))


def _timed(func: Callable[[], Any]) -> tuple[float, Any]:
    start = _now()
    result = func()
    return _now() - start, result


def _time_batches(
    engine: str,
    run: Callable[[], Any],
    case: _Case,
    repeat: int,
    ours: bool = False,
    note: str = "",
) -> Timing:
    """A fast engine: the whole batch at once, a first call then `repeat` timed ones."""
    import numpy as np

    batch, angles, cols = case.sinograms.shape
    first, out = _timed(run)
    times = [_timed(run)[0] for _ in range(repeat)]
    error = _rel_error(np.asarray(out), case.truth, case.inside)
    return Timing(
        engine,
        cols,
        angles,
        batch,
        repeat,
        1e3 * min(times) / batch,
        1e3 * statistics.median(times) / batch,
        first,
        error,
        ours,
        note=note,
    )


def _time_ours(method: str, case: _Case, device: Any, repeat: int, chosen: bool) -> Timing:
    import torch

    from workers.recon import make_reconstructor

    reconstructor = make_reconstructor(method, device)
    sinograms = torch.from_numpy(case.sinograms).to(device)
    theta, center = torch.from_numpy(case.theta), case.sinograms.shape[-1] / 2

    def run() -> Any:
        out = reconstructor.reconstruct(sinograms, theta, center)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        return out.cpu()

    return _time_batches(f"tomocast {method}", run, case, repeat, chosen)


def _time_api(case: _Case, device: Any, repeat: int) -> Timing:
    """`workers.recon.recon` as a script calls it: numpy projections (angles, rows, cols) in,
    numpy slices out, in a session of its own (its first call is the set-up)."""
    import numpy as np

    from workers.recon import ReconSession, recon

    tomo = np.ascontiguousarray(case.sinograms.transpose(1, 0, 2))
    session = ReconSession()

    def run() -> Any:
        return recon(tomo, case.theta, device=str(device), session=session)

    return _time_batches(
        "tomocast recon()", run, case, repeat, note="numpy in and out, second call on"
    )


def _time_slices(
    engine: str,
    reconstruct: Callable[[np.ndarray], np.ndarray],
    sinograms: np.ndarray,
    truth: np.ndarray,
    inside: np.ndarray,
    budget: float,
    first_call: float | None,
    note: str = "",
) -> Timing:
    """A slow peer: one slice at a time until `budget` seconds are spent (at least one)."""
    import numpy as np

    times, slices = [], []
    for sinogram in sinograms:
        start = _now()
        slices.append(reconstruct(sinogram))
        times.append(_now() - start)
        if sum(times) >= budget:
            break
    batch, angles, cols = sinograms.shape
    if len(times) < batch:
        note = f"timed {len(times)} of {batch} slices (--peer-budget {budget:g} s)" + (
            f"; {note}" if note else ""
        )
    error = _rel_error(np.stack(slices), truth[: len(slices)], inside)
    return Timing(
        engine,
        cols,
        angles,
        len(times),
        1,
        1e3 * min(times),
        1e3 * statistics.median(times),
        first_call,
        error,
        note=note,
    )


def _skimage(case: _Case, args: argparse.Namespace) -> Timing:
    import numpy as np
    from skimage.transform import iradon

    degrees = np.rad2deg(case.theta)
    return _time_slices(
        "scikit-image iradon",
        lambda sinogram: iradon(  # type: ignore[no-untyped-call]
            sinogram.T, degrees, filter_name="ramp", circle=True
        ),
        case.skimage_sinograms,
        case.skimage_truth,
        case.skimage_inside,
        args.peer_budget,
        None,
        "its own geometry: axis at column and pixel cols // 2 (data made to match)",
    )


def _astra(case: _Case, args: argparse.Namespace) -> Timing:
    import astra

    cols = case.sinograms.shape[-1]
    start = _now()
    # ASTRA's 'parallel' geometry is ours (DESIGN.md): detector centred on the axis, unit pixels
    volume = astra.create_vol_geom(cols, cols)
    geometry = astra.create_proj_geom("parallel", 1.0, cols, case.theta)
    projector = astra.create_projector("linear", geometry, volume)
    sinogram_id = astra.data2d.create("-sino", geometry, 0)
    slice_id = astra.data2d.create("-vol", volume, 0)
    config = astra.astra_dict("FBP")  # the CPU implementation (FBP_CUDA is the GPU one)
    config.update(
        ProjectorId=projector,
        ProjectionDataId=sinogram_id,
        ReconstructionDataId=slice_id,
        option={"FilterType": "Ram-Lak"},
    )
    algorithm = astra.algorithm.create(config)
    setup = _now() - start

    def reconstruct(sinogram: np.ndarray) -> np.ndarray:
        astra.data2d.store(sinogram_id, sinogram)
        astra.algorithm.run(algorithm)
        reconstructed: np.ndarray = astra.data2d.get(slice_id)
        return reconstructed

    try:
        return _time_slices(
            "astra-toolbox FBP (CPU)",
            reconstruct,
            case.sinograms,
            case.truth,
            case.inside,
            args.peer_budget,
            setup,
        )
    finally:
        astra.algorithm.delete(algorithm)
        astra.data2d.delete([sinogram_id, slice_id])
        astra.projector.delete(projector)


def _tomopy(case: _Case, args: argparse.Namespace) -> Timing:
    import numpy as np
    import tomopy

    tomo = np.ascontiguousarray(case.sinograms.transpose(1, 0, 2))
    center = case.sinograms.shape[-1] / 2
    return _time_batches(
        "tomopy gridrec",
        lambda: tomopy.recon(
            tomo, case.theta, center=center, algorithm="gridrec", filter_name="ramlak"
        ),
        case,
        args.repeat,
        note="its own geometry and scale: half a pixel and ~1.19x off "
        "(DESIGN.md), so its error is not comparable",
    )


def _table(results: list[Timing], notes: list[str]) -> str:
    lines = [
        f"{'cols':>5} {'angles':>6}  {'engine':<26} {'ms/slice min':>12} {'median':>9} "
        f"{'slices':>7} {'1st call':>9} {'rel.err':>8} {'x ours':>7}"
    ]
    for t in results:
        first = "-" if t.first_call_s is None else f"{t.first_call_s:.2f} s"
        lines.append(
            f"{t.cols:>5} {t.angles:>6}  {t.engine + (' *' if t.ours else ''):<26} "
            f"{t.ms_per_slice_min:>12.1f} {t.ms_per_slice_median:>9.1f} "
            f"{f'{t.slices}x{t.repeats}':>7} {first:>9} {t.rel_error:>8.5f} "
            f"{t.ratio or 0:>7.1f}"
        )
    lines += ["", "* what tomocast uses there (method auto); x ours = median ms/slice over ours"]
    lines += [f"{t.engine} at {t.cols}: {t.note}" for t in results if t.note]
    return "\n".join([*lines, *notes, ""])


# (engine, module that must be importable, runner): the peers, in the order they are reported
_PEERS = (
    ("scikit-image iradon", "skimage", _skimage),
    ("astra-toolbox FBP (CPU)", "astra", _astra),
    ("tomopy gridrec", "tomopy", _tomopy),
)
