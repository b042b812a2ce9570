"""`tomocast train`: its flags and the command that trains (`models.training.train`).

`models.training.cli` adds it with the other model sub-commands; heavy imports stay inside the
command functions, so `tomocast --help` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.training.cli import Command
    from models.training.train import TrainConfig, Trainer

log = logging.getLogger("tomocast")


def add_train(command: Command) -> None:
    """Add `train` to the `tomocast` parser."""
    from models.training.cli import add_dose_files

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
    add_dose_files(
        p,
        "two-file form: noisy slices (data set 'images')",
        "two-file form: targets (data set 'images')",
        required=False,
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
    _add_loss_flags(p)
    _add_run_flags(p)
    _add_self_supervised_flags(p)


def _add_loss_flags(p: argparse.ArgumentParser) -> None:
    """`train`: the loss terms and their weights."""
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
    p.add_argument(
        "--lambda-ssim",
        type=float,
        default=0.0,
        help="weight of 1 - SSIM (0: off; weighs local structure that MSE averages away)",
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


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """`train`: where and how the run goes: device, precision, start, resume, schedule."""
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
    p.add_argument(
        "--level-per-volume",
        action="store_true",
        help="scale each volume to one intensity level, as the engine scales each scan "
        "(for data sets over decades of attenuation: tomocast dataset --attenuation)",
    )
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


def _add_self_supervised_flags(p: argparse.ArgumentParser) -> None:
    """`train --self-supervised`: adapt trained weights to one recorded scan
    (`models.training.selfsupervised`)."""
    group = p.add_argument_group(
        "self-supervised adaptation (Noise2Inverse on one recorded scan, no ground truth)"
    )
    group.add_argument(
        "--self-supervised",
        type=Path,
        default=None,
        metavar="SCANFILE",
        help="fine-tune --init (default: the shipped model) on this DXchange or NXtomo scan: "
        "predict one interleaved angle subset's FBP from the others'; --data is not used",
    )
    group.add_argument(
        "--seconds",
        type=float,
        default=300.0,
        help="training budget in seconds of steps (total, also when resuming)",
    )
    group.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what --seconds counts: wall-clock seconds of steps (total, also when resuming) "
        "or this process's CPU seconds (on a shared machine, what the run itself cost)",
    )
    group.add_argument("--subsets", type=int, default=2, help="interleaved angle subsets (K)")
    group.add_argument(
        "--tune",
        choices=["all", "head"],
        default="all",
        help="which weights change: all, or the last 1x1 layers only (head; give it again "
        "when resuming)",
    )
    group.add_argument(
        "--rows",
        default=None,
        metavar="FIRST:STOP",
        help="detector rows to adapt on (default all; bounds memory and FBP time)",
    )
    group.add_argument(
        "--center",
        type=float,
        default=None,
        help="rotation axis (default: the file's, else cols / 2)",
    )
    group.add_argument("--entry", default=None, help="NXtomo entry (files with several)")


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from models.training.train import run

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.self_supervised is not None:
        return _cmd_adapt(args)
    trainer = _trainer(args)
    _log_setup(trainer)
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


def _row_range(text: str | None) -> tuple[int, int] | None:
    from service.errors import DataError

    if text is None:
        return None
    first, _, stop = text.partition(":")
    try:
        return int(first), int(stop)
    except ValueError:
        raise DataError(f"--rows {text!r}: give FIRST:STOP, e.g. 100:132") from None


def _cmd_adapt(args: argparse.Namespace) -> int:
    """`train --self-supervised SCANFILE`: Noise2Inverse fine-tuning within --seconds."""
    from models.training.cli import command_line, resolve_device
    from models.training.selfsupervised import adapt, adapter, read_scan
    from service.errors import DataError
    from workers.denoise import default_artifact_path

    if args.data is not None or args.low_dose is not None:
        raise DataError("--self-supervised trains on the scan alone: drop --data / -ld / -nd")
    if args.resume is not None and args.init is not None:
        raise DataError("give --init (start from weights) or --resume (continue), not both")
    device = resolve_device(args.device)
    init = args.init
    if init is None:
        # A resumed run's artifact is recorded in its checkpoint; the scan's pairs are
        # normalised as it was, so the default must be the one it started from.
        init = _recorded_init(args.resume) if args.resume is not None else None
    init = init or default_artifact_path("cpu")
    scan = read_scan(args.self_supervised, _row_range(args.rows), args.center, args.entry)
    settings: dict[str, Any] = {
        "steps": args.steps,
        "val_every": args.val_every,
        "checkpoint_every": args.checkpoint_every,
    }
    if args.resume is None:
        settings.update(
            patch=args.patch,
            batch=args.batch,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            precision=args.precision or ("mixed" if device.startswith("cuda") else "fp32"),
            seed=args.seed,
            val_slices=args.val_slices,
        )
    trainer = adapter(
        scan,
        init,
        device,
        subsets=args.subsets,
        command=command_line(),
        resume_from=args.resume,
        tune=args.tune,
        **settings,
    )
    sys.stderr.write(
        f"adapting {trainer.config.arch} (depth {trainer.config.depth}) from {init} on "
        f"{scan.source}: {args.subsets} angle subsets; {trainer.config.precision} on "
        f"{trainer.device}, budget {args.seconds:g} s ({args.clock})\n"
    )
    summary = adapt(
        trainer, args.out, args.seconds, progress=not args.no_progress, clock=args.clock
    )
    validation, baseline = summary["validation"], summary["baseline"]
    sys.stdout.write(
        f"{summary['steps']} steps in {summary['train_seconds']:.1f} s of training "
        f"({summary['wall_seconds']:.1f} s wall, {summary['cpu_seconds']:.1f} s CPU); "
        f"held-out subset PSNR {validation['psnr']:.2f} dB (input: {baseline['psnr']:.2f} dB); "
        f"checkpoint {summary['checkpoint']} (tomocast export it)\n"
    )
    return 0


def _recorded_init(checkpoint: Path) -> str | None:
    from models.training.train import load_checkpoint

    init = load_checkpoint(checkpoint)["config"].get("init")
    return None if init is None else str(init)


def _trainer(args: argparse.Namespace) -> Trainer:
    """A new run from the flags, or the one --resume continues."""
    from models.training.cli import command_line, resolve_device
    from models.training.dataset import load_training_data
    from models.training.train import Trainer, resume
    from service.errors import DataError

    device = resolve_device(args.device)
    if args.resume is not None and args.init is not None:
        raise DataError(
            "give --init (start a new run from trained weights) or --resume "
            "(continue a run), not both"
        )
    data = load_training_data(args.data, args.low_dose, args.normal_dose)
    if args.resume is not None:
        return resume(
            args.resume,
            data,
            device,
            command=command_line(),
            steps=args.steps,
            val_every=args.val_every,
            checkpoint_every=args.checkpoint_every,
        )
    return Trainer(_train_config(args, device), data, device, command=command_line())


def _train_config(args: argparse.Namespace, device: str) -> TrainConfig:
    """The run's settings from the flags; a flag out of range is a ConfigError (a message,
    not a traceback)."""
    from service.errors import ConfigError

    try:
        return _config_from(args, device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _config_from(args: argparse.Namespace, device: str) -> TrainConfig:
    from models.training.train import TrainConfig

    return TrainConfig(
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
        lambda_ssim=args.lambda_ssim,
        adv=args.adv,
        d_steps=args.d_steps,
        vgg_weights=None if args.vgg_weights is None else str(args.vgg_weights),
        precision=args.precision or ("mixed" if device.startswith("cuda") else "fp32"),
        seed=args.seed,
        val_every=args.val_every,
        val_slices=args.val_slices,
        checkpoint_every=args.checkpoint_every,
        init=None if args.init is None else str(args.init),
        level_per_volume=args.level_per_volume,
    )


def _log_setup(trainer: Trainer) -> None:
    """Which losses are on, how inputs are normalised, and one line on stderr saying what
    trains where."""
    config, data = trainer.config, trainer.data
    if trainer.vgg is None and config.lambda_perc > 0:
        log.warning(
            "perceptual loss OFF: no --vgg-weights file given (weights are never "
            "downloaded); training on %s",
            " + ".join(
                ["MSE"]
                + (["adversarial"] if config.lambda_adv > 0 else [])
                + (["SSIM"] if config.lambda_ssim > 0 else [])
            ),
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
        f"{config.adv if trainer.discriminator is not None else 'off'}, SSIM "
        f"{config.lambda_ssim if config.lambda_ssim > 0 else 'off'}\n"
    )
