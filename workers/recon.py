"""TomoPy-compatible entry points: numpy in, numpy out, any device underneath; and the choice
between the two FBP methods.

`recon(tomo, theta, center)` takes TomoPy's (angles, rows, cols) line-integral stack and returns
(rows, cols, cols) slices in attenuation per pixel with TomoPy's `fbp`/ASTRA geometry (DESIGN.md,
"Geometry"); `project` is the matching forward projector for simulation. `make_reconstructor`
gives the service its `Reconstructor`: direct (`workers.fbp`), gridding (`workers.gridding`) or
"auto", which picks per geometry the one measured faster (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
from types import MappingProxyType

import numpy as np
import torch

from workers.fbp import FBP
from workers.filters import canonical_filter_name
from workers.gridding import GriddingFBP
from workers.project import project_tensor
from workers.protocols import PreparableReconstructor

ALGORITHMS = ("fbp", "gridrec")
METHODS = ("auto", "direct", "gridding")
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
# recon(method="auto") grids only when rows x cols reaches this: below it, building the spreading
# matrix costs more than the direct method spends on the whole stack (break-even measured on 2
# cores at about 19 rows of 512, 45 of 256, 117 of 128 columns).
_GRIDDING_MIN_ROW_PIXELS = 1 << 14


def _rows_per_batch(n: int) -> int:
    return max(1, min(_ROWS_PER_BATCH, _BATCH_BYTES // (4 * n * n)))


def default_device() -> torch.device:
    """CUDA when a device is present, else the CPU (evaluated per call, never at import)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve(device: str | torch.device | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


class AutoFBP:
    """The FBP method measured faster for each geometry, satisfying `PreparableReconstructor`.

    On a CPU that is gridding (per slice 1.4x faster than direct at 64 columns, 3x at 256, 5-11x
    at 512 and up: docs/benchmarks.md) unless its spreading matrix would pass `max_matrix_bytes`
    (default 4 GiB; it is 2.5 GB at 2048 columns x 3072 angles). On CUDA it is direct until
    gridding is measured there (docs/benchmarks.md, "GPU"). Threading: owned by one worker
    thread, like both methods; it holds both, and each keeps its own geometry cache. `prepare`
    may be called from any thread, as on either method: it prepares the one `reconstruct` will
    use for that geometry.
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


def recon(
    tomo: np.ndarray,
    theta: np.ndarray,
    center: float | None = None,
    algorithm: str = "fbp",
    filter_name: str = "ramp",
    device: str | None = None,
    circle_mask: bool = False,
    method: str = "auto",
) -> np.ndarray:
    """Reconstruct every detector row of `tomo` (angles, rows, cols) line integrals.

    Returns (rows, cols, cols) float32. `theta` is in radians, `center` the rotation axis in
    TomoPy's convention (default cols / 2, the detector's middle), `device` "cpu", "cuda[:N]" or
    None for CUDA when present. `method` picks the FBP method (`make_reconstructor`); "auto"
    also keeps to direct for stacks too small to pay for gridding's set-up. algorithm="gridrec"
    hands the call to TomoPy (installed separately); its output is TomoPy's, half a pixel and
    ~1.19x off ours in scale (DESIGN.md).
    """
    tomo = np.asarray(tomo)
    if tomo.ndim != 3:
        raise ValueError(f"tomo must be (angles, rows, cols), got shape {tomo.shape}")
    angles, rows, cols = tomo.shape
    center = cols / 2 if center is None else float(center)
    name = canonical_filter_name(filter_name)
    if algorithm == "gridrec":
        return _tomopy_gridrec(tomo, theta, center, name, circle_mask)
    if algorithm != "fbp":
        raise ValueError(f"algorithm={algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    theta_t = _theta(theta, angles)
    if method == "auto" and rows * cols < _GRIDDING_MIN_ROW_PIXELS:
        method = "direct"
    reconstructor = make_reconstructor(method, _resolve(device), name, circle_mask)
    out = np.empty((rows, cols, cols), dtype=np.float32)
    step = _rows_per_batch(cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        sinograms = np.ascontiguousarray(tomo[:, r0:r1, :].transpose(1, 0, 2), dtype=np.float32)
        batch = torch.from_numpy(sinograms).to(reconstructor.device)
        out[r0:r1] = reconstructor.reconstruct(batch, theta_t, center).cpu().numpy()
    return out


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
