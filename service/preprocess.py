"""A scan's data made ready for FBP, as the `[preprocess]` settings say: the steps of
`workers.preprocess` applied in the service, on the scan's device (CPU or CUDA, the same code).

Two places, in data order:

- on the ingest thread, per chunk of raw projections (`FrameSteps.normalize`, called by
  `service.sinogram.ScanBuffer` instead of the plain flat-field correction): zingers replaced
  in the dark-subtracted counts, then Paganin phase retrieval on the transmission, then -log.
  These work on whole frames before -log, so they cannot wait for the complete sinogram, and
  done as the chunks arrive they add nothing to the scan's tail;
- on the worker's thread, once per complete scan, before its first FBP batch
  (`ScanPreprocessor.apply`): stripes removed from the sinograms, the rotation centre chosen
  (scan_start's > `preprocess.center` as a number > estimated from the data), and a
  360-degree offset-axis scan stitched to 180 degrees (`preprocess.half_acquisition`).

Where the centre came from is one of `CENTER_SOURCES`: "declared" (scan_start), "config"
(`preprocess.center` a number), "estimated" (from the data) or "default" (the detector's middle,
cols/2, when an estimate was impossible: fewer than 8 angles or columns, uneven angles; logged).
The centre the geometry preparer can know ahead (`known_center`) is the declared or configured
one; an estimated centre gives the scan its own geometry key in the reconstructor's cache,
built by the scan's first batch. A 180-degree scan's centre is estimated as soon as all its
angles are in, on the ingest thread (`early_center`, called by `service.preview.PreviewTap`,
which hands it to the previews and, through `estimated_early`, to the final slices); the
end-of-scan estimate is the fallback.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from service.config import PAGANIN_META, PreprocessSettings
from service.metrics import Metrics
from service.protocol import ScanStart
from workers.preprocess import (
    find_center,
    find_half_acquisition_center,
    flat_field,
    minus_log,
    normalize,
    paganin_filter,
    remove_stripes,
    remove_zingers,
    stitch_half_acquisition,
)
from workers.preprocess.halfacq import stitched_width

if TYPE_CHECKING:
    from service.sinogram import CompletedScan, ScanBuffer

log = logging.getLogger(__name__)

CENTER_SOURCES = ("declared", "config", "estimated", "default")
# Rows of the sinogram the centre is estimated on, spread over its middle half (Vo's metric is
# averaged over them: a few are plenty, and each costs about as much as the estimate on one).
CENTER_ROWS = 3
# Sinogram rows processed at once by the whole-scan steps (stripes, stitching): their float32
# temporaries stay this small whatever the scan's size.
ROW_BLOCK = 8


@dataclass(frozen=True)
class Preprocessing:
    """What was done to a scan before FBP: the centre's source (`CENTER_SOURCES`), the steps
    applied (setting -> what ran, e.g. {"stripe_removal": "filtering"}) and the zinger pixels
    replaced. Carried by `CompletedScan`, published in `scan_completed`, archived."""

    center_source: str
    applied: dict[str, str] = field(default_factory=dict)
    zinger_pixels: int = 0


@dataclass(frozen=True)
class Paganin:
    """Phase retrieval's parameters for one scan (`workers.preprocess.paganin_filter`)."""

    energy_kev: float
    distance_m: float
    pixel_size_m: float
    delta_beta: float


