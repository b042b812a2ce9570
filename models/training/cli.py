"""The model sub-commands of `tomocast`: dataset, train (`models.training.cli_train`), export,
infer, evaluate.

`service.cli` calls `add_commands(command)`; every heavy import (torch, h5py, the networks) stays
inside the command functions, so `tomocast --help` is fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from models.training.cli_train import add_train

Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def command_line() -> str:
    """This command as typed, for the records it writes."""
    return shlex.join(["tomocast", *sys.argv[1:]])


def _numbers(kind: type[int] | type[float]) -> Callable[[str], list[int] | list[float]]:
    def parse(text: str) -> list[int] | list[float]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}s"
            ) from exc

    return parse


def _at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
        return value

    return parse


non_negative, positive = _at_least(0), _at_least(1)
ints, floats = _numbers(int), _numbers(float)


def resolve_device(name: str) -> str:
    """--device: `auto` is CUDA where there is one, else the CPU; others as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_dataset(args: argparse.Namespace) -> int:
    from models.training.synthesize import EFFECTS, conditions, synthesize, with_effects
    from service.errors import DataError
    from workers.phantoms import TRAINING_FAMILIES

    chosen = conditions(args.sparse, args.photons, args.combined)
    effects = {name: float(getattr(args, name)) for name in EFFECTS}
    try:
        chosen = with_effects(chosen, effects, alone=args.effects_alone)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    if len(args.attenuation) not in (1, 2):
        raise DataError(f"--attenuation {args.attenuation}: give LOW,HIGH or one value")
    synthesize(
        args.out,
        chosen,
        phantoms=args.phantoms,
        test_phantoms=args.test_phantoms,
        rows=args.rows,
        size=args.size,
        angles=args.angles,
        target=args.target,
        seed=args.seed,
        progress=not args.no_progress,
        command=command_line(),
        families=args.families or TRAINING_FAMILIES,
        attenuation=(args.attenuation[0], args.attenuation[-1]),
        allow_held_out=args.allow_held_out,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from models.training.export import export_checkpoint

    written = export_checkpoint(
        args.checkpoint,
        args.out,
        name=args.name,
        formats=args.formats,
        reference_width=args.reference_width,
    )
    for path in written:
        sys.stdout.write(f"{path}\n")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from models.training.infer import infer_file

    report = infer_file(
        args.low_dose,
        args.out,
        model=args.model,
        normal_dose=args.normal_dose,
        dataset=args.dataset,
        device=resolve_device(args.device),
        batch=args.batch,
        progress=not args.no_progress,
        field_width=args.field_width,
    )
    sys.stdout.write(report + "\n")
    return 0


def add_commands(command: Command) -> None:
    """Add dataset, train, export, infer and evaluate to the `tomocast` parser."""
    _add_dataset(command)
    add_train(command)
    _add_export(command)
    _add_infer(command)
    _add_evaluate(command)


def _add_dataset(command: Command) -> None:
    p = command(
        "dataset",
        cmd_dataset,
        "synthesise training data from phantom families: FBP of sparse-view and/or "
        "photon-limited scans with optional detector effects, in TomoGAN's one-file HDF5 form",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="HDF5 file to write")
    p.add_argument("--phantoms", type=int, default=16, help="training phantoms")
    p.add_argument("--test-phantoms", type=int, default=2, help="test phantoms")
    p.add_argument("--rows", type=int, default=16, help="slices per phantom")
    p.add_argument("--size", type=int, default=256, help="slice size (pixels) = detector cols")
    p.add_argument("--angles", type=int, default=360, help="full-dose views over [0, pi)")
    p.add_argument(
        "--sparse",
        type=ints,
        default=[2, 4, 8, 16, 32],
        metavar="K,K,...",
        help="sparse-view factors: keep 1/K of the views ('' for none)",
    )
    p.add_argument(
        "--photons",
        type=floats,
        default=[100.0, 1000.0, 10000.0],
        metavar="N,N,...",
        help="photons per pixel of photon-limited scans at all views ('' for none)",
    )
    p.add_argument("--combined", action="store_true", help="also every sparse x photons pair")
    p.add_argument(
        "--families",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=None,
        metavar="NAME,...",
        help="phantom families, taken in turn per phantom (workers.phantoms.FAMILIES); "
        "default: every family but the held-out one (workers.phantoms.HELD_OUT)",
    )
    p.add_argument(
        "--allow-held-out",
        action="store_true",
        help="allow the held-out family (data that must never train a shipped model)",
    )
    p.add_argument(
        "--attenuation",
        type=floats,
        default=[1.0, 1.0],
        metavar="LOW,HIGH",
        help="attenuation x the family's own, log-uniform per phantom (e.g. 0.1,10: two "
        "decades); default 1",
    )
    effects = p.add_argument_group(
        "detector effects (each 0 = off; added to every condition at once, the clean "
        "conditions kept)"
    )
    effects.add_argument("--dark", type=float, default=0.0, help="dark-current counts per pixel")
    effects.add_argument("--blur", type=float, default=0.0, help="scintillator PSF sigma, pixels")
    effects.add_argument(
        "--rings", type=float, default=0.0, help="per-column gain std (0.01: 1 %%)"
    )
    effects.add_argument(
        "--zingers", type=float, default=0.0, help="fraction of detector pixels hit per view"
    )
    effects.add_argument(
        "--center-error", type=float, default=0.0, help="rotation-axis error, pixels"
    )
    effects.add_argument("--effects-alone", action="store_true", help="also each effect on its own")
    p.add_argument(
        "--target",
        choices=["phantom", "fbp"],
        default="phantom",
        help="target: the voxelised phantom or the full-dose noise-free FBP",
    )
    p.add_argument("--seed", type=int, default=0, help="first phantom seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_dose_files(
    p: argparse.ArgumentParser, low_dose_help: str, normal_dose_help: str, required: bool
) -> None:
    """-ld/--low-dose and -nd/--normal-dose, TomoGAN's two-file form (TomoGAN's spellings);
    `required`: the low-dose file is."""
    for short, name, text, needed in (
        ("ld", "low-dose", low_dose_help, required),
        ("nd", "normal-dose", normal_dose_help, False),
    ):
        p.add_argument(
            f"-{short}",
            f"--{short}",
            f"--{name}",
            dest=name.replace("-", "_"),
            type=Path,
            required=needed,
            default=None,
            help=text,
        )


def _add_export(command: Command) -> None:
    p = command(
        "export",
        cmd_export,
        "export a training checkpoint as model artifacts: "
        "TorchScript fp32 and fp16 (.pt) and a torch.export program (.pt2)",
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--name", default=None, help="model name (default: <arch>-d<depth>-<steps>)")
    p.add_argument(
        "--formats", nargs="+", choices=["fp32", "fp16", "pt2"], default=["fp32", "fp16", "pt2"]
    )
    p.add_argument(
        "--reference-width",
        type=non_negative,
        default=None,
        metavar="PIXELS",
        help="slice width the input normalisation was fitted at (offset and scale "
        "x PIXELS / width at other widths); default: as the checkpoint records it "
        "(data in attenuation per pixel); 0: absolute",
    )


def _add_infer(command: Command) -> None:
    p = command("infer", cmd_infer, "denoise the slices of an HDF5 file (writes ns, dn and gt)")
    add_dose_files(
        p,
        "noisy slices: test_ns (one-file form) or 'images'",
        "targets ('images') written as gt and scored",
        required=True,
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="data set name in --low-dose (default: "
        "test_ns, else images, else the only 3-D data set)",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="artifact (.pt or .pt2; default the service's)"
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="HDF5 file to write")
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    p.add_argument("--batch", type=int, default=8, help="slices per forward pass")
    p.add_argument(
        "--field-width",
        type=positive,
        default=None,
        metavar="PIXELS",
        help="no longer used (kept for scripts): each volume's input scale follows its own "
        "intensity level (workers.intensity)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- evaluate: the generalisation matrix (models.training.evaluate owns its flags) -----------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.training.evaluate import run

    return run(args)


def _add_evaluate(command: Command) -> None:
    from models.training.evaluate import add_arguments

    p = command(
        "evaluate",
        cmd_evaluate,
        "score denoisers against plain FBP and classical filters tuned per case, on phantom "
        "families x attenuations x low-dose conditions that training never saw",
    )
    add_arguments(p)
