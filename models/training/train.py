"""`tomocast train`: TomoGAN-style training of a denoising generator on adjacent-slice patches.

One training step is `d_steps` discriminator steps (two, as in TomoGAN) and one generator step,
each on a fresh random batch. The generator minimises lambda_mse * MSE + lambda_adv * adv +
lambda_perc * VGG19 perceptual + lambda_ssim * (1 - SSIM); with lambda_adv = 0 (the default:
best for PSNR and SSIM, and much cheaper a step without the critic's steps; figures in
docs/model-card.md, "Training" and "Adversarial training, measured") no discriminator is built
or stepped, the perceptual term runs only when a local VGG19 weights file is given, and the SSIM
term only when its weight is above 0 (the default is 0).

Mixed precision (`precision="mixed"`): fp16 autocast with a GradScaler per network on CUDA,
bf16 autocast on the CPU (bf16 has fp32's range, so no loss scaling). Losses, metrics and the
optimiser state stay fp32.

Determinism: weights, patches, augmentation and gradient-penalty mixes all come from `seed`; a
checkpoint holds every random state, so a resumed run continues exactly as the unbroken run would
have (same device and thread count).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.networks import build_generator
from models.training.dataset import PatchSampler, TrainingData, validation_set
from models.training.losses import (
    AdversarialKind,
    VGG19Features,
    discriminator_loss,
    generator_adversarial_loss,
    gradient_penalty,
    perceptual_loss,
    ssim_loss,
)
from models.training.memory import PeakMemory
from models.training.metrics import psnr, ssim
from service.errors import ModelError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tomocast-checkpoint-1"
CHECKPOINT_FILE = "checkpoint.pt"
SUMMARY_FILE = "summary.json"
VALIDATION_BATCH = 4
# TomoGAN's three pools need H, W divisible by 8 (the U-Nets take any size).
PAD_MULTIPLE = 8


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad H, W at the bottom/right up to multiples of `multiple`, as the denoise engine
    does (replicate where the image is too small to reflect)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return images
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes (stored in every checkpoint)."""

    arch: str = "tomogan"
    depth: int = 3
    patch: int = 256
    batch: int = 16
    steps: int = 8000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine": decays to 0 at `steps`
    # Pixel MSE alone by default: TomoGAN's public weights (adv 20, mse 0.5) let the unbounded
    # WGAN critic swamp the MSE here (docs/model-card.md, "Adversarial training, measured").
    lambda_adv: float = 0.0
    lambda_mse: float = 1.0
    lambda_perc: float = 2.0
    # 1 - SSIM (scikit-image's definition, `models.training.losses.ssim_loss`); 0: off.
    lambda_ssim: float = 0.0
    adv: AdversarialKind = "wgan-gp"
    d_steps: int = 2
    vgg_weights: str | None = None
    precision: str = "fp32"
    seed: int = 0
    val_every: int = 100
    val_slices: int = 8
    checkpoint_every: int = 500
    init: str | None = None  # generator weights to start from (models.training.warm_start)
    # Scale each volume to one intensity level, as the engine scales each scan (data sets
    # spanning decades of attenuation); off reproduces the shipped weights' runs.
    level_per_volume: bool = False

    def __post_init__(self) -> None:
        if self.depth < 1 or self.depth % 2 == 0:
            raise ValueError(f"depth={self.depth} must be odd (the centre slice is predicted)")
        if self.patch < 8 or self.patch % 8:
            raise ValueError(f"patch={self.patch} must be a positive multiple of 8")
        if self.adv not in ("wgan-gp", "bce"):
            raise ValueError(f"adv={self.adv!r}: choose wgan-gp or bce")
        if self.precision not in ("fp32", "mixed"):
            raise ValueError(f"precision={self.precision!r}: choose fp32 or mixed")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: choose constant or cosine")
        if self.lambda_ssim < 0:
            raise ValueError(f"lambda_ssim={self.lambda_ssim} must be >= 0")
        if min(self.batch, self.steps, self.val_every, self.checkpoint_every) < 1:
            raise ValueError("batch, steps, val_every and checkpoint_every must be >= 1")


