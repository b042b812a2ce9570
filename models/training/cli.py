"""The model sub-commands of `tomocast`: dataset, train, export, infer, evaluate.

`service.cli` calls `add_commands(command)`; every heavy import (torch, h5py, the networks) stays
inside the command functions, so `tomocast --help` is fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tomocast")

Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _command_line() -> str:
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


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_dataset(args: argparse.Namespace) -> int:
    from models.training.synthesize import conditions, synthesize

    chosen = conditions(args.sparse, args.photons, args.combined)
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
        command=_command_line(),
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from models.training.dataset import load_training_data
    from models.training.train import TrainConfig, Trainer, resume, run
    from service.errors import DataError

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    precision = args.precision or ("mixed" if device.startswith("cuda") else "fp32")
    if args.resume is not None and args.init is not None:
        raise DataError(
            "give --init (start a new run from trained weights) or --resume "
            "(continue a run), not both"
        )
    data = load_training_data(args.data, args.low_dose, args.normal_dose)
    if args.resume is not None:
        trainer = resume(
            args.resume,
            data,
            device,
            command=_command_line(),
            steps=args.steps,
            val_every=args.val_every,
            checkpoint_every=args.checkpoint_every,
        )
    else:
        config = TrainConfig(
            arch=args.arch,
            depth=args.depth,
            patch=args.patch,
            batch=args.batch,
            steps=args.steps,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            lambda_adv=args.lambda_adv,
            lambda_mse=args.lambda_mse,
            lambda_perc=args.lambda_perc,
            adv=args.adv,
            d_steps=args.d_steps,
            vgg_weights=None if args.vgg_weights is None else str(args.vgg_weights),
            precision=precision,
            seed=args.seed,
            val_every=args.val_every,
            val_slices=args.val_slices,
            checkpoint_every=args.checkpoint_every,
            init=None if args.init is None else str(args.init),
        )
        trainer = Trainer(config, data, device, command=_command_line())
    config = trainer.config
    if trainer.vgg is None and config.lambda_perc > 0:
        log.warning(
            "perceptual loss OFF: no --vgg-weights file given (weights are never "
            "downloaded); training on %s",
            "MSE + adversarial" if config.lambda_adv > 0 else "MSE only",
        )
    if trainer.discriminator is None:
        log.info("adversarial loss off (--lambda-adv 0, the default): no discriminator is trained")
    if data.reference_width is None:
        log.info(
            "input normalisation: absolute (the noisy slices do not declare units "
            "'attenuation per pixel'); tomocast export --reference-width PIXELS changes it"
        )
    else:
        log.info(
            "input normalisation: fitted at %d px, follows the slice width (units "
            "'attenuation per pixel')",
            data.reference_width,
        )
    sys.stderr.write(
        f"training {config.arch} (depth {config.depth}) on {data.source}; "
        f"{config.precision} on {trainer.device}; perceptual "
        f"{'on' if trainer.vgg is not None else 'off'}, adversarial "
        f"{config.adv if trainer.discriminator is not None else 'off'}\n"
    )
    summary = run(trainer, args.out, progress=not args.no_progress)
    nan = float("nan")
    validation = summary["validation"]
    baseline = trainer.baseline
    sys.stdout.write(
        f"{summary['steps']} steps in {summary['train_seconds']:.1f} s "
        f"({summary['seconds_per_step']:.3f} s/step, peak memory "
        f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB); validation PSNR "
        f"{validation.get('psnr', nan):.2f} dB SSIM {validation.get('ssim', nan):.4f}"
        f" (input: {baseline['psnr']:.2f} dB, {baseline['ssim']:.4f}); checkpoint "
        f"{summary['checkpoint']}\n"
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
        device=_device(args.device),
        batch=args.batch,
        progress=not args.no_progress,
        field_width=args.field_width,
    )
    sys.stdout.write(report + "\n")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.training.evaluate import evaluate, format_table

    rows = evaluate(
        args.model,
        seeds=args.seeds,
        rows=args.rows,
        size=args.size,
        angles=args.angles,
        sparse=args.sparse,
        photons=args.photons,
        device=_device(args.device),
        progress=not args.no_progress,
    )
    table = format_table(rows)
    sys.stdout.write(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0


def add_commands(command: Command) -> None:
    """Add dataset, train, export, infer and evaluate to the `tomocast` parser."""
    ints, floats = _numbers(int), _numbers(float)

    p = command(
        "dataset",
        cmd_dataset,
        "synthesise training data from foam phantoms: FBP of "
        "sparse-view and/or photon-limited scans, in TomoGAN's one-file HDF5 form",
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
        "--target",
        choices=["phantom", "fbp"],
        default="phantom",
        help="target: the voxelised phantom or the full-dose noise-free FBP",
    )
    p.add_argument("--seed", type=int, default=0, help="first phantom seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command(
        "train",
        cmd_train,
        "train a denoiser (TomoGAN, ResAttUnet or U-Net) on TomoGAN-form HDF5 data",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="one-file form: train_ns, train_gt, test_ns, test_gt",
    )
    p.add_argument(
        "-ld",
        "--ld",
        "--low-dose",
        dest="low_dose",
        type=Path,
        default=None,
        help="two-file form: noisy slices (data set 'images')",
    )
    p.add_argument(
        "-nd",
        "--nd",
        "--normal-dose",
        dest="normal_dose",
        type=Path,
        default=None,
        help="two-file form: targets (data set 'images')",
    )
    p.add_argument("--arch", choices=["tomogan", "resattunet", "unet"], default="tomogan")
    p.add_argument("--depth", type=int, default=3, help="adjacent slices as input channels")
    p.add_argument("--patch", type=int, default=256, help="training patch size (pixels)")
    p.add_argument("--batch", type=int, default=16, help="patches per step")
    p.add_argument(
        "--steps", type=int, default=8000, help="generator steps (total, also when resuming)"
    )
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (G and D)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument(
        "--lambda-adv",
        type=float,
        default=0.0,
        help="adversarial weight (0: no "
        "discriminator; 1e-3 adds TomoGAN's term stably, 20 as in TomoGAN's public "
        "code swamps the MSE: docs/model-card.md)",
    )
    p.add_argument("--lambda-mse", type=float, default=1.0, help="pixel MSE weight")
    p.add_argument(
        "--lambda-perc",
        type=float,
        default=2.0,
        help="VGG19 perceptual weight (used only with --vgg-weights)",
    )
    p.add_argument("--adv", choices=["wgan-gp", "bce"], default="wgan-gp", help="adversarial loss")
    p.add_argument("--d-steps", type=int, default=2, help="discriminator steps per G step")
    p.add_argument(
        "--vgg-weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="local torchvision VGG19 state dict; without it the perceptual loss is "
        "off (never downloaded)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "mixed"],
        default=None,
        help="mixed: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU "
        "(default: mixed on CUDA, fp32 on CPU)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="checkpoint folder")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="MODEL",
        help="start from these generator weights: a model artifact (e.g. the shipped "
        "models/weights/tomogan-foam-d3.pt) or a training checkpoint (fine-tuning)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="continue this checkpoint (its settings win; --steps may grow)",
    )
    p.add_argument("--val-every", type=int, default=100, help="validate every N steps")
    p.add_argument("--val-slices", type=int, default=8, help="whole test slices validated")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

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

    p = command("infer", cmd_infer, "denoise the slices of an HDF5 file (writes ns, dn and gt)")
    p.add_argument(
        "-ld",
        "--ld",
        "--low-dose",
        dest="low_dose",
        type=Path,
        required=True,
        help="noisy slices: test_ns (one-file form) or 'images'",
    )
    p.add_argument(
        "-nd",
        "--nd",
        "--normal-dose",
        dest="normal_dose",
        type=Path,
        default=None,
        help="targets ('images') written as gt and scored",
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
        help="detector pixels across the full field of view, for slices cropped "
        "from it (the model's input scale follows it); default: the slice width",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command(
        "evaluate",
        cmd_evaluate,
        "quality table on held-out foam phantoms: PSNR and "
        "SSIM of FBP vs FBP + denoiser against the phantom",
    )
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        default=None,
        help="artifact(s) to score (repeat; default: the service's)",
    )
    p.add_argument(
        "--seeds",
        type=ints,
        default=None,
        metavar="S,S,...",
        help="phantom seeds (default: 3 from the evaluation range)",
    )
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--angles", type=int, default=360)
    p.add_argument("--sparse", type=ints, default=[8, 16], metavar="K,K,...")
    p.add_argument("--photons", type=floats, default=[1000.0, 200.0], metavar="N,N,...")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
