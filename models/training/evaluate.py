"""`tomocast evaluate`: the generalisation matrix (`models.training.matrix`) as a command and its
tables: per case, PSNR / SSIM of FBP, each tuned classical filter (its parameter shown) and each
model; per model, the cases where it is no worse than FBP and where it beats the best classical
method by MARGIN_DB; per family, mean PSNRs. `--json` writes every score.

`add_arguments(parser)` and `run(args)` are the sub-command; `python -m models.training.evaluate`
runs the same. `evaluate()` keeps the original foam-only table (condition x model, mean PSNR and
SSIM over held-out foam phantoms) for its callers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from models.training.matrix_defaults import (
    DEFAULT_ATTENUATIONS,
    DEFAULT_BASELINES,
    MARGIN_DB,
    VALIDATION_OFFSET,
)
from workers.lowdose import EVALUATION_SEED, Condition, render
from workers.phantoms import FAMILIES, HELD_OUT

if TYPE_CHECKING:
    from models.training.matrix import Matrix, Score

DEFAULT_SEEDS = (EVALUATION_SEED, EVALUATION_SEED + 1, EVALUATION_SEED + 2)
T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    condition: str
    model: str
    fbp_psnr: float
    fbp_ssim: float
    psnr: float
    ssim: float

    @property
    def gain_db(self) -> float:
        return self.psnr - self.fbp_psnr


def evaluate(
    models: Sequence[str | Path] | None = None,
    seeds: Sequence[int] | None = None,
    rows: int = 8,
    size: int = 256,
    angles: int = 360,
    sparse: Sequence[int] = (8, 16),
    photons: Sequence[float] = (1000.0, 200.0),
    device: str = "cpu",
    progress: bool = True,
) -> list[Row]:
    """One Row per (condition, model); `models` None scores the service's default artifact."""
    from tqdm import tqdm

    from models.training.infer import denoise_volumes
    from models.training.matrix import slice_scores
    from workers.denoise import load_denoiser

    seeds = list(DEFAULT_SEEDS if seeds is None else seeds)
    chosen = [Condition(sparse=k) for k in sparse] + [Condition(photons=float(p)) for p in photons]
    paths: list[Path | None] = [Path(model) for model in models] if models else [None]
    engines = [load_denoiser(path, device) for path in paths]
    fbp: dict[str, tuple[list[float], list[float]]] = {c.label: ([], []) for c in chosen}
    denoised: dict[tuple[str, str], tuple[list[float], list[float]]] = {
        (c.label, e.name): ([], []) for c in chosen for e in engines
    }
    for seed in tqdm(seeds, desc="evaluate", unit="phantom", disable=not progress):
        for volume in render(seed, rows, size, angles, chosen, device=device):
            label = volume.condition.label
            p, s, _ = slice_scores(volume.noisy, volume.target)
            fbp[label][0].extend(p)
            fbp[label][1].extend(s)
            for engine in engines:
                output = denoise_volumes(engine, volume.noisy, (rows,), progress=False)
                p, s, _ = slice_scores(output, volume.target)
                denoised[label, engine.name][0].extend(p)
                denoised[label, engine.name][1].extend(s)
    return [
        Row(
            c.label,
            e.name,
            float(np.mean(fbp[c.label][0])),
            float(np.mean(fbp[c.label][1])),
            float(np.mean(denoised[c.label, e.name][0])),
            float(np.mean(denoised[c.label, e.name][1])),
        )
        for c in chosen
        for e in engines
    ]


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| condition | denoiser | PSNR FBP (dB) | PSNR denoised (dB) | gain (dB) | SSIM FBP |"
        " SSIM denoised |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.condition} | {r.model} | {r.fbp_psnr:.2f} | {r.psnr:.2f} | "
        f"{r.gain_db:+.2f} | {r.fbp_ssim:.3f} | {r.ssim:.3f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def _cell(score: Score) -> str:
    text = f"{score.psnr:.2f} / {score.ssim:.3f}"
    return f"{text} ({score.parameter})" if score.parameter else text


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def format_matrix(matrix: Matrix) -> str:
    """Markdown: the per-case table, the per-model counts and per-family means."""
    if not matrix.cases:
        return "no cases\n"
    names = matrix.model_names
    classical = [score.method for score in matrix.cases[0].classical]
    header = ["family", "atten.", "condition", "FBP", *classical, *names]
    header += [f"{name}: >= FBP / >= best + {MARGIN_DB:g} dB" for name in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for case in matrix.cases:
        family = f"{case.family} (held out)" if case.held_out else case.family
        cells = [family, f"{case.attenuation:g}x", case.condition, _cell(case.fbp)]
        cells += [_cell(score) for score in case.classical]
        cells += [_cell(score) for score in case.models]
        cells += [
            f"{_yes(case.no_worse_than_fbp(n))} / {_yes(case.beats_best_classical(n))}"
            for n in names
        ]
        lines.append("| " + " | ".join(cells) + " |")
    settings = matrix.settings
    lines += [
        "",
        f"PSNR (dB) / SSIM against the voxelised phantom, means over {settings['rows']} slices "
        f"x {len(matrix.cases[0].seeds)} seed(s) of {settings['size']} px; {settings['angles']} "
        "views at full dose. Classical parameters tuned per case on a validation phantom "
        f"({settings['validation_rows']} slices, seeds {matrix.cases[0].validation_seeds}); "
        "sigma in px, `s` = the slice's own noise estimate.",
        "",
        f"| model | cases | >= FBP in PSNR and SSIM | PSNR >= best classical + {MARGIN_DB:g} dB "
        f"| {HELD_OUT} (held out): >= FBP | {HELD_OUT}: >= best + {MARGIN_DB:g} dB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in matrix.summary():
        lines.append(
            f"| {s.model} | {s.cases} | {s.no_worse_than_fbp} | {s.beats_best_classical} "
            f"| {s.held_out_no_worse_than_fbp} / {s.held_out_cases} "
            f"| {s.held_out_beats_best_classical} / {s.held_out_cases} |"
        )
    lines += [
        "",
        "| family | FBP PSNR | best classical PSNR | "
        + " | ".join(f"{name} PSNR" for name in names)
        + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for family in dict.fromkeys(case.family for case in matrix.cases):
        group = [case for case in matrix.cases if case.family == family]
        means = [
            np.mean([case.fbp.psnr for case in group]),
            np.mean([case.best_classical.psnr for case in group]),
            *(np.mean([case.model(name).psnr for case in group]) for name in names),
        ]
        lines.append(f"| {family} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    lines += ["", "(per family: means over attenuations and conditions)", ""]
    lines += _detail_tables(matrix)
    lines += [f"Note: {note}" for note in matrix.notes]
    return "\n".join(lines) + "\n"


def _finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values; NaN when there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _detail_tables(matrix: Matrix) -> list[str]:
    """Detail SNR (`models.training.metrics.detail_snr`): per family, and per case of the
    held-out family, whose low contrast whole-slice PSNR and SSIM hardly see."""
    names = matrix.model_names
    classical = [score.method for score in matrix.cases[0].classical]
    lines = [
        "Detail SNR (dB; 0 = the fine structure erased), per family:",
        "",
        "| family | FBP | best classical | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for family in dict.fromkeys(case.family for case in matrix.cases):
        group = [case for case in matrix.cases if case.family == family]
        means = [
            _finite_mean([case.fbp.detail for case in group]),
            _finite_mean([case.best_classical_detail for case in group]),
            *(_finite_mean([case.model(name).detail for case in group]) for name in names),
        ]
        lines.append(f"| {family} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    held = [case for case in matrix.cases if case.held_out]
    if held:
        header = ["atten.", "condition", "FBP", *classical, *names]
        lines += [
            "",
            f"Detail SNR (dB) per case of the held-out family ({HELD_OUT}):",
            "",
            "| " + " | ".join(header) + " |",
            "|---|---|" + "---:|" * (len(header) - 2),
        ]
        for case in held:
            scores = (case.fbp, *case.classical, *case.models)
            cells = [f"{case.attenuation:g}x", case.condition]
            lines.append("| " + " | ".join(cells + [f"{s.detail:.2f}" for s in scores]) + " |")
    return lines


def matrix_json(matrix: Matrix) -> dict[str, object]:
    """The matrix as plain JSON types: settings, cases (with the per-model verdicts), summary."""
    cases = []
    for case in matrix.cases:
        record = asdict(case)
        record["best_classical"] = case.best_classical.method
        record["verdicts"] = {
            name: {
                "no_worse_than_fbp": case.no_worse_than_fbp(name),
                "beats_best_classical": case.beats_best_classical(name),
            }
            for name in matrix.model_names
        }
        cases.append(record)
    return {
        "settings": matrix.settings,
        "margin_db": MARGIN_DB,
        "cases": cases,
        "summary": [asdict(s) for s in matrix.summary()],
        "notes": list(matrix.notes),
    }


def matrix_from_json(records: Sequence[dict[str, Any]]) -> Matrix:
    """One `Matrix` from `matrix_json` records of runs over disjoint cases (say, families split
    over two processes or machines) with the same models, conditions and baselines. ValueError
    when their models or settings other than the families differ."""
    from models.training.matrix import Case, Matrix, Score

    def score(record: dict[str, Any]) -> Score:
        return Score(**{f.name: record[f.name] for f in fields(Score) if f.name in record})

    cases: list[Case] = []
    first = records[0]["settings"]
    for record in records:
        settings = record["settings"]
        differing = [k for k in first if k != "families" and settings.get(k) != first[k]]
        if differing:
            raise ValueError(f"runs differ in {', '.join(differing)}: not one matrix")
        for case in record["cases"]:
            cases.append(
                Case(
                    case["family"],
                    case["held_out"],
                    case["attenuation"],
                    case["condition"],
                    tuple(case["seeds"]),
                    tuple(case["validation_seeds"]),
                    score(case["fbp"]),
                    tuple(score(s) for s in case["classical"]),
                    tuple(score(s) for s in case["models"]),
                )
            )
    settings = dict(first)
    settings["families"] = list(
        dict.fromkeys(f for record in records for f in record["settings"]["families"])
    )
    notes = tuple(dict.fromkeys(n for record in records for n in record.get("notes", [])))
    return Matrix(tuple(cases), settings, notes)


# --- command line (`tomocast evaluate`, or `python -m models.training.evaluate`) ---------------


def _listed(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    def parse(text: str) -> list[T]:
        try:
            return [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list") from exc

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation's flags (a superset of the foam-only table's)."""
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=None,
        help="artifact(s) to score (repeat; default: the service's)",
    )
    parser.add_argument(
        "--families",
        type=_listed(str),
        default=None,
        metavar="F,F,...",
        help=f"phantom families (default: all: {', '.join(FAMILIES)}; {HELD_OUT} is held out "
        "of training)",
    )
    parser.add_argument(
        "--attenuations",
        type=_listed(float),
        default=list(DEFAULT_ATTENUATIONS),
        metavar="A,A,...",
        help="multiples of each family's default attenuation (default: 0.3,1,3)",
    )
    parser.add_argument("--sparse", type=_listed(int), default=[8, 16], metavar="K,K,...")
    parser.add_argument("--photons", type=_listed(float), default=[1000.0, 200.0], metavar="N,...")
    parser.add_argument(
        "--seeds",
        type=_listed(int),
        default=[EVALUATION_SEED],
        metavar="S,S,...",
        help=f"scored phantom seeds, {EVALUATION_SEED} on (default: {EVALUATION_SEED}); the "
        f"validation phantoms take seed + {VALIDATION_OFFSET}",
    )
    parser.add_argument("--rows", type=int, default=4, help="scored slices per phantom")
    parser.add_argument("--validation-rows", type=int, default=1, help="tuning slices per case")
    parser.add_argument("--size", type=int, default=256, help="slice width, pixels")
    parser.add_argument("--angles", type=int, default=360, help="views at full dose")
    parser.add_argument(
        "--baselines",
        type=_listed(str),
        default=list(DEFAULT_BASELINES),
        metavar="B,B,...",
        help="classical filters: gaussian, tv, nlm, bm3d (slow), all, or none "
        f"(default: {','.join(DEFAULT_BASELINES)})",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument("--json", type=Path, default=None, help="write every score as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="compute nothing: print (and --out/--json) the one matrix of these --json files, "
        "runs over disjoint families with the same models and settings",
    )


def run(args: argparse.Namespace) -> int:
    """Run the matrix from parsed `add_arguments` flags; print the tables. ConfigError for
    flags that name no family, baseline or valid seed."""
    import torch

    from models.training.matrix import evaluate_matrix
    from service.errors import ConfigError

    if args.merge is not None:
        try:
            merged = matrix_from_json([json.loads(path.read_text()) for path in args.merge])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--merge: {exc}") from exc
        _write(args, merged, format_matrix(merged))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    baselines = [] if args.baselines == ["none"] else args.baselines
    started = time.perf_counter()
    try:
        matrix = evaluate_matrix(
            args.model or [None],
            families=args.families,
            attenuations=args.attenuations,
            sparse=args.sparse,
            photons=args.photons,
            seeds=args.seeds,
            rows=args.rows,
            size=args.size,
            angles=args.angles,
            validation_rows=args.validation_rows,
            baselines=baselines,
            device=device,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    table = format_matrix(matrix)
    table += f"\n({len(matrix.cases)} cases in {time.perf_counter() - started:.0f} s)\n"
    _write(args, matrix, table)
    return 0


def _write(args: argparse.Namespace, matrix: Matrix, table: str) -> None:
    sys.stdout.write(table)
    if args.out is not None:
        args.out.write_text(table)
    if args.json is not None:
        args.json.write_text(json.dumps(matrix_json(matrix), indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.training.evaluate`: the same as `tomocast evaluate`."""
    from service.errors import TomocastError

    parser = argparse.ArgumentParser(
        prog="python -m models.training.evaluate",
        description="score denoisers and tuned classical filters on phantom families "
        "x attenuations x low-dose conditions",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except TomocastError as exc:
        sys.stderr.write(f"evaluate: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
