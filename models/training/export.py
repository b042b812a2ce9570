"""`tomocast export`: a training checkpoint -> model artifacts the service loads.

Writes, into one folder, for a checkpoint of generator `arch` at `depth`:

- `NAME.pt`: TorchScript (`models.artifact.save_artifact`), metadata precision fp32;
- `NAME-fp16.pt`: the same network with precision fp16 (what the engine runs on CUDA; weights
  stay fp32 in the file and are halved on the GPU at load, see models/artifact.py);
- `NAME-fp16.pt2`: a `torch.export` ExportedProgram with the same metadata member, batch and
  H, W dynamic (H, W multiples of 8 from 16 up, which the engine's padding guarantees).

The metadata carries the architecture, depth, input normalisation (from the training data), the
training data, command, hardware and time, and the last validation metrics. Each file's
metadata `name` is its file stem, so a published slice says which file produced it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.artifact import (
    EXPORTED_SUFFIX,
    METADATA_FILE,
    ModelMetadata,
    TrainingRecord,
    save_artifact,
)
from models.networks import build_generator
from models.training.train import TrainConfig, load_checkpoint
from service.errors import ModelError

log = logging.getLogger(__name__)

FORMATS = ("fp32", "fp16", "pt2")
SIZE_MULTIPLE = 8  # what workers.denoise pads to
MIN_SIDE = 16  # the artifact probe's size; also keeps every U-Net level at least 1 px
MAX_SIDE = 8 * 4096


def generator_from_checkpoint(state: dict[str, Any]) -> tuple[nn.Module, TrainConfig]:
    """The checkpoint's generator in eval mode on the CPU, and its training config."""
    config = TrainConfig(**state["config"])
    generator = build_generator(config.arch, config.depth)
    generator.load_state_dict(state["generator"])
    return generator.eval(), config


def checkpoint_metadata(state: dict[str, Any], name: str, precision: str) -> ModelMetadata:
    config = TrainConfig(**state["config"])
    metrics: dict[str, float] = {"train_steps": float(state["step"])}
    history = state.get("history") or []
    if history:
        metrics.update(val_psnr_db=history[-1]["psnr"], val_ssim=history[-1]["ssim"])
    baseline = state.get("baseline") or {}
    if baseline:
        metrics.update(val_input_psnr_db=baseline["psnr"], val_input_ssim=baseline["ssim"])
    minutes = state["elapsed_s"] / 60
    return ModelMetadata(
        name=name,
        arch=config.arch,  # type: ignore[arg-type]
        depth=config.depth,
        precision=precision,  # type: ignore[arg-type]
        input_offset=float(state["input_offset"]),
        input_scale=float(state["input_scale"]),
        reference_width=state.get("reference_width"),
        reference_level=state.get("reference_level"),
        trained=True,
        training=TrainingRecord(
            data=state["data"],
            command=state["command"] or "unknown",
            hardware=state["hardware"],
            time=f"{minutes:.1f} min of training steps ({state['step']} steps, batch "
            f"{config.batch} x {config.patch}x{config.patch} px)",
        ),
        metrics=metrics,
    )


def save_exported(module: nn.Module, metadata: ModelMetadata, path: str | Path) -> Path:
    """`torch.export` `module` (CPU, fp32, eval) with dynamic batch and H, W (multiples of 8,
    MIN_SIDE..MAX_SIDE) and write it with `metadata` to `path` (atomically). The program is
    checked against the eager module on a second input shape before it is written."""
    from torch.export import Dim

    path = Path(path)
    if path.suffix != EXPORTED_SUFFIX:
        raise ModelError(f"{path}: an exported program must be named *{EXPORTED_SUFFIX}")
    eager = copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()
    seeded = torch.Generator().manual_seed(0)
    depth = metadata.depth
    example = torch.randn((2, depth, 64, 64), generator=seeded)
    other = torch.randn((1, depth, 24, 40), generator=seeded)
    side = {"min": MIN_SIDE // SIZE_MULTIPLE, "max": MAX_SIDE // SIZE_MULTIPLE}
    shapes = (
        {
            0: Dim("batch", min=1, max=4096),
            2: SIZE_MULTIPLE * Dim("rows8", **side),
            3: SIZE_MULTIPLE * Dim("cols8", **side),
        },
    )
    with torch.no_grad():
        program = torch.export.export(eager, (example,), dynamic_shapes=shapes)
        expected, got = eager(other), program.module()(other)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ModelError(
            f"exporting {type(module).__name__} to {path}: the program disagrees "
            f"with the module on a {tuple(other.shape)} input"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch.export.save warns about names not ending in .pt2.
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    try:
        torch.export.save(
            program, str(partial), extra_files={METADATA_FILE: metadata.model_dump_json(indent=2)}
        )
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    formats: Sequence[str] = FORMATS,
    reference_width: int | None = None,
) -> list[Path]:
    """Write the requested artifacts of `checkpoint` into `out_dir`; returns their paths.

    `reference_width` overrides the slice width the normalisation was fitted at, which
    `tomocast train` records in the checkpoint (for older checkpoints, which lack it); 0 makes the
    normalisation absolute."""
    state = load_checkpoint(checkpoint)
    if reference_width is not None:
        if reference_width < 0:
            raise ValueError(f"reference_width={reference_width} must be >= 0 (0: absolute)")
        state["reference_width"] = reference_width or None
    generator, config = generator_from_checkpoint(state)
    name = name or f"{config.arch}-d{config.depth}-s{state['step']}"
    out_dir = Path(out_dir)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats {sorted(unknown)}: choose from {', '.join(FORMATS)}")
    written = []
    if "fp32" in formats:
        written.append(
            save_artifact(
                generator, checkpoint_metadata(state, name, "fp32"), out_dir / f"{name}.pt"
            )
        )
    if "fp16" in formats:
        stem = f"{name}-fp16"
        written.append(
            save_artifact(
                generator, checkpoint_metadata(state, stem, "fp16"), out_dir / f"{stem}.pt"
            )
        )
    if "pt2" in formats:
        stem = f"{name}-fp16"
        written.append(
            save_exported(
                generator,
                checkpoint_metadata(state, stem, "fp16"),
                out_dir / f"{stem}{EXPORTED_SUFFIX}",
            )
        )
    for path in written:
        log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return written
