"""service.guard: the no-harm guard as the reconstruct loop runs it (rows, noise model, degenerate
and non-finite input, metrics), its settings, and the two slice-header fields it fills."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

import workers.guard
from service.config import GUARD_MAX_ANGLES, GUARD_THRESHOLD, GuardSettings, load_settings
from service.errors import ConfigError
from service.events import SliceHeader
from service.guard import ScanGuard, Verdict, record
from service.metrics import Metrics
from service.protocol import ScanStart
from service.sinogram import CompletedScan
from workers.project import project_tensor
from workers.recon import recon

ROWS, COLS, ANGLES = 6, 32, 48
CENTER = COLS / 2


def disc_volume(rows: int = ROWS, cols: int = COLS) -> torch.Tensor:
    """(rows, cols, cols) discs of different radii: a sample with something in every row."""
    y, x = np.mgrid[:cols, :cols] - (cols - 1) / 2
    radius = np.hypot(x, y)
    return torch.from_numpy(
        np.stack([(radius < cols * (0.2 + 0.03 * r)) * 0.02 for r in range(rows)]).astype(
            np.float32
        )
    )


def measured(photons: float | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, angles, cols) line integrals of the discs (Poisson noise at `photons` counts when
    given) and the angles."""
    theta = torch.linspace(0, math.pi, ANGLES + 1, dtype=torch.float32)[:-1]
    clean = project_tensor(disc_volume(), theta, CENTER, COLS)
    if photons is None:
        return clean, theta
    rng = np.random.default_rng(seed)
    counts = rng.poisson(photons * np.exp(-clean.numpy().astype(np.float64)))
    noisy = -np.log(np.clip(counts, 1, None) / photons)
    return torch.from_numpy(noisy.astype(np.float32)), theta