def describe_hardware(device: torch.device) -> str:
    """The device in words, for the model metadata: GPU name, or CPU model and threads used."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        name = models[0] if models else name
    return f"CPU {name} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)"


class Trainer:
    """One training run: networks, optimisers, samplers, random states, history.

    Threading: owned by the thread that calls `step`/`run`; not shareable.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: TrainingData,
        device: torch.device | str,
        command: str = "",
        initialise: bool = True,
    ) -> None:
        """`initialise`: load `config.init`'s weights (False when a checkpoint's follow)."""
        if config.level_per_volume:
            from models.training.dataset import level_normalised

            data = level_normalised(data)
        self.config, self.data, self.command = config, data, command
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.mix_rng = torch.Generator().manual_seed(config.seed + 1)
        self.generator = build_generator(config.arch, config.depth)
        if config.init is not None and initialise:
            from models.training.warm_start import generator_weights

            self.generator.load_state_dict(
                generator_weights(config.init, config.arch, config.depth)
            )
        self.generator = self.generator.to(self.device)
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=config.lr)
        self.discriminator: nn.Module | None = None
        self.d_opt: torch.optim.Optimizer | None = None
        if config.lambda_adv > 0:
            from models.tomogan import TomoGANDiscriminator

            self.discriminator = TomoGANDiscriminator(config.patch).to(self.device)
            self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr)
        self.vgg: VGG19Features | None = None
        if config.vgg_weights is not None and config.lambda_perc > 0:
            self.vgg = VGG19Features.from_file(config.vgg_weights).to(self.device)
        mixed = config.precision == "mixed"
        on_cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.float16 if on_cuda else torch.bfloat16
        self.autocast_enabled = mixed
        self.g_scaler = torch.amp.GradScaler(self.device.type, enabled=mixed and on_cuda)
        self.d_scaler = torch.amp.GradScaler(self.device.type, enabled=mixed and on_cuda)
        self.sampler = PatchSampler(data.train, config.depth, config.patch, self.rng)
        val_inputs, val_targets = validation_set(data.test, config.depth, config.val_slices)
        self.val_inputs = torch.from_numpy(np.ascontiguousarray(val_inputs))
        self.val_targets = torch.from_numpy(np.ascontiguousarray(val_targets))
        self.offset, self.scale = data.input_offset, data.input_scale
        self.reference_level = data.reference_level
        self.step_count = 0
        self.elapsed = 0.0
        self.history: list[dict[str, float]] = []
        self.baseline = self._score(self.val_inputs[:, config.depth // 2 : config.depth // 2 + 1])

    # -- one step ---------------------------------------------------------------------------

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_enabled
        )

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.sampler.batch(self.config.batch)
        x = (torch.from_numpy(inputs).to(self.device) - self.offset) / self.scale
        y = (torch.from_numpy(targets).to(self.device) - self.offset) / self.scale
        return x, y

    def _learning_rate(self) -> float:
        if self.config.lr_schedule == "constant":
            return self.config.lr
        progress = min(self.step_count / self.config.steps, 1.0)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def _discriminator_step(self) -> dict[str, float]:
        assert self.discriminator is not None and self.d_opt is not None
        x, y = self._batch()
        with torch.no_grad(), self._autocast():
            fake = self.generator(x).float()
        with self._autocast():
            loss = discriminator_loss(
                self.config.adv, self.discriminator(y), self.discriminator(fake)
            )
            penalty = torch.zeros((), device=self.device)
            if self.config.adv == "wgan-gp":
                penalty = gradient_penalty(
                    self.discriminator, y, fake, self.mix_rng, self.d_scaler.get_scale()
                )
        self.d_opt.zero_grad(set_to_none=True)
        torch.autograd.backward(self.d_scaler.scale(loss + penalty))
        self.d_scaler.step(self.d_opt)
        self.d_scaler.update()
        return {"d": loss.item(), "gp": penalty.item()}

    def _generator_step(self) -> dict[str, float]:
        config = self.config
        x, y = self._batch()
        terms: dict[str, torch.Tensor] = {}
        with self._autocast():
            out = self.generator(x)
            terms["mse"] = F.mse_loss(out.float(), y)
            if self.discriminator is not None:
                self.discriminator.requires_grad_(False)
                terms["adv"] = generator_adversarial_loss(config.adv, self.discriminator(out))
                self.discriminator.requires_grad_(True)
            if self.vgg is not None:
                terms["perc"] = perceptual_loss(self.vgg, out, y).float()
            if config.lambda_ssim > 0:
                terms["ssim"] = ssim_loss(out.float(), y)
        weights = {
            "mse": config.lambda_mse,
            "adv": config.lambda_adv,
            "perc": config.lambda_perc,
            "ssim": config.lambda_ssim,
        }
        loss = sum(
            (weights[name] * value for name, value in terms.items()),
            torch.zeros((), device=self.device),
        )
        self.g_opt.zero_grad(set_to_none=True)
        torch.autograd.backward(self.g_scaler.scale(loss))
        self.g_scaler.step(self.g_opt)
        self.g_scaler.update()
        return {"loss": loss.item(), **{name: value.item() for name, value in terms.items()}}

    def step(self) -> dict[str, float]:
        """One training step (d_steps critic steps, one generator step); returns its losses."""
        lr = self._learning_rate()
        for optimiser in (self.g_opt, self.d_opt):
            for group in optimiser.param_groups if optimiser is not None else ():
                group["lr"] = lr
        started = time.perf_counter()
        losses: dict[str, float] = {}
        if self.discriminator is not None:
            for _ in range(self.config.d_steps):
                losses.update(self._discriminator_step())
        losses.update(self._generator_step())
        self.elapsed += time.perf_counter() - started
        self.step_count += 1
        return losses

    # -- validation -------------------------------------------------------------------------

    def _score(self, slices: torch.Tensor) -> dict[str, float]:
        targets = self.val_targets
        return {
            "psnr": float(psnr(slices, targets, self.scale).mean()),
            "ssim": float(ssim(slices, targets, self.scale).mean()),
        }

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Eager fp32 prediction in physical units, (n, depth, H, W) -> (n, 1, H, W) on CPU."""
        was_training = self.generator.training
        self.generator.eval()
        outputs = []
        with torch.no_grad():
            for chunk in torch.split(inputs, VALIDATION_BATCH):
                normalised = (chunk.to(self.device) - self.offset) / self.scale
                out = self.generator(pad_to_multiple(normalised, PAD_MULTIPLE))
                outputs.append(out[..., : chunk.shape[-2], : chunk.shape[-1]].float().cpu())
        self.generator.train(was_training)
        return torch.cat(outputs) * self.scale + self.offset

    def validate(self) -> dict[str, float]:
        scores = {"step": float(self.step_count), **self._score(self.predict(self.val_inputs))}
        self.history.append(scores)
        return scores

    # -- checkpoints ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "step": self.step_count,
            "elapsed_s": self.elapsed,
            "generator": self.generator.state_dict(),
            "g_opt": self.g_opt.state_dict(),
            "g_scaler": self.g_scaler.state_dict(),
            "discriminator": None
            if self.discriminator is None
            else self.discriminator.state_dict(),
            "d_opt": None if self.d_opt is None else self.d_opt.state_dict(),
            "d_scaler": self.d_scaler.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "mix_rng": self.mix_rng.get_state(),
            "data": self.data.source,
            "input_offset": self.offset,
            "input_scale": self.scale,
            "reference_width": self.data.reference_width,
            "reference_level": self.reference_level,
            "command": self.command,
            "hardware": describe_hardware(self.device),
            "history": self.history,
            "baseline": self.baseline,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(self.state(), partial)
        partial.replace(path)
        return path

    def restore(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.g_opt.load_state_dict(state["g_opt"])
        self.g_scaler.load_state_dict(state["g_scaler"])
        if self.discriminator is not None and self.d_opt is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_opt.load_state_dict(state["d_opt"])
        self.d_scaler.load_state_dict(state["d_scaler"])
        self.rng.bit_generator.state = state["numpy_rng"]
        self.mix_rng.set_state(state["mix_rng"])
        self.step_count = int(state["step"])
        self.elapsed = float(state["elapsed_s"])
        self.history = list(state["history"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `Trainer.save`; ModelError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelError(f"{path} is not a tomocast training checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(
            f"{path} is not a tomocast training checkpoint (format {CHECKPOINT_FORMAT} expected)"
        )
    return state


def resume(
    path: str | Path,
    data: TrainingData,
    device: torch.device | str,
    command: str = "",
    **changes: Any,
) -> Trainer:
    """The Trainer saved at `path`, continued on `data` (which must be the same data set).
    `changes` may raise `steps` or change `val_every` / `checkpoint_every`; `command` (the
    resuming command line) is appended to the recorded one, so the record stays repeatable."""
    state = load_checkpoint(path)
    if state["data"] != data.source:
        raise ModelError(f"{path} was trained on '{state['data']}', not on '{data.source}'")
    allowed = {"steps", "val_every", "checkpoint_every"}
    if set(changes) - allowed:
        raise ValueError(f"a resumed run can only change {', '.join(sorted(allowed))}")
    config = replace(TrainConfig(**state["config"]), **changes)
    recorded = " && ".join(part for part in (state["command"], command) if part)
    trainer = Trainer(config, data, device, command=recorded, initialise=False)
    trainer.restore(state)
    return trainer


def run(trainer: Trainer, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train to `config.steps`, validating and checkpointing on schedule; write the final
    checkpoint and `summary.json` (timing, peak memory, last validation) into `out_dir`."""
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_FILE
    first_step = trainer.step_count
    elapsed_before = trainer.elapsed
    with PeakMemory(trainer.device) as memory:
        last = _train(trainer, checkpoint, progress)
    trainer.save(checkpoint)
    steps_run = trainer.step_count - first_step
    seconds = trainer.elapsed - elapsed_before
    config = trainer.config
    summary = {
        "arch": config.arch,
        "precision": config.precision,
        "device": str(trainer.device),
        "hardware": describe_hardware(trainer.device),
        "steps": steps_run,
        "batch": config.batch,
        "patch": config.patch,
        "train_seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(steps_run, 1), 4),
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_what": memory.what,
        "validation": last,
        "baseline": trainer.baseline,
        "checkpoint": str(checkpoint),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _train(trainer: Trainer, checkpoint: Path, progress: bool) -> dict[str, float]:
    """The steps up to `config.steps` with a progress bar, validating every `val_every` steps
    and at the last, checkpointing every `checkpoint_every`; returns the last validation."""
    from tqdm import tqdm

    config = trainer.config
    last: dict[str, float] = trainer.history[-1] if trainer.history else {}
    with tqdm(
        total=config.steps,
        initial=trainer.step_count,
        disable=not progress,
        desc=f"train {config.arch}",
        unit="step",
        dynamic_ncols=True,
    ) as bar:
        while trainer.step_count < config.steps:
            losses = trainer.step()
            shown = {key: f"{value:.4g}" for key, value in losses.items()}
            if trainer.step_count % config.val_every == 0 or trainer.step_count == config.steps:
                last = trainer.validate()
                log.info(
                    "step %d: %s; validation PSNR %.2f dB SSIM %.4f",
                    trainer.step_count,
                    shown,
                    last["psnr"],
                    last["ssim"],
                )
            if last:
                shown.update(psnr=f"{last['psnr']:.2f}", ssim=f"{last['ssim']:.3f}")
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if trainer.step_count % config.checkpoint_every == 0:
                trainer.save(checkpoint)
    return last
