"""A simulated detector scan of a foam phantom: darks, flats and noisy projections.

The counting model is a photon-counting detector behind a slightly non-uniform beam:
  dark       = Poisson(dark offset)                      (per-pixel fixed-pattern offset)
  flat       = Poisson(photons * beam + dark offset)
  projection = Poisson(photons * beam * exp(-p) + dark offset)
clipped into the scan dtype's range, so (projection - dark) / (flat - dark) ~ exp(-p) and a
flat-field corrected -log gives the line integrals `p` of the phantom back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from service.protocol import DTYPES, ScanStart
from workers.phantom import FoamPhantom
from workers.phantoms import Phantom, make_phantom

log = logging.getLogger(__name__)

BEAM_DIP = 0.1  # the beam's intensity falls by up to 10% towards the detector's edges
DARK_SPREAD = 0.05  # pixel-to-pixel spread of the dark offset, relative


@dataclass(frozen=True)
class Faults:
    """What a real detector adds that the flat-field correction does not remove; each off by
    default. The service's preprocessing (`[preprocess]` settings, workers/preprocess) repairs
    them, so a user can see each fault and its repair.

    - `center_offset`: the rotation axis sits this many pixels right of the detector's middle
      and scan_start declares no centre (the service must estimate it);
    - `rings`: relative spread of a per-pixel gain that the flats do not capture (0.02-0.03 is
      typical of a scintillator's defects): rings in every slice;
    - `zingers`: the fraction of projection pixels hit by a stray photon (saturated);
    - `half_acquisition`: a 360-degree scan with the axis near the detector's right edge
      (offset-axis, to image a sample up to twice the detector's width); no centre declared.
    """

    center_offset: float = 0.0
    rings: float = 0.0
    zingers: float = 0.0
    half_acquisition: bool = False

    def __post_init__(self) -> None:
        if self.rings < 0 or not 0 <= self.zingers < 1:
            raise ValueError(f"rings={self.rings} must be >= 0, zingers={self.zingers} in [0, 1)")

    def geometry(
        self, cols: int, n_angles: int, center: float | None
    ) -> tuple[float, float | None, tuple[float, ...] | None, int]:
        """(the axis the data are simulated with, the centre scan_start declares, theta (None:
        the protocol's default half turn), the slice width of the phantom)."""
        if not (self.center_offset or self.half_acquisition):
            return (cols / 2 if center is None else center), center, None, cols
        if center is not None:
            raise ValueError("a simulated centre fault declares no centre: drop --center")
        if self.half_acquisition:
            overlap = max(8, cols // 8)  # columns seen from both sides of the axis
            axis = float(cols - overlap) + self.center_offset
            theta = tuple((np.arange(n_angles) * 2 * np.pi / n_angles).tolist())
            return axis, None, theta, 2 * (cols - overlap)
        return cols / 2 + self.center_offset, None, None, cols


@dataclass
class SimulatedScan:
    """One scan as a DAQ would send it, with the ground truth it was made from.

    Plain data: build it once, then read it from any thread.
    """

    start: ScanStart
    darks: np.ndarray  # (n_dark, rows, cols) of start.dtype
    flats: np.ndarray  # (n_flat, rows, cols) of start.dtype
    projections: np.ndarray  # (n_angles, rows, cols) of start.dtype
    truth: np.ndarray  # (rows, N, N) float32 attenuation per pixel (N = cols, or wider
    # for a half-acquisition scan)
    line_integrals: np.ndarray  # (n_angles, rows, cols) float32, noise-free
    phantom: Phantom
    family: str = "foam"

    @property
    def theta(self) -> np.ndarray:
        """Projection angles in radians (evenly spaced over [0, pi) unless a fault says so)."""
        return self.start.theta_array()


def simulate_scan(
    scan_id: str,
    rows: int = 64,
    cols: int = 256,
    n_angles: int = 360,
    photons: float = 1000.0,
    n_dark: int = 10,
    n_flat: int = 10,
    dark_level: float = 100.0,
    seed: int = 0,
    center: float | None = None,
    n_spheres: int | None = None,
    dtype: str = "uint16",
    meta: dict[str, Any] | None = None,
    faults: Faults | None = None,
    family: str = "foam",
    attenuation: float = 1.0,
) -> SimulatedScan:
    """Simulate a scan of a random phantom of `family` (`workers.phantoms.FAMILIES`; default
    a foam, `FoamPhantom.random(rows, cols, ...)`; `n_spheres` is the foam's) at `attenuation`
    times the family's default.

    `photons` is the mean open-beam count per pixel and frame, `dark_level` the mean dark
    offset. `center` (TomoPy's convention, default cols/2) is where the rotation axis lands on
    the detector: the data are simulated off-centre by it, and ScanStart carries it. `faults`
    adds what real detectors do (`Faults`); none by default, and then the scan is the same, bit
    for bit, as without the argument.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if photons <= 0 or dark_level < 0:
        raise ValueError(f"photons={photons} must be > 0 and dark_level={dark_level} >= 0")
    faults = faults or Faults()
    axis, declared, theta, size = faults.geometry(cols, n_angles, center)
    start = ScanStart(
        scan_id=scan_id,
        seq=0,
        rows=rows,
        cols=cols,
        n_angles=n_angles,
        dtype=dtype,
        theta=theta,
        center=declared,
        n_dark=n_dark,
        n_flat=n_flat,
        meta=dict(meta or {}),
    )
    phantom: Phantom = (
        FoamPhantom.random(rows, size, n_spheres=n_spheres, seed=seed, attenuation=attenuation)
        if family == "foam"
        else make_phantom(family, rows, size, seed=seed, attenuation=attenuation)
    )
    line_integrals = phantom.project(start.theta_array(), cols=cols, center=axis)
    darks, flats, projections = _detector(line_integrals, start, photons, dark_level, faults, seed)
    return SimulatedScan(
        start=start,
        darks=_to_dtype(darks, dtype),
        flats=_to_dtype(flats, dtype),
        projections=_to_dtype(projections, dtype),
        truth=phantom.voxelize(),
        line_integrals=line_integrals,
        phantom=phantom,
        family=family,
    )


def _detector(
    line_integrals: np.ndarray,
    start: ScanStart,
    photons: float,
    dark_level: float,
    faults: Faults,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(darks, flats, projections) as Poisson counts of a detector with a dark offset that
    varies from pixel to pixel, a beam dimmer towards the edges, and `faults`."""
    rows, cols, dtype = start.rows, start.cols, start.dtype
    rng = np.random.default_rng(seed)
    open_beam = photons * _beam_profile(rows, cols)
    dark = dark_level * np.clip(1 + DARK_SPREAD * rng.standard_normal((rows, cols)), 0, None)
    darks = rng.poisson(dark, size=(start.n_dark, rows, cols))
    flats = rng.poisson(open_beam + dark, size=(start.n_flat, rows, cols))
    expected = np.exp(-line_integrals)
    expected *= open_beam
    expected *= _ring_gain(faults.rings, rows, cols, seed)
    expected += dark
    projections = _add_zingers(rng.poisson(expected), faults.zingers, dtype, seed)
    return darks, flats, projections


def _ring_gain(spread: float, rows: int, cols: int, seed: int) -> np.ndarray | float:
    """A per-pixel gain the flats do not see (it appears only with the sample in the beam):
    rings. 1.0 without the fault; its own random stream, so the rest of the scan is unchanged."""
    if not spread:
        return 1.0
    rng = np.random.default_rng((seed, 1))
    gain: np.ndarray = np.clip(1 + spread * rng.standard_normal((rows, cols)), 0, None)
    return gain


def _add_zingers(counts: np.ndarray, fraction: float, dtype: str, seed: int) -> np.ndarray:
    """`fraction` of the projection pixels saturated, as a stray photon saturates a pixel."""
    if fraction:
        hit = np.random.default_rng((seed, 2)).random(counts.shape) < fraction
        counts[hit] = np.iinfo(DTYPES[dtype]).max if DTYPES[dtype].kind != "f" else 65535
    return counts


def _beam_profile(rows: int, cols: int) -> np.ndarray:
    """A smooth beam, brightest in the middle, BEAM_DIP dimmer at the corners."""
    v = np.linspace(-1, 1, rows)[:, None] if rows > 1 else np.zeros((1, 1))
    u = np.linspace(-1, 1, cols)[None, :] if cols > 1 else np.zeros((1, 1))
    return 1 - BEAM_DIP * (0.3 * v**2 + 0.7 * u**2)


def _to_dtype(counts: np.ndarray, dtype: str) -> np.ndarray:
    target = DTYPES[dtype]
    if target.kind == "f":
        return counts.astype(target)
    top = np.iinfo(target).max
    saturated = int(np.count_nonzero(counts > top))
    if saturated:
        log.warning(
            "simulate: %d pixels saturate %s (> %d counts) and are clipped", saturated, dtype, top
        )
    clipped: np.ndarray = np.clip(counts, 0, top).astype(target)
    return clipped


def write_truth(path: str | Path, scan: SimulatedScan) -> None:
    """HDF5 ground truth: /truth/volume (rows, N, N) float32, /truth/theta (radians); scan_id,
    family, centre as attributes; for a foam also /truth/spheres (n, 4) columns x, y, z,
    radius, and its mu and cylinder radius."""
    phantom = scan.phantom
    with h5py.File(path, "w") as f:
        group = f.create_group("truth")
        group.create_dataset("volume", data=scan.truth, chunks=(1, *scan.truth.shape[1:]))
        group.create_dataset("theta", data=scan.theta)
        group.attrs.update(
            scan_id=scan.start.scan_id,
            family=scan.family,
            center=scan.start.rotation_center(),
            units="attenuation per pixel; theta in radians",
        )
        if isinstance(phantom, FoamPhantom):
            spheres = group.create_dataset("spheres", data=phantom.sphere_table())
            spheres.attrs["columns"] = json.dumps(["x", "y", "z", "radius"])
            group.attrs.update(mu=phantom.mu, cylinder_radius=phantom.cylinder_radius)


def write_dxchange(path: str | Path, scan: SimulatedScan) -> None:
    """A DXchange file as a beamline writes it: /exchange/data, data_dark, data_white, and
    /exchange/theta in degrees; /exchange attrs scan_id, center (when set) and meta (JSON)."""
    start = scan.start
    frame_chunks = (1, start.rows, start.cols)
    with h5py.File(path, "w") as f:
        f.create_dataset("implements", data="exchange")
        exchange = f.create_group("exchange")
        exchange.create_dataset("data", data=scan.projections, chunks=frame_chunks)
        for name, frames in (("data_dark", scan.darks), ("data_white", scan.flats)):
            exchange.create_dataset(name, data=frames, chunks=frame_chunks if len(frames) else None)
        theta = exchange.create_dataset("theta", data=np.degrees(scan.theta))
        theta.attrs["units"] = "degrees"
        exchange.attrs["scan_id"] = start.scan_id
        if start.center is not None:
            exchange.attrs["center"] = float(start.center)
        if start.meta:
            exchange.attrs["meta"] = json.dumps(start.meta)


class ScanPacer:
    """Paces a sending loop to `rate_hz` frames per second; None sends as fast as possible.

    Deadlines are absolute (first call + frames sent / rate on time.monotonic), so the time a
    caller spends between calls never accumulates as drift; a caller that falls behind (a
    blocked socket) catches up without waiting. Owned by one thread.
    """

    def __init__(self, rate_hz: float | None) -> None:
        if rate_hz is not None and not rate_hz > 0:
            raise ValueError(f"rate_hz={rate_hz} must be > 0 (or None for no pacing)")
        self.rate_hz = rate_hz
        self._start: float | None = None
        self._frames = 0

    def wait(self, n_frames: int = 1) -> float:
        """Block until `n_frames` more frames are due, then count them as sent.
        Call it before sending them; returns the seconds it waited."""
        if self.rate_hz is None:
            return 0.0
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self._frames / self.rate_hz
        self._frames += n_frames
        delay = due - now
        if delay <= 0:
            return 0.0
        time.sleep(delay)
        return delay
