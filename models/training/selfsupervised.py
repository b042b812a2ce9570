"""Self-supervised adaptation of a denoiser to one recorded scan (Noise2Inverse).

A user's sample has no clean reference, but its scan holds independent noise in every
projection. Noise2Inverse (Hendriksen, Pelt and Batenburg, IEEE TCI 6, 2020) uses that: the
projections are split into K interleaved angle subsets (default 2: even and odd angles), each
subset is reconstructed on its own with the project's FBP (`workers.recon`), and the network
learns to predict subset j's reconstruction from the mean of the others'. The noise of the two
sides is independent and zero-mean, so minimising the MSE against the noisy target trains
towards the clean reconstruction; every j takes its turn as the target. At inference the
service's engine denoises the full scan's FBP, as it does for any artifact.

The run is an ordinary `models.training.train.Trainer` on these pairs, started from a given
artifact's weights (`models.training.warm_start`), so checkpoints, resuming and `tomocast export`
work as for `tomocast train`. What differs is the bound: a budget of training seconds (total,
also when resuming) besides the step count.

Targets outside the field of view are 0. The pixels beyond the circle of diameter N about the
axis (the slice's corners) are not crossed by the rays of every angle, so FBP leaves there a
wash of values no scan can pin down: on the held-out `cells` phantom the noise-free FBP of all
360 views scores 35.3 dB against the phantom inside that circle and 16.7 dB outside it, 23.2 dB
over the whole slice (`python tools/fov_split.py --family cells`). Learning Noise2Inverse's
target there would teach the network to paint that wash back, which the supervised training
(phantoms are zero outside the circle) had taught it to remove; with the corners' target
set to 0 the adapted network keeps removing it, and adaptation from the shipped default lifts
the whole-slice PSNR on held-out `cells` at 200 photons instead of lowering it
(docs/adaptation.md). `FIELD_OF_VIEW_TARGETS` turns it off.

Input conventions are the engine's: depth adjacent slices as channels (edges replicated), and
each scan mapped to the artifact's training level by one factor, the full FBP's intensity level
over the artifact's (`workers.denoise.DenoiseEngine.scale_for`). The pairs are divided by that
factor and the artifact's input_offset, input_scale, reference_level and reference_width are
kept, so the adapted artifact maps every scan exactly as the one it started from.

The service runs the same code on each completed scan with `model.adapt = true`
(`service.adapt`): it hands `adapter` the scan's kept rows as `ScanLineIntegrals` and its own FBP
settings as `FBPChoice`, and `adapt` a stop callable.

Raw data: DXchange (`service.sim.replay`) or NXtomo (`service.sim.nxtomo`) files, flat-field
corrected and -log'ed as the service does (`workers.preprocess.flatfield`); files without flats
hold line integrals already. A range of detector rows bounds memory and time on large detectors.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.training.dataset import SlicePairs, TrainingData
from models.training.train import CHECKPOINT_FILE, SUMMARY_FILE, TrainConfig, Trainer, resume
from service.errors import DataError
from workers.fbp_base import circle_mask
from workers.recon import ReconSession, recon

log = logging.getLogger(__name__)

DEFAULT_SUBSETS = 2
# Noise2Inverse targets outside the field of view (the circle every angle sees) set to 0
FIELD_OF_VIEW_TARGETS = True
# What a run may change: every weight, or only the network's last layers (the 1x1 convolutions
# of TomoGAN's head, `head.*`: a per-pixel remap of its features, few weights to fit to noisy
# targets).
TUNED = {"all": (), "head": ("head.",)}
# Projections read from the file at a time: memory stays at one chunk of whole frames.
READ_CHUNK = 32


@dataclass(frozen=True)
class FBPChoice:
    """How the subsets are reconstructed: `workers.recon.recon`'s method, filter and circle
    mask. The service passes its own (`[worker]` fbp_method, filter_name, circle_mask), so the
    network learns on the reconstructions it will denoise."""

    method: str = "auto"
    filter_name: str = "ramp"
    circle_mask: bool = False


@dataclass(frozen=True)
class ScanLineIntegrals:
    """A recorded scan's flat-field corrected line integrals, for the detector rows chosen.

    Plain data: read it from any thread, never write to it.
    """

    sinogram: np.ndarray  # (angles, rows, cols) float32
    theta: np.ndarray  # (angles,) radians
    center: float  # tomocast's convention (cols / 2 is the detector's middle)
    source: str  # the file and rows, in words

    @property
    def shape(self) -> tuple[int, int, int]:
        angles, rows, cols = self.sinogram.shape
        return angles, rows, cols


def read_scan(
    path: str | Path,
    rows: tuple[int, int] | None = None,
    center: float | None = None,
    entry: str | None = None,
) -> ScanLineIntegrals:
    """The line integrals of the DXchange or NXtomo file at `path`, detector rows
    [rows[0], rows[1]) (default all), about `center` (default: the file's, else the detector's
    middle). DataError names the file and what is wrong."""
    from service.sim.nxtomo import is_nxtomo, iter_nxtomo_chunks, read_nxtomo
    from service.sim.replay import iter_projection_chunks, read_dxchange
    from workers.preprocess.flatfield import average_frames, normalize

    path = Path(path)
    nexus = is_nxtomo(path)
    scan = read_nxtomo(path, entry, load_projections=False) if nexus else None
    if scan is None:
        if entry is not None:
            raise DataError(f"{path}: entry={entry!r} is for NXtomo files; this one has none")
        scan = read_dxchange(path, load_projections=False)
    n_angles, n_rows, cols = scan.shape
    first, last = rows if rows is not None else (0, n_rows)
    if not 0 <= first < last <= n_rows:
        raise DataError(f"{path}: rows {first}:{last} are not within the scan's {n_rows} rows")
    chunks = (
        iter_nxtomo_chunks(path, READ_CHUNK, scan.dtype, entry)
        if nexus
        else iter_projection_chunks(path, READ_CHUNK, scan.dtype)
    )
    sinogram = np.empty((n_angles, last - first, cols), dtype=np.float32)
    dark = flat = None
    if not scan.normalized:
        dark = (
            average_frames(torch.from_numpy(scan.darks[:, first:last]))
            if len(scan.darks)
            else torch.zeros((last - first, cols))
        )
        flat = average_frames(torch.from_numpy(scan.flats[:, first:last]))
    clipped = 0
    for index, frames in chunks:
        part = torch.from_numpy(np.ascontiguousarray(frames[:, first:last]))
        if dark is not None and flat is not None:
            part, count = normalize(part, dark, flat)
            clipped += count
        sinogram[index : index + len(frames)] = part.numpy()
    if clipped:
        log.warning("%s: %d pixels clipped to a usable transmission", path, clipped)
    if not np.all(np.isfinite(sinogram)):
        raise DataError(f"{path}: the line integrals hold NaN or infinite values")
    chosen = center if center is not None else scan.center
    return ScanLineIntegrals(
        sinogram,
        np.asarray(scan.theta, dtype=np.float64),
        cols / 2 if chosen is None else float(chosen),
        f"{path.name} rows {first}-{last - 1} ({n_angles} angles, {cols} columns)",
    )


def split_angles(n_angles: int, subsets: int) -> list[np.ndarray]:
    """K interleaved subsets of the angle indices: subset j holds j, j + K, j + 2K, ...
    (every angle in exactly one; each spans the whole rotation, so each reconstructs the
    whole slice)."""
    if subsets < 2:
        raise ValueError(f"subsets={subsets}: Noise2Inverse needs at least 2")
    if n_angles < 2 * subsets:
        raise DataError(
            f"{n_angles} angles cannot make {subsets} subsets of at least 2 angles: "
            "lower the subsets"
        )
    return [np.arange(j, n_angles, subsets) for j in range(subsets)]


def subset_reconstructions(
    scan: ScanLineIntegrals,
    subsets: int = DEFAULT_SUBSETS,
    device: str | None = "cpu",
    session: ReconSession | None = None,
    fbp: FBPChoice = FBPChoice(),
) -> np.ndarray:
    """(K, rows, N, N) float32: the FBP of each interleaved angle subset (`split_angles`)."""
    session = session or ReconSession()
    volumes = []
    for chosen in split_angles(len(scan.theta), subsets):
        sinogram, theta = scan.sinogram[chosen], scan.theta[chosen]
        volumes.append(
            recon(
                sinogram,
                theta,
                scan.center,
                filter_name=fbp.filter_name,
                device=device,
                circle_mask=fbp.circle_mask,
                method=fbp.method,
                session=session,
            )
        )
    return np.stack(volumes)


def noise2inverse_pairs(
    reconstructions: np.ndarray, field_of_view: bool = FIELD_OF_VIEW_TARGETS
) -> tuple[np.ndarray, np.ndarray]:
    """(K, rows, N, N) subset FBPs -> (inputs, targets), each (K, rows, N, N): for each j the
    mean of the other subsets' FBPs and subset j's own, which is 0 outside the field of view
    (`field_of_view`: beyond the circle of diameter N about the slice's centre)."""
    if reconstructions.ndim != 4 or reconstructions.shape[0] < 2:
        raise ValueError(
            f"expected (K >= 2, rows, N, N) reconstructions, got {reconstructions.shape}"
        )
    k = reconstructions.shape[0]
    total = reconstructions.sum(axis=0, dtype=np.float64)
    inputs = ((total[None] - reconstructions) / (k - 1)).astype(np.float32)
    targets = reconstructions.astype(np.float32, copy=not field_of_view)
    if field_of_view:
        n = targets.shape[-1]
        targets = targets * circle_mask(n, torch.device("cpu")).numpy()
    return inputs, targets


@dataclass(frozen=True)
class AdaptationData(TrainingData):
    """Noise2Inverse pairs of one scan in the form `Trainer` takes, normalised as the artifact
    the run starts from: its reference level and width are kept, not fitted again."""

    artifact_level: float | None = None
    artifact_width: int | None = None

    @property
    def reference_width(self) -> int | None:
        return self.artifact_width

    @property
    def reference_level(self) -> float | None:
        return self.artifact_level


def adaptation_data(
    scan: ScanLineIntegrals,
    init: str | Path,
    subsets: int = DEFAULT_SUBSETS,
    device: str | None = "cpu",
    fbp: FBPChoice = FBPChoice(),
) -> AdaptationData:
    """The training pairs of `scan` for fine-tuning the artifact `init`: K pairs of volumes
    (`noise2inverse_pairs`), divided by the scan's factor (its full FBP's intensity level over
    the artifact's), in the artifact's normalisation. The test pairs are the same volumes:
    validation scores whole slices against the held-out subset's FBP, noise included (a figure
    to compare between steps, not a PSNR against the truth)."""
    from models.artifact import load_artifact
    from workers.intensity import intensity_level

    _, metadata = load_artifact(init, "cpu")
    session = ReconSession()
    reconstructions = subset_reconstructions(scan, subsets, device, session, fbp)
    # The mean of the subsets' FBPs is the full scan's FBP (FBP is linear, each subset weighs
    # its angles by pi / its count; exactly so when K divides the angles): the scan's level as
    # the engine will measure it.
    level = intensity_level(torch.from_numpy(reconstructions.mean(axis=0)))
    if not (math.isfinite(level) and level > 0):
        raise DataError(f"{scan.source}: the reconstruction is all zero; nothing to adapt to")
    factor = level / metadata.level
    inputs, targets = noise2inverse_pairs(reconstructions / np.float32(factor))
    k, rows, height, width = inputs.shape
    pairs = SlicePairs(
        inputs.reshape(k * rows, height, width),
        targets.reshape(k * rows, height, width),
        (rows,) * k,
    )
    source = (
        f"self-supervised (Noise2Inverse, {subsets} interleaved angle subsets) on {scan.source}, "
        f"centre {scan.center:g}, from {Path(init).name}"
    )
    return AdaptationData(
        pairs,
        pairs,
        source,
        metadata.input_offset,
        metadata.input_scale,
        per_pixel_units=metadata.reference_width is not None,
        artifact_level=metadata.level,
        artifact_width=metadata.reference_width,
    )


def adaptation_config(init: str | Path, **settings: Any) -> TrainConfig:
    """The run's TrainConfig: the artifact's architecture and depth, pixel MSE only (the
    target is noisy: an adversarial or perceptual term would learn its noise), `settings`
    for the rest (patch, batch, steps, lr, precision, seed, val_every, ...)."""
    from models.artifact import load_artifact

    _, metadata = load_artifact(init, "cpu")
    if metadata.arch == "placeholder":
        raise DataError(f"{init}: the placeholder filter has nothing to fine-tune")
    return TrainConfig(
        arch=metadata.arch,
        depth=metadata.depth,
        lambda_adv=0.0,
        lambda_perc=0.0,
        init=str(init),
        **settings,
    )


def adapter(
    scan: ScanLineIntegrals,
    init: str | Path,
    device: str = "cpu",
    subsets: int = DEFAULT_SUBSETS,
    command: str = "",
    resume_from: str | Path | None = None,
    tune: str = "all",
    fbp: FBPChoice = FBPChoice(),
    **settings: Any,
) -> Trainer:
    """A Trainer fine-tuning `init` on `scan` (new), or the one saved at `resume_from`
    (`settings` may then change steps, val_every, checkpoint_every only). `tune`: which
    weights change (`TUNED`); the others are frozen. `fbp`: how the subsets are
    reconstructed."""
    if tune not in TUNED:
        raise ValueError(f"tune={tune!r}: choose one of {', '.join(TUNED)}")
    data = adaptation_data(scan, init, subsets, device, fbp)
    if resume_from is not None:
        trainer = resume(resume_from, data, device, command=command, **settings)
    else:
        trainer = Trainer(adaptation_config(init, **settings), data, device, command=command)
    prefixes = TUNED[tune]
    if prefixes:
        names = [name for name, _ in trainer.generator.named_parameters()]
        if not any(name.startswith(prefixes) for name in names):
            raise DataError(f"tune={tune!r}: {trainer.config.arch} has no such layers")
        for name, parameter in trainer.generator.named_parameters():
            # Adam skips parameters without a gradient: frozen ones keep their values.
            parameter.requires_grad_(name.startswith(prefixes))
    return trainer


def adapt(
    trainer: Trainer,
    out_dir: str | Path,
    seconds: float,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
    clock: str = "wall",
) -> dict[str, Any]:
    """Train until `seconds` or the config's steps, whichever comes first, or until `stop()`
    is true; validate every `val_every` steps and at the end, checkpoint every
    `checkpoint_every` steps and at the end. Writes checkpoint.pt and summary.json into
    `out_dir`; returns the summary. `clock`: "wall" counts the seconds of training steps in
    all (also across resumes), "cpu" this process's CPU seconds in this call (on a machine
    shared with other jobs, what the run itself cost)."""
    import json

    from tqdm import tqdm

    from models.training.train import describe_hardware

    if not seconds > 0:
        raise ValueError(f"seconds={seconds} must be > 0")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock={clock!r}: choose wall or cpu")
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_FILE
    config = trainer.config
    first_step, started = trainer.step_count, time.monotonic()
    cpu_started = time.process_time()
    last = trainer.history[-1] if trainer.history else {}

    def spent() -> float:
        return trainer.elapsed if clock == "wall" else time.process_time() - cpu_started

    def done() -> bool:
        return (
            trainer.step_count >= config.steps
            or spent() >= seconds
            or (stop is not None and stop())
        )

    with tqdm(
        total=round(seconds),
        initial=min(round(spent()), round(seconds)),
        disable=not progress,
        desc="adapt",
        unit="s",
        dynamic_ncols=True,
    ) as bar:
        while not done():
            before = spent()
            losses = trainer.step()
            if trainer.step_count % config.val_every == 0 or done():
                last = trainer.validate()
                log.info(
                    "step %d (%.0f s): loss %.4g; held-out subset PSNR %.2f dB",
                    trainer.step_count,
                    trainer.elapsed,
                    losses["loss"],
                    last["psnr"],
                )
            shown = {"step": trainer.step_count, "loss": f"{losses['loss']:.4g}"}
            if last:
                shown["psnr"] = f"{last['psnr']:.2f}"
            bar.set_postfix(shown, refresh=False)
            bar.update(min(spent(), seconds) - min(before, seconds))
            if trainer.step_count % config.checkpoint_every == 0:
                trainer.save(checkpoint)
    if not last or last.get("step") != trainer.step_count:
        last = trainer.validate()
    trainer.save(checkpoint)
    steps = trainer.step_count - first_step
    summary = {
        "mode": "self-supervised",
        "data": trainer.data.source,
        "arch": config.arch,
        "device": str(trainer.device),
        "hardware": describe_hardware(trainer.device),
        "steps": steps,
        "total_steps": trainer.step_count,
        "train_seconds": round(trainer.elapsed, 3),
        "wall_seconds": round(time.monotonic() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu_started, 3),
        "seconds_budget": seconds,
        "clock": clock,
        "validation": last,
        "baseline": trainer.baseline,
        "checkpoint": str(checkpoint),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