class FrameSteps:
    """One scan's steps on raw frames, before -log. Owned by the scan's `ScanBuffer` on the
    ingest thread; `zinger_pixels` is read when the scan completes, on the same thread."""

    def __init__(
        self,
        zingers: bool = False,
        paganin: Paganin | None = None,
        metrics: Metrics | None = None,
        applied: dict[str, str] | None = None,
    ) -> None:
        self.zingers = zingers
        self.paganin = paganin
        self.metrics = metrics
        self.applied = dict(applied or {})  # setting -> what ran (or why not)
        self.zinger_pixels = 0

    def done(self, start: ScanStart) -> Preprocessing:
        """What these steps did to `start`'s scan, as it completes; its centre not chosen yet
        ("declared" or "default", what it is without a `ScanPreprocessor`)."""
        source = "declared" if start.center is not None else "default"
        return Preprocessing(source, dict(self.applied), self.zinger_pixels)

    def normalize(
        self, frames: torch.Tensor, dark: torch.Tensor, flat: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """(count, rows, cols) raw frames -> float32 line integrals and the pixels clipped
        before -log, as `workers.preprocess.normalize`, with zingers and phase in between."""
        if not (self.zingers or self.paganin):
            return normalize(frames, dark, flat)
        if not self.zingers:
            transmission = flat_field(frames, dark, flat)
        else:
            # the median test on counts above the dark, where the noise is Poisson
            counts = flat_field(frames, dark, dark + 1.0)
            counts, found = remove_zingers(counts, in_place=True)  # counts is ours
            self.zinger_pixels += found
            if found and self.metrics is not None:
                self.metrics.zinger_pixels.inc(found)
            transmission = counts.mul_(torch.reciprocal(flat.to(counts.device) - dark))
        if self.paganin is not None:
            p = self.paganin
            transmission = paganin_filter(  # transmission is ours: filtered in place
                transmission,
                p.energy_kev,
                p.distance_m,
                p.pixel_size_m,
                p.delta_beta,
                in_place=True,
            )
        return minus_log(transmission)


class ScanPreprocessor:
    """The `[preprocess]` settings applied to scans. Stateless between scans: `frame_steps`
    is called on the ingest thread, `known_center` on the ingest and prepare threads, `apply`
    on the worker's; the metrics it updates are thread-safe."""

    def __init__(self, settings: PreprocessSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics

    # ---- at scan start (ingest thread) ---------------------------------------------------

    def frame_steps(self, start: ScanStart) -> FrameSteps:
        """The steps on `start`'s raw frames. A normalized scan has no raw frames: its zingers
        and phase retrieval are skipped (logged); so is phase retrieval without its
        parameters."""
        s, applied = self.settings, {}
        wanted = {"zingers": s.zingers != "none", "phase_retrieval": s.phase_retrieval != "none"}
        if start.normalized:
            for step in (name for name, on in wanted.items() if on):
                applied[step] = "skipped: the scan sends line integrals (normalized)"
                log.warning("scan_id=%s %s not applied: %s", start.scan_id, step, applied[step])
            return FrameSteps(applied=applied)
        paganin = None
        if wanted["phase_retrieval"]:
            paganin, why = self.paganin_for(start)
            applied["phase_retrieval"] = "paganin" if paganin is not None else f"skipped: {why}"
            if paganin is None:
                log.warning("scan_id=%s phase retrieval not applied: %s", start.scan_id, why)
        if wanted["zingers"]:
            applied["zingers"] = "auto"
        return FrameSteps(wanted["zingers"], paganin, self.metrics, applied)

    def paganin_for(self, start: ScanStart) -> tuple[Paganin | None, str]:
        """Phase retrieval's parameters from `start.meta` (first) or the settings, or None and
        what is missing or wrong."""
        values: dict[str, float] = {}
        for name in PAGANIN_META:
            value: Any = start.meta.get(name, getattr(self.settings, name))
            if value is None:
                return None, f"no {name} (scan_start meta or preprocess.{name})"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None, f"meta {name}={value!r} is not a number"
            least_zero = name == "distance_m"
            if not math.isfinite(value) or value < 0 or (value == 0 and not least_zero):
                return None, f"{name}={value!r} must be {'>= 0' if least_zero else '> 0'}"
            values[name] = float(value)
        return Paganin(**values), ""

    def known_center(self, start: ScanStart) -> float | None:
        """The centre `start`'s scan will be reconstructed about, when it is known before its
        data (declared, or `preprocess.center` a number); None when it is found from the data
        (estimated, or a half-acquisition scan's stitched geometry)."""
        if self.settings.half_acquisition and _full_turn(start.theta_array()):
            return None
        if start.center is not None:
            return float(start.center)
        if not isinstance(self.settings.center, str):
            return float(self.settings.center)
        return None

    def early_center(self, scan: ScanBuffer) -> tuple[bool, float | None]:
        """The centre of a 180-degree scan being received, estimated as soon as its angles
        span [0, 180) (all of its projections are in, before its scan_end): (due, centre).
        Never due for a scan whose centre is known ahead (`known_center`) or that is not a
        half-turn (a full turn is estimated at its end by mirror registration, which also
        finds an axis near the detector's edge); due and None when the estimate failed (the
        end-of-scan estimate then decides). Called on the ingest thread: one estimate, once
        it is due."""
        start = scan.start
        if self.known_center(start) is not None or not isinstance(self.settings.center, str):
            return False, None
        theta = np.asarray(scan.theta, dtype=np.float64)
        if not _half_turn(theta) or not (scan.received & ~scan.raw).all():
            return False, None
        rows = scan.sinogram.shape[0]
        picked = np.unique(np.linspace(rows / 4, (3 * rows - 1) / 4, CENTER_ROWS).astype(int))
        sinograms = scan.sinogram[torch.as_tensor(picked, device=scan.sinogram.device)].float()
        try:
            center = find_center(sinograms, theta)
        except ValueError as exc:
            log.info("scan_id=%s no centre before the scan's end: %s", start.scan_id, exc)
            return True, None
        if not (math.isfinite(center) and 0 <= center <= start.cols):
            return True, None
        log.info(
            "scan_id=%s centre %.3f px estimated as the projections arrived (the detector's "
            "middle is %g)",
            start.scan_id,
            center,
            start.cols / 2,
        )
        return True, center

    # ---- at scan end (worker thread) -----------------------------------------------------

    def apply(self, scan: CompletedScan) -> CompletedScan:
        """`scan` with its stripes removed (in place, in its sinogram), its centre chosen
        and, for a half-acquisition scan, stitched to 180 degrees."""
        t0 = time.perf_counter()
        start, settings = scan.start, self.settings
        frames = scan.preprocessing
        applied = dict(frames.applied) if frames is not None else {}
        if settings.stripe_removal != "none":
            applied["stripe_removal"] = _remove_stripes(scan, settings.stripe_removal)
        stitch = settings.half_acquisition and _full_turn(scan.theta)
        if settings.half_acquisition and not stitch:
            applied["half_acquisition"] = "skipped: the scan is not a full turn"
        center, source = self._center(scan, stitch)
        log.info(
            "scan_id=%s centre %.3f px (%s; the detector's middle is %g)",
            start.scan_id,
            center,
            source,
            start.cols / 2,
        )
        if self.metrics is not None:
            self.metrics.center.set(center)
            self.metrics.centers.labels(source).inc()
        if stitch:
            try:
                scan = self._stitch(scan, center)
                applied["half_acquisition"] = f"stitched to {scan.start.cols} columns"
            except ValueError as exc:  # an axis on the detector's very edge
                applied["half_acquisition"] = f"skipped: {exc}"
                log.warning("scan_id=%s not stitched: %s", start.scan_id, exc)
                stitch = False
        if not stitch:
            scan = replace(scan, center=center)
        zingers = frames.zinger_pixels if frames is not None else 0
        # the no-harm guard's photon-noise model holds for measured line integrals only: after
        # a filter (stripes, Paganin) or a stitch it estimates the noise from the sinogram
        filtered = any(
            not str(applied.get(step, "skipped")).startswith("skipped")
            for step in ("stripe_removal", "phase_retrieval")
        )
        if stitch or filtered:
            scan = replace(scan, flat_counts=None)
        if self.metrics is not None:
            self.metrics.preprocess_seconds.observe(time.perf_counter() - t0)
        return replace(scan, preprocessing=Preprocessing(source, applied, zingers))

    def _center(self, scan: CompletedScan, full_turn_offset: bool) -> tuple[float, str]:
        """The centre on the scan's own detector and its source."""
        start = scan.start
        if start.center is not None:
            return float(start.center), "declared"
        if not isinstance(self.settings.center, str):
            return float(self.settings.center), "config"
        if scan.preprocessing is not None and scan.preprocessing.center_source == "estimated":
            return scan.center, "estimated"  # as the projections arrived (`early_center`)
        rows = scan.sinogram.shape[0]
        picked = np.unique(np.linspace(rows / 4, (3 * rows - 1) / 4, CENTER_ROWS).astype(int))
        sinograms = scan.sinogram[torch.as_tensor(picked, device=scan.sinogram.device)].float()
        try:
            if full_turn_offset:
                center = find_half_acquisition_center(sinograms)
            else:
                center = find_center(sinograms, scan.theta)
        except ValueError as exc:
            log.warning(
                "scan_id=%s centre not estimated (%s): the detector's middle, %g",
                start.scan_id,
                exc,
                start.cols / 2,
            )
            return start.cols / 2, "default"
        if not (math.isfinite(center) and 0 <= center <= start.cols):
            log.warning(
                "scan_id=%s centre estimate %r is off the detector: the middle, %g",
                start.scan_id,
                center,
                start.cols / 2,
            )
            return start.cols / 2, "default"
        return center, "estimated"

    def _stitch(self, scan: CompletedScan, center: float) -> CompletedScan:
        """The scan as 180 degrees on the wider detector of `stitch_half_acquisition`."""
        sinogram = scan.sinogram
        rows, angles, cols = sinogram.shape
        width, _ = stitched_width(cols, center)
        half = angles // 2
        stitched = torch.empty((rows, half, width), dtype=sinogram.dtype, device=sinogram.device)
        wide_center = center
        for r0 in range(0, rows, ROW_BLOCK):
            block, wide_center = stitch_half_acquisition(
                sinogram[r0 : r0 + ROW_BLOCK].float(), center
            )
            stitched[r0 : r0 + ROW_BLOCK] = block
        theta = scan.theta[:half]
        start = replace(
            scan.start,
            cols=width,
            n_angles=half,
            theta=tuple(float(t) for t in theta),
            center=wide_center,
        )
        return replace(scan, start=start, sinogram=stitched, theta=theta, center=wide_center)


def estimated_early(scan: CompletedScan, center: float) -> CompletedScan:
    """`scan` to be reconstructed about `center`, estimated while its projections arrived
    (`ScanPreprocessor.early_center`): the end-of-scan estimate is not made again."""
    done = scan.preprocessing or Preprocessing("default")
    return replace(scan, center=center, preprocessing=replace(done, center_source="estimated"))


def preprocessing_fields(scan: CompletedScan) -> dict[str, Any]:
    """`center_source` and `preprocessing` of `scan`, as `ScanDescription` and `ScanCompleted`
    take them (a scan no `ScanPreprocessor` saw: its centre declared or the default)."""
    done = scan.preprocessing
    if done is None:
        done = Preprocessing("declared" if scan.start.center is not None else "default")
    return {"center_source": done.center_source, "preprocessing": dict(done.applied)}


def _remove_stripes(scan: CompletedScan, method: str) -> str:
    """Stripes removed from `scan`'s (rows, angles, cols) sinogram in place, `ROW_BLOCK` rows
    at a time (float32 whatever its storage); returns what ran, or why not (a detector too
    narrow for the method's window: logged, the scan goes on without)."""
    sinogram = scan.sinogram
    try:
        for r0 in range(0, sinogram.shape[0], ROW_BLOCK):
            block = sinogram[r0 : r0 + ROW_BLOCK]
            cleaned = remove_stripes(block.float(), method, in_place=True)  # float32: the block
            if cleaned.data_ptr() != block.data_ptr():
                block.copy_(cleaned)
    except ValueError as exc:  # raised by the first block, before anything is written
        log.warning("scan_id=%s stripes not removed: %s", scan.start.scan_id, exc)
        return f"skipped: {exc}"
    return method


def _half_turn(theta: np.ndarray) -> bool:
    """Whether `theta` (radians, as received) spans [0, pi) in evenly spaced angles."""
    if len(theta) < 2:
        return False
    step = float(np.median(np.diff(theta)))
    return step > 0 and abs(step * len(theta) - math.pi) < 1.5 * step


def _full_turn(theta: np.ndarray) -> bool:
    """Whether `theta` (radians, as received) covers a full turn in an even number of evenly
    spaced angles: what a half-acquisition scan is."""
    if len(theta) < 2 or len(theta) % 2:
        return False
    step = float(np.median(np.diff(theta)))
    return step > 0 and abs(step * len(theta) - 2 * math.pi) < 1.5 * step
