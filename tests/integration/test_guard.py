"""The no-harm guard in a real service over loopback TCP: a denoiser the data contradict is
replaced by plain FBP, one they support is published, and /metrics counts both.

The two denoisers are TorchScript artifacts written here, so the outcome does not depend on the
shipped weights: `Identity` returns its centre input (the FBP slice: exactly as consistent with
the data as FBP); the wrong ones return it plus one network unit everywhere (`Raised`: a uniform
offset the size of the scan's intensity level, which adds its chord length to every measured
ray) or halved (`Halved`: the sample's attenuation underestimated by half).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from models.artifact import save_artifact
from models.placeholder import placeholder_metadata
from service.app import Service
from service.client import Detector, Published, Subscriber
from service.config import GUARD_THRESHOLD
from service.events import ScanCompleted, ScanEnded
from service.sim.simulate import SimulatedScan, simulate_scan
from workers.guard import consistency, photon_variance

ROWS, COLS, ANGLES = 8, 64, 90


class Identity(nn.Module):
    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return stack[:, 1:2]


class Raised(nn.Module):
    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return stack[:, 1:2] + 1.0


class Halved(nn.Module):
    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return stack[:, 1:2] * 0.5


# wrong denoisers, and what each makes of an FBP slice in physical units given the scan's
# input scale (the placeholder metadata's input_offset is 0)
WRONG: dict[str, tuple[type[nn.Module], Any]] = {
    "raised": (Raised, lambda fbp, scale: fbp + scale),
    "halved": (Halved, lambda fbp, scale: 0.5 * fbp),
}


def artifact(module: nn.Module, name: str, directory: Path) -> Path:
    metadata = placeholder_metadata().model_copy(update={"name": name, "precision": "fp32"})
    return save_artifact(module, metadata, directory / f"{name}.pt")


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan(
        "guard-scan",
        rows=ROWS,
        cols=COLS,
        n_angles=ANGLES,
        photons=2000.0,
        n_dark=3,
        n_flat=4,
        seed=5,
    )


def line_integrals(scan: SimulatedScan) -> tuple[np.ndarray, np.ndarray]:
    """Flat-field corrected (angles, rows, cols) line integrals and the flat's counts (rows,
    cols), in float64 numpy, independently of the service."""
    dark = scan.darks.astype(np.float64).mean(axis=0)
    flat = scan.flats.astype(np.float64).mean(axis=0)
    ratio = (scan.projections.astype(np.float64) - dark) / (flat - dark)
    return -np.log(np.clip(ratio, 1e-6, None)), flat - dark


def run_scan(
    endpoints: Any, scan: SimulatedScan, normalized: bool = False
) -> tuple[dict[int, Published], dict[int, Published], ScanCompleted]:
    """Send the scan; the published (slice, recon) messages by row once it has ended, and its
    `scan_completed` (which says the centre the service reconstructed about)."""
    slices: dict[int, Published] = {}
    recons: dict[int, Published] = {}
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        if normalized:
            sinogram = line_integrals(scan)[0].astype(np.float32)
            detector.send_scan("guard-scan", sinogram, chunk=15, normalized=True)
        else:
            detector.send_scan(
                "guard-scan", scan.projections, darks=scan.darks, flats=scan.flats, chunk=15
            )
        while True:
            message = viewer.recv(timeout=60.0)
            assert message is not None, "the service published nothing for 60 s"
            event = message.event()
            if isinstance(event, ScanEnded):
                assert isinstance(event, ScanCompleted), event
                completed = event
                break
            if message.topic in ("slice", "recon"):
                target = slices if message.topic == "slice" else recons
                target[message.header["index"]] = message
    assert sorted(slices) == sorted(recons) == list(range(ROWS))
    return slices, recons, completed


def sample(service: Service, name: str, labels: dict[str, str] | None = None) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, name
    return value


def fallbacks(service: Service) -> float:
    return sum(
        sample(service, "tomocast_guard_fallbacks_total", {"reason": reason})
        for reason in ("inconsistent", "not_finite")
    )


@pytest.mark.parametrize("wrong", sorted(WRONG))
@pytest.mark.parametrize(
    ("normalized", "noise"),
    [(False, "estimated"), (False, "photon"), (True, "estimated")],
    ids=["raw-counts", "raw-counts-photon-noise", "normalized"],
)
def test_a_contradicted_denoiser_is_replaced_by_fbp(
    start_service: Any,
    scan: SimulatedScan,
    tmp_path: Path,
    normalized: bool,
    noise: str,
    wrong: str,
) -> None:
    network, effect = WRONG[wrong]
    model = artifact(network(), wrong, tmp_path)
    service, endpoints = start_service(
        model={"path": str(model), "precision": "fp32"},
        publish={"recon": True},
        archive={"directory": str(tmp_path / "archive")},
        guard={"noise": noise},
    )
    slices, recons, completed = run_scan(endpoints, scan, normalized)
    assert service.stop()  # drains the archive: it holds each slice's verdict and score
    with h5py.File(tmp_path / "archive" / "guard-scan.h5") as f:
        np.testing.assert_array_equal(
            f["entry/data/denoised"][()], [slices[i].header["denoised"] for i in range(ROWS)]
        )
        np.testing.assert_allclose(
            f["entry/data/consistency"][()],
            [slices[i].header.get("consistency", np.nan) for i in range(ROWS)],
            rtol=1e-6,
        )

    replaced = [i for i, m in slices.items() if m.header["denoised"] is False]
    assert len(replaced) >= 0.8 * ROWS, [m.header.get("consistency") for m in slices.values()]
    for i in replaced:  # the FBP slice itself, bit for bit
        np.testing.assert_array_equal(slices[i].data, recons[i].data)
        assert slices[i].header["consistency"] > GUARD_THRESHOLD
    assert all(m.header["denoised"] is False for m in recons.values())
    assert not any("consistency" in m.header for m in recons.values())
    assert sample(service, "tomocast_guard_fallbacks_total", {"reason": "inconsistent"}) == len(
        replaced
    )
    assert sample(service, "tomocast_guard_consistency_count") == ROWS
    above = ROWS - sample(
        service, "tomocast_guard_consistency_bucket", {"le": str(float(GUARD_THRESHOLD))}
    )
    assert above == len(replaced)

    # the score, recomputed from the DAQ's data: the service scores the right rows against the
    # right noise (photon counts for raw scans with guard.noise = photon, else the estimate)
    sinogram, flat_counts = line_integrals(scan)
    rows = torch.from_numpy(sinogram.transpose(1, 0, 2).astype(np.float32))
    fbp = torch.from_numpy(np.stack([recons[i].data for i in range(ROWS)]))
    offset, scale = service.denoiser.metadata.scaled(slices[0].header["scale"])
    assert offset == 0
    variance = (
        None
        if normalized or noise == "estimated"
        else photon_variance(rows, torch.from_numpy(flat_counts[:, None, :].astype(np.float32)))
    )
    expected = consistency(
        effect(fbp, scale), fbp, rows, torch.from_numpy(scan.theta), completed.center, variance
    )
    got = [slices[i].header["consistency"] for i in range(ROWS)]
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3)


def test_a_denoiser_the_data_support_is_published(
    start_service: Any, scan: SimulatedScan, tmp_path: Path
) -> None:
    model = artifact(Identity(), "identity", tmp_path)
    service, endpoints = start_service(
        model={"path": str(model), "precision": "fp32"}, publish={"recon": True}
    )
    slices, _, _ = run_scan(endpoints, scan)
    kept = [m for m in slices.values() if m.header["denoised"] is True]
    assert len(kept) >= 0.9 * ROWS
    scores = [m.header["consistency"] for m in slices.values()]
    assert all(0 <= s <= GUARD_THRESHOLD for s in scores), scores
    assert all("guard" in m.header["timing"] for m in slices.values())
    assert fallbacks(service) == ROWS - len(kept)
    assert sample(service, "tomocast_guard_consistency_count") == ROWS
    assert sample(service, "tomocast_guard_consistency_sum") == pytest.approx(sum(scores))
    # timed as the denoiser is: one observation per batch, of its time per slice
    batches = sample(service, "tomocast_stage_seconds_count", {"stage": "denoise"})
    assert sample(service, "tomocast_stage_seconds_count", {"stage": "guard"}) == batches > 0


def test_guard_off_publishes_every_denoised_slice(
    start_service: Any, scan: SimulatedScan, tmp_path: Path
) -> None:
    model = artifact(Raised(), "raised", tmp_path)
    service, endpoints = start_service(
        model={"path": str(model), "precision": "fp32"},
        publish={"recon": True},
        guard={"enabled": False},
    )
    slices, recons, _ = run_scan(endpoints, scan)
    for i, message in slices.items():
        assert message.header["denoised"] is True and "consistency" not in message.header
        assert not np.array_equal(message.data, recons[i].data)
    assert fallbacks(service) == 0
    assert sample(service, "tomocast_guard_consistency_count") == 0