def fbp_of(sinogram: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    volume = recon(sinogram.permute(1, 0, 2).numpy(), theta.numpy(), center=CENTER, device="cpu")
    return torch.from_numpy(np.ascontiguousarray(volume))


def completed(sinogram: torch.Tensor, flat_counts: torch.Tensor | None) -> CompletedScan:
    rows, angles, cols = sinogram.shape
    start = ScanStart("g", 0, rows, cols, angles, "float32", normalized=flat_counts is None)
    return CompletedScan(
        start,
        sinogram,
        np.linspace(0, np.pi, angles, endpoint=False),
        cols / 2,
        0,
        0,
        0,
        0.0,
        0.0,
        flat_counts=flat_counts,
    )


def check(
    sinogram: torch.Tensor,
    theta: torch.Tensor,
    denoised: torch.Tensor,
    fbp: torch.Tensor,
    first: int = 0,
    flat_counts: torch.Tensor | None = None,
    **settings: Any,
) -> tuple[torch.Tensor, Verdict]:
    guard = ScanGuard(GuardSettings(**settings), completed(sinogram, flat_counts), theta, CENTER)
    published, pending = guard.check(first, denoised, fbp)
    return published, pending.result()


def test_defaults_are_workers_guards() -> None:
    assert GUARD_THRESHOLD == workers.guard.DEFAULT_THRESHOLD
    assert GUARD_MAX_ANGLES == workers.guard.DEFAULT_MAX_ANGLES
    assert GuardSettings() == GuardSettings(
        enabled=True, threshold=GUARD_THRESHOLD, max_angles=GUARD_MAX_ANGLES, noise="estimated"
    )


@pytest.mark.parametrize("photons", [None, 3000.0], ids=["noise-free", "photon-noise"])
def test_fbp_itself_is_kept_and_a_contradicted_slice_falls_back(photons: float | None) -> None:
    sinogram, theta = measured(photons)
    fbp = fbp_of(sinogram, theta)
    wrong = fbp + 0.02  # a uniform offset: every ray gains 0.02 x its chord
    denoised = torch.cat([fbp[:3], wrong[3:]])
    published, verdict = check(sinogram, theta, denoised, fbp)
    assert verdict.denoised.tolist() == [True] * 3 + [False] * 3
    assert np.all(verdict.consistency[:3] <= 1.0 + 1e-5)
    assert np.all(verdict.consistency[3:] > 10 * GUARD_THRESHOLD)
    torch.testing.assert_close(published, fbp, rtol=0, atol=0)  # kept = fbp, fallback = fbp
    assert verdict.header_consistency(0) == pytest.approx(float(verdict.consistency[0]))


def test_photon_counts_are_taken_for_the_rows_scored() -> None:
    """Rows 2..4 of a raw scan: the score uses those rows' sinogram and flat counts, as
    workers.guard does with the photon variance of exactly those rows."""
    photons = 3000.0
    sinogram, theta = measured(photons, seed=1)
    fbp = fbp_of(sinogram, theta)
    counts = torch.full((ROWS, COLS), photons) * torch.linspace(0.5, 1.5, ROWS)[:, None]
    denoised = fbp[2:5] * 0.9
    _, verdict = check(
        sinogram, theta, denoised, fbp[2:5], first=2, flat_counts=counts, noise="photon"
    )
    rows = sinogram[2:5]
    expected = workers.guard.consistency(
        denoised, fbp[2:5], rows, theta, CENTER, rows.exp() / counts[2:5, None, :]
    )
    np.testing.assert_allclose(verdict.consistency, expected.numpy(), rtol=1e-5)
    estimated = workers.guard.consistency(denoised, fbp[2:5], rows, theta, CENTER)
    assert not np.allclose(verdict.consistency, estimated.numpy(), rtol=1e-3)
    # the default weighs by the noise estimated from the sinogram, flat counts or not
    _, by_default = check(sinogram, theta, denoised, fbp[2:5], first=2, flat_counts=counts)
    np.testing.assert_allclose(by_default.consistency, estimated.numpy(), rtol=1e-5)


def test_threshold_and_max_angles_are_the_settings() -> None:
    sinogram, theta = measured(3000.0, seed=2)
    fbp = fbp_of(sinogram, theta)
    denoised = fbp * 0.97
    _, loose = check(sinogram, theta, denoised, fbp, threshold=1e6)
    _, strict = check(sinogram, theta, denoised, fbp, threshold=1e-6)
    assert loose.denoised.all() and not strict.denoised.any()
    np.testing.assert_array_equal(loose.consistency, strict.consistency)
    _, every = check(sinogram, theta, denoised, fbp, max_angles=ANGLES)
    _, some = check(sinogram, theta, denoised, fbp, max_angles=ANGLES // 4)
    expected = workers.guard.consistency(
        denoised, fbp, sinogram, theta, CENTER, max_angles=ANGLES // 4
    )
    np.testing.assert_allclose(some.consistency, expected.numpy(), rtol=1e-6)
    assert not np.allclose(every.consistency, some.consistency, rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, 0.7], ids=["all-zero", "constant"])
def test_degenerate_rows_never_crash_nor_leak_nan(value: float) -> None:
    """A row of zeros (air everywhere, no noise) or a constant (a detector stuck at one
    value): a denoised slice that adds something the data do not have falls back, the FBP's
    own copy is kept, and nothing non-finite is published."""
    theta = torch.linspace(0, math.pi, ANGLES + 1)[:-1]
    sinogram = torch.full((2, ANGLES, COLS), value)
    fbp = fbp_of(sinogram, theta)
    denoised = torch.stack([fbp[0], fbp[1] + 0.05])
    published, verdict = check(sinogram, theta, denoised, fbp)
    assert verdict.denoised.tolist() == [True, False]
    assert torch.isfinite(published).all()
    torch.testing.assert_close(published, fbp, rtol=0, atol=0)
    metrics = Metrics()
    assert record(metrics, verdict) == 1


def test_non_finite_slices_and_unscorable_rows_fall_back_counted() -> None:
    sinogram, theta = measured(None)
    fbp = fbp_of(sinogram, theta)
    denoised = fbp.clone()
    denoised[0, 3, 3] = math.nan
    denoised[1, 0, 0] = math.inf
    denoised[2] = 3e38  # finite, but its misfit overflows
    published, verdict = check(sinogram, theta, denoised, fbp)
    assert verdict.denoised.tolist() == [False, False, False, True, True, True]
    assert torch.isfinite(published).all()
    torch.testing.assert_close(published[:3], fbp[:3], rtol=0, atol=0)
    assert [verdict.header_consistency(i) for i in range(3)] == [None] * 3

    # two detector columns, no flat counts: no noise estimate is possible, so FBP
    narrow = torch.rand(2, ANGLES, 2)
    flat = torch.zeros(2, 2, 2)
    published, unscored = check(narrow, theta, flat + 1, flat)
    assert not unscored.denoised.any() and np.isnan(unscored.consistency).all()
    torch.testing.assert_close(published, flat, rtol=0, atol=0)

    metrics = Metrics()
    assert record(metrics, verdict) == 3 and record(metrics, unscored) == 2
    registry = metrics.registry

    def fallbacks(reason: str) -> float | None:
        return registry.get_sample_value("tomocast_guard_fallbacks_total", {"reason": reason})

    assert fallbacks("not_finite") == 5 and fallbacks("inconsistent") == 0
    assert registry.get_sample_value("tomocast_guard_consistency_count") == 3
    assert math.isfinite(registry.get_sample_value("tomocast_guard_consistency_sum") or math.nan)


def test_fallback_labels_exist_before_any_slice() -> None:
    registry = Metrics().registry
    for reason in ("inconsistent", "not_finite"):
        assert registry.get_sample_value("tomocast_guard_fallbacks_total", {"reason": reason}) == 0
    assert registry.get_sample_value("tomocast_guard_consistency_count") == 0


# ---- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guard", "message"),
    [
        ({"threshold": 0}, "guard.threshold=0.0 must be a finite number > 0"),
        ({"threshold": -1.5}, "guard.threshold=-1.5 must be a finite number > 0"),
        ({"threshold": "nan"}, "guard.threshold=nan must be a finite number > 0"),
        ({"threshold": "inf"}, "guard.threshold=inf must be a finite number > 0"),
        ({"threshold": "high"}, "guard.threshold: Input should be a valid number"),
        ({"max_angles": 0}, "guard.max_angles=0 must be >= 1"),
        ({"max_angles": 2.5}, "guard.max_angles: Input should be a valid integer"),
        ({"enabled": "sometimes"}, "guard.enabled: Input should be a valid boolean"),
        ({"threshhold": 2}, "guard.threshhold: Extra inputs are not permitted"),
    ],
)
def test_bad_guard_settings_are_refused_naming_the_key(guard: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid settings") as caught:
        load_settings(None, {"guard": guard})
    assert message in str(caught.value)


def test_guard_settings_from_file_and_environment(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tomocast.toml"
    config.write_text("[guard]\nthreshold = 1.5\nmax_angles = 45\n")
    monkeypatch.setenv("TOMOCAST_GUARD__ENABLED", "false")
    settings = load_settings(config)
    assert settings.guard == GuardSettings(enabled=False, threshold=1.5, max_angles=45)
    monkeypatch.setenv("TOMOCAST_GUARD__THRESHOLD", "0")
    with pytest.raises(ConfigError, match=r"guard\.threshold=0\.0 must be"):
        load_settings(config)


# ---- the slice header ----------------------------------------------------------------------------


def test_header_fields_round_trip_and_never_carry_nan() -> None:
    header = SliceHeader("s", 4, "m", 1.0, 2, {"fbp": 0.001}, denoised=False, consistency=37.5)
    wire = msgpack.unpackb(msgpack.packb(header.encode()))
    assert wire["denoised"] is False and wire["consistency"] == 37.5
    assert SliceHeader.decode(wire) == header
    unscored = SliceHeader("s", 4, "m", 1.0, 2, {}, denoised=False, consistency=math.nan)
    assert "consistency" not in unscored.encode()
    assert SliceHeader.decode({**wire, "consistency": math.nan}).consistency is None
    older = {k: v for k, v in wire.items() if k not in ("denoised", "consistency")}
    decoded = SliceHeader.decode(older)  # a header from a service without the guard
    assert decoded.denoised is None and decoded.consistency is None


# ---- in the reconstruct loop -------------------------------------------------------------------


class PickyDenoiser:
    """Halves the slices whose centre input peaks above `bright` (contradicted by the data),
    and returns the others as they came, times 1 + 1e-5 (consistent, yet not the FBP itself)."""

    def __init__(self, depth: int, device: torch.device, bright: float = 0.012) -> None:
        self._depth, self._device, self.bright = depth, device, bright

    name = "picky"

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def device(self) -> torch.device:
        return self._device

    def scale_for(self, slices: torch.Tensor) -> float:
        return 1.0

    def denoise(self, stack: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        centre = stack[:, self._depth // 2]
        bright = centre.flatten(1).amax(1) > self.bright
        return torch.where(bright[:, None, None], centre * 0.5, centre * (1 + 1e-5))


class Collect:
    """A slice sink that keeps every batch."""

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def begin(self, scan: Any) -> None: ...

    def write(self, batch: Any) -> None:
        self.batches.append(batch)

    def end(self, outcome: Any) -> None:
        self.outcome = outcome


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(("rows", "batch", "depth"), [(6, 4, 3), (5, 2, 5), (7, 8, 3)])
def test_the_loop_publishes_fbp_for_exactly_the_rows_the_data_contradict(
    rows: int, batch: int, depth: int, device: str
) -> None:
    import queue

    from service.config import PublishSettings, WorkerSettings
    from service.reconstruct import Worker
    from workers.recon import make_reconstructor

    bright = [r % 2 == 0 for r in range(rows)]  # attenuation 0.02 on even rows, 0.004 on odd
    volume = disc_volume(rows) * torch.tensor([1.0 if b else 0.2 for b in bright])[:, None, None]
    theta = torch.linspace(0, math.pi, ANGLES + 1)[:-1]
    sinogram = project_tensor(volume, theta, CENTER, COLS).to(device)
    scan = completed(sinogram, None)
    scan.theta = theta.double().numpy()
    metrics, sink = Metrics(), Collect()
    worker = Worker(
        WorkerSettings(device=device, batch_rows=batch, fbp_method="direct"),
        PublishSettings(recon=True),
        queue.Queue(),
        make_reconstructor("direct", device),
        PickyDenoiser(depth, torch.device(device)),
        [sink],
        metrics,
        GuardSettings(),
    )
    worker.process(scan)
    published: dict[str, dict[int, tuple[np.ndarray, bool, float]]] = {"slice": {}, "recon": {}}
    for b in sink.batches:
        for i, data in enumerate(b.slices):
            flag = bool(b.denoised[i]) if b.denoised is not None else False
            score = float(b.consistency[i]) if b.consistency is not None else math.nan
            published[b.topic][b.first + i] = (data, flag, score)
    assert sorted(published["slice"]) == sorted(published["recon"]) == list(range(rows))
    for r in range(rows):
        data, flag, score = published["slice"][r]
        fbp = published["recon"][r][0]
        assert flag is not bright[r], (r, score)
        if bright[r]:  # the FBP of this very row, bit for bit
            assert score > GUARD_THRESHOLD
            np.testing.assert_array_equal(data, fbp)
        else:
            assert score <= GUARD_THRESHOLD
            np.testing.assert_allclose(data, fbp * (1 + 1e-5), rtol=1e-6, atol=1e-9)
            assert not np.array_equal(data, fbp)
    fallbacks = metrics.registry.get_sample_value(
        "tomocast_guard_fallbacks_total", {"reason": "inconsistent"}
    )
    assert fallbacks == sum(bright)
