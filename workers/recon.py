"""TomoPy-compatible entry points: numpy in, numpy out, any device underneath; and the choice
between the two FBP methods.

`recon(tomo, theta, center)` takes TomoPy's (angles, rows, cols) line-integral stack and returns
(rows, cols, cols) slices in attenuation per pixel with TomoPy's `fbp`/ASTRA geometry (DESIGN.md,
"Geometry"); `project` is the matching forward projector for simulation. `make_reconstructor`
gives the service its `Reconstructor`: direct (`workers.fbp`), gridding (`workers.gridding`) or
"auto", which picks per geometry the one measured faster (docs/benchmarks.md).

`recon` keeps its reconstructors, and with them their geometry caches, in a `ReconSession`: a
user's loop over chunks of rows on one geometry builds the geometry (the gridding method's
spreading matrix) once, in the first call, and every later call runs at the service's speed.
The session `recon` uses unless handed another is `DEFAULT_SESSION`, an explicit module-level
object (its `clear()` frees what it holds); nothing else here keeps state between calls.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from types import MappingProxyType

import numpy as np
import torch

from workers.conventions import resolve_center, to_tomopy_center
from workers.fbp import FBP
from workers.filters import canonical_filter_name
from workers.gridding import GriddingFBP
from workers.project import project_tensor
from workers.protocols import PreparableReconstructor

ALGORITHMS = ("fbp", "gridrec")
METHODS = ("auto", "direct", "gridding")
# "tomocast": protocol v1's center (cols/2 = the detector's middle, TomoPy's fbp and ASTRA);
# Reconstructors a session keeps (one per device, method, filter and mask in use).
_SESSION_CAPACITY = 2
# TomoPy's names for our filters (its gridrec only knows these spellings).
_TOMOPY_FILTERS = MappingProxyType(
    {
        "ramp": "ramlak",
        "shepp-logan": "shepp",
        "cosine": "cosine",
        "hamming": "hamming",
        "hann": "hann",
        "parzen": "parzen",
    }
)
# Rows per FBP/projector call: enough to amortise the per-call index work, and at most about
# this many bytes of (rows, cols, cols) float32 output per call.
_ROWS_PER_BATCH = 16
_BATCH_BYTES = 256 << 20


def _rows_per_batch(n: int) -> int:
    return max(1, min(_ROWS_PER_BATCH, _BATCH_BYTES // (4 * n * n)))


def default_device() -> torch.device:
    """CUDA when a device is present, else the CPU (evaluated per call, never at import)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve(device: str | torch.device | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


class AutoFBP:
    """The FBP method measured faster for each geometry, satisfying `PreparableReconstructor`.

    On a CPU that is gridding (faster than direct at every width measured: docs/benchmarks.md)
    unless its spreading matrix would pass `max_matrix_bytes` (default 4 GiB). On CUDA it is
    direct until gridding is measured there (docs/benchmarks.md, "GPU"). Threading: owned by one
    worker thread, like both methods; it holds both, and each keeps its own geometry cache.
    `prepare` may be called from any thread, as on either method: it prepares the one
    `reconstruct` will use for that geometry.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        filter_name: str = "ramp",
        circle_mask: bool = False,
        max_matrix_bytes: int = 4 << 30,
    ) -> None:
        self.direct = FBP(device, filter_name=filter_name, circle_mask=circle_mask)
        self.gridding = GriddingFBP(device, filter_name=filter_name, circle_mask=circle_mask)
        self.max_matrix_bytes = max_matrix_bytes

    @property
    def device(self) -> torch.device:
        return self.direct.device

    def method_for(self, angles: int, cols: int) -> str:
        """ "direct" or "gridding": what `reconstruct` uses for (angles, cols) sinograms."""
        if self.device.type != "cpu":
            return "direct"
        if self.gridding.matrix_bytes(angles, cols) > self.max_matrix_bytes:
            return "direct"
        return "gridding"

    def _method(self, angles: int, cols: int) -> FBP | GriddingFBP:
        return self.gridding if self.method_for(angles, cols) == "gridding" else self.direct

    def prepare(self, theta: torch.Tensor, center: float, cols: int) -> bool:
        """Build the geometry of the method `reconstruct` will use for (theta.numel(), cols)
        sinograms; any thread. True if this call built it."""
        return self._method(theta.numel(), cols).prepare(theta, center, cols)

    def release(self) -> None:
        """The owning thread's scan ended: its geometry may be evicted like any other."""
        self.direct.release()
        self.gridding.release()

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        """(B, A, C) float32 line integrals -> (B, C, C) float32 attenuation per pixel."""
        if sinograms.ndim != 3:  # the method's own check names the problem
            return self.direct.reconstruct(sinograms, theta, center)
        return self._method(*sinograms.shape[1:]).reconstruct(sinograms, theta, center)


def make_reconstructor(
    method: str = "auto",
    device: str | torch.device = "cpu",
    filter_name: str = "ramp",
    circle_mask: bool = False,
) -> PreparableReconstructor:
    """The FBP `Reconstructor` for `method`: "direct" (pixel-driven, `workers.fbp.FBP`),
    "gridding" (non-uniform FFT, `workers.gridding.GriddingFBP`) or "auto" (`AutoFBP`)."""
    if method == "direct":
        return FBP(device, filter_name=filter_name, circle_mask=circle_mask)
    if method == "gridding":
        return GriddingFBP(device, filter_name=filter_name, circle_mask=circle_mask)
    if method == "auto":
        return AutoFBP(device, filter_name=filter_name, circle_mask=circle_mask)
    raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")


def _theta(theta: np.ndarray, angles: int) -> torch.Tensor:
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    if len(theta) != angles:
        raise ValueError(f"theta has {len(theta)} angles, the data {angles}")
    if not np.all(np.isfinite(theta)):
        raise ValueError("theta holds non-finite angles")
    return torch.from_numpy(theta)


class ReconSession:
    """The reconstructors `recon` calls run on, kept between calls with their geometry caches.

    Keyed by (device, method, filter, circle mask); the `capacity` most recently used are kept
    (each holds a few geometries: the gridding method's spreading matrices are up to hundreds
    of MB at 2k columns; `clear` frees them all). Threading: any thread may call `recon`; calls
    run one at a time (a re-entrant lock), since a reconstructor belongs to one thread while it
    works.
    """

    def __init__(self, capacity: int = _SESSION_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: a session keeps at least one reconstructor")
        self.capacity = capacity
        self._lock = threading.RLock()
        self._reconstructors: OrderedDict[
            tuple[torch.device, str, str, bool], PreparableReconstructor
        ] = OrderedDict()

    def clear(self) -> None:
        """Drop every reconstructor (and the geometries it holds)."""
        with self._lock:
            self._reconstructors.clear()

    def reconstructor(
        self, method: str, device: torch.device, filter_name: str, circle_mask: bool
    ) -> PreparableReconstructor:
        """The kept reconstructor for (method, device, canonical filter name, mask), made
        if new; the most recently used."""
        key = (device, method, filter_name, circle_mask)
        with self._lock:
            reconstructor = self._reconstructors.pop(key, None)
            if reconstructor is None:
                reconstructor = make_reconstructor(method, device, filter_name, circle_mask)
            self._reconstructors[key] = reconstructor
            while len(self._reconstructors) > self.capacity:
                self._reconstructors.popitem(last=False)
            return reconstructor

    def recon(
        self,
        tomo: np.ndarray,
        theta: np.ndarray,
        center: float | None = None,
        algorithm: str = "fbp",
        filter_name: str = "ramp",
        device: str | None = None,
        circle_mask: bool = False,
        method: str = "auto",
        center_convention: str = "tomocast",
    ) -> np.ndarray:
        """`recon` (see there) on this session's reconstructors."""
        tomo = np.asarray(tomo)
        if tomo.ndim != 3:
            raise ValueError(f"tomo must be (angles, rows, cols), got shape {tomo.shape}")
        angles, rows, cols = tomo.shape
        center = resolve_center(center, cols, center_convention)
        name = canonical_filter_name(filter_name)
        if algorithm == "gridrec":
            return _tomopy_gridrec(tomo, theta, to_tomopy_center(center), name, circle_mask)
        if algorithm != "fbp":
            raise ValueError(f"algorithm={algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if method not in METHODS:
            raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")
        theta_t = _theta(theta, angles)
        out = np.empty((rows, cols, cols), dtype=np.float32)
        step = _rows_per_batch(cols)
        with self._lock:
            reconstructor = self.reconstructor(method, _resolve(device), name, circle_mask)
            try:
                for r0 in range(0, rows, step):
                    r1 = min(rows, r0 + step)
                    sinograms = np.ascontiguousarray(
                        tomo[:, r0:r1, :].transpose(1, 0, 2), dtype=np.float32
                    )
                    batch = torch.from_numpy(sinograms).to(reconstructor.device)
                    out[r0:r1] = reconstructor.reconstruct(batch, theta_t, center).cpu().numpy()
            finally:
                reconstructor.release()  # the geometry stays cached, evictable as any other
        return out


# The session `recon` uses when handed none: explicit, so a caller can clear() it.
DEFAULT_SESSION = ReconSession()


def recon(
    tomo: np.ndarray,
    theta: np.ndarray,
    center: float | None = None,
    algorithm: str = "fbp",
    filter_name: str = "ramp",
    device: str | None = None,
    circle_mask: bool = False,
    method: str = "auto",
    center_convention: str = "tomocast",
    session: ReconSession | None = None,
) -> np.ndarray:
    """Reconstruct every detector row of `tomo` (angles, rows, cols) line integrals.

    Returns (rows, cols, cols) float32. `theta` is in radians, `center` the rotation axis,
    default the detector's middle; `center_convention` says which meaning it has: "tomocast"
    (protocol v1, TomoPy's `fbp`/ASTRA: cols/2 is the middle) or "tomopy" (the axis' pixel
    index, as TomoPy's find_center_vo returns and gridrec takes: (cols-1)/2 is the middle).
    `device` is "cpu", "cuda[:N]" or None for CUDA when present. `method` picks the FBP method
    as the service does (`make_reconstructor`: "auto" grids on a CPU). The reconstructor and
    its geometry are kept in `session` (default `DEFAULT_SESSION`), so calling again with the
    same geometry (theta, center, cols) skips the set-up: a loop over chunks of rows runs at
    the service's speed from its second call. For a one-off slice at each of many centres,
    method="direct" builds less per centre. algorithm="gridrec" hands the call to TomoPy
    (installed separately), with the axis in its pixel-index convention so it reconstructs
    about the same axis; its scale stays TomoPy's (~1.19x ours, DESIGN.md).
    """
    chosen = DEFAULT_SESSION if session is None else session
    return chosen.recon(
        tomo, theta, center, algorithm, filter_name, device, circle_mask, method, center_convention
    )


def _tomopy_gridrec(
    tomo: np.ndarray, theta: np.ndarray, center: float, filter_name: str, circle_mask: bool
) -> np.ndarray:
    if importlib.util.find_spec("tomopy") is None:
        raise RuntimeError(
            "algorithm='gridrec' needs TomoPy (conda install -c conda-forge "
            "tomopy); algorithm='fbp' needs nothing extra"
        )
    import tomopy  # imported here: optional, heavy, and it starts thread pools on import

    slices = tomopy.recon(
        np.asarray(tomo, dtype=np.float32),
        np.asarray(theta),
        center=center,
        algorithm="gridrec",
        filter_name=_TOMOPY_FILTERS[filter_name],
    )
    if circle_mask:
        slices = tomopy.circ_mask(slices, axis=0, ratio=1.0)
    return np.asarray(slices, dtype=np.float32)


def project(
    volume: np.ndarray,
    theta: np.ndarray,
    center: float | None = None,
    cols: int | None = None,
    device: str | None = None,
) -> np.ndarray:
    """Forward-project (rows, N, N) slices in attenuation per pixel -> (angles, rows, cols)
    float32 line integrals; `cols` defaults to N, `center` to cols / 2 (TomoPy's convention)."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.shape[1] != volume.shape[2]:
        raise ValueError(f"volume must be (rows, N, N), got shape {volume.shape}")
    rows, n, _ = volume.shape
    cols = n if cols is None else int(cols)
    center = cols / 2 if center is None else float(center)
    theta_arr = np.asarray(theta, dtype=np.float64).reshape(-1)
    theta_t = _theta(theta_arr, len(theta_arr))
    target = _resolve(device)
    out = np.empty((len(theta_arr), rows, cols), dtype=np.float32)
    step = _rows_per_batch(n)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        batch = torch.from_numpy(np.ascontiguousarray(volume[r0:r1], dtype=np.float32))
        sinograms = project_tensor(batch.to(target), theta_t, center, cols)
        out[:, r0:r1, :] = sinograms.cpu().numpy().transpose(1, 0, 2)
    return out
