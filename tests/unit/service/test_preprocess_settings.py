"""`[preprocess]`: validated settings with errors that name what to change, the flags and
environment forms DESIGN.md fixes, the centre fields of `scan_completed`, and the choices
`ScanPreprocessor` makes per scan (phase retrieval's parameters, the centre known ahead)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from service.cli import build_parser
from service.config import STRIPE_REMOVAL, load_settings, overrides_from_args
from service.errors import ConfigError
from service.events import ScanCompleted, ScanLatency, decode_event
from service.metrics import Metrics
from service.preprocess import FrameSteps, ScanPreprocessor
from service.protocol import ScanStart
from service.sim.simulate import simulate_scan
from service.sinogram import CompletedScan, ScanBuffer
from workers.preprocess import STRIPE_METHODS, normalize

START = ScanStart("s", 0, rows=4, cols=64, n_angles=90, dtype="uint16", n_flat=1)


def preprocessor(**settings: Any) -> ScanPreprocessor:
    return ScanPreprocessor(load_settings(None, {"preprocess": settings}).preprocess, Metrics())


def test_defaults_estimate_the_centre_and_change_nothing_else() -> None:
    settings = load_settings().preprocess
    assert settings.center == "auto"
    assert (settings.stripe_removal, settings.zingers, settings.phase_retrieval) == ("none",) * 3
    assert settings.half_acquisition is False


def test_stripe_methods_are_those_of_the_workers() -> None:
    assert ("none", *STRIPE_METHODS) == STRIPE_REMOVAL


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"center": "middle"}, r"preprocess\.center"),
        ({"center": -2.0}, r"preprocess\.center.*>= 0"),
        ({"center": math.nan}, r"preprocess\.center.*nan"),
        ({"stripe_removal": "vo"}, r"preprocess\.stripe_removal.*'auto'"),
        ({"zingers": "on"}, r"preprocess\.zingers.*'none' or 'auto'"),
        ({"phase_retrieval": "tie"}, r"preprocess\.phase_retrieval.*'paganin'"),
        ({"energy_kev": 0}, r"preprocess\.energy_kev.*greater than 0"),
        ({"distance_m": -1}, r"preprocess\.distance_m"),
        ({"half_acquisition": "sometimes"}, r"preprocess\.half_acquisition"),
        ({"centre": 3.0}, r"preprocess\.centre"),
    ],
)
def test_invalid_settings_name_the_setting(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, {"preprocess": settings})


def test_flags_environment_and_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOMOCAST_PREPROCESS__STRIPE_REMOVAL", "fourier-wavelet")
    args = build_parser().parse_args(
        ["serve", "--preprocess.center", "1024.5", "--preprocess.half_acquisition", "true"]
    )
    settings = load_settings(None, overrides_from_args(args)).preprocess
    assert settings.center == 1024.5 and settings.half_acquisition is True
    assert settings.stripe_removal == "fourier-wavelet"
    monkeypatch.setenv("TOMOCAST_PREPROCESS__CENTER", "auto")
    assert load_settings().preprocess.center == "auto"


def test_the_centre_known_before_the_data() -> None:
    auto, fixed = preprocessor(), preprocessor(center=30.5)
    assert auto.known_center(START) is None  # estimated from the data
    assert fixed.known_center(START) == 30.5
    declared = replace(START, center=33.0)
    assert auto.known_center(declared) == fixed.known_center(declared) == 33.0  # always wins
    full_turn = replace(START, theta=tuple(np.arange(90) * 2 * np.pi / 90))
    assert preprocessor(half_acquisition=True).known_center(full_turn) is None  # stitched
    assert preprocessor(half_acquisition=True).known_center(START) is None


def test_paganin_parameters_from_meta_first_then_settings() -> None:
    pre = preprocessor(
        phase_retrieval="paganin", energy_kev=20.0, distance_m=0.1, pixel_size_m=1e-6
    )
    missing, why = pre.paganin_for(START)
    assert missing is None and "no delta_beta" in why
    found, _ = pre.paganin_for(replace(START, meta={"delta_beta": 150, "energy_kev": 30.0}))
    assert found is not None and (found.delta_beta, found.energy_kev) == (150.0, 30.0)
    bad, why = pre.paganin_for(replace(START, meta={"delta_beta": "many"}))
    assert bad is None and "delta_beta='many' is not a number" in why
    steps = pre.frame_steps(START)
    assert steps.paganin is None and steps.applied["phase_retrieval"].startswith("skipped")
    normalized = pre.frame_steps(replace(START, normalized=True, n_flat=0))
    assert normalized.applied["phase_retrieval"].startswith("skipped: the scan sends line")


def test_frame_steps_without_steps_are_the_plain_flat_field() -> None:
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.poisson(1000, (3, 4, 64)).astype(np.uint16))
    dark, flat = torch.full((4, 64), 10.0), torch.full((4, 64), 1010.0)
    plain, clipped = normalize(frames, dark, flat)
    got, got_clipped = FrameSteps().normalize(frames, dark, flat)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert got_clipped == clipped
    # a zinger is replaced (by its neighbourhood's median) and counted; the rest unchanged
    hit = frames.clone()
    hit[1, 2, 30] = 60000
    metrics = Metrics()
    steps = FrameSteps(zingers=True, metrics=metrics)
    cleaned, _ = steps.normalize(hit, dark, flat)
    assert steps.zinger_pixels == 1
    assert metrics.registry.get_sample_value("tomocast_zinger_pixels_total") == 1
    assert abs(float(cleaned[1, 2, 30])) < 0.2  # a plausible line integral, not -4
    mask = torch.ones_like(cleaned, dtype=torch.bool)
    mask[1, 2, 30] = False
    torch.testing.assert_close(cleaned[mask], plain[mask], rtol=0, atol=1e-6)


def test_scan_completed_carries_the_centre_and_decodes_back() -> None:
    event = ScanCompleted(
        "s",
        4,
        0,
        0,
        0,
        "none",
        ScanLatency(0.5, 1.5, None),
        center=130.25,
        center_source="estimated",
        preprocessing={"stripe_removal": "auto", "zingers": "auto"},
        zinger_pixels=12,
    )
    wire = event.encode()
    assert list(wire)[-4:] == ["center", "center_source", "preprocessing", "zinger_pixels"]
    assert decode_event(msgpack.unpackb(msgpack.packb(wire))) == event
    with pytest.raises(ValueError, match="preprocessing"):
        decode_event({**wire, "preprocessing": [1]})
    with pytest.raises(ValueError, match="center"):
        decode_event({**wire, "center": "middle"})


def completed(start: ScanStart, sinogram: torch.Tensor) -> CompletedScan:
    return CompletedScan(
        start=start,
        sinogram=sinogram,
        theta=start.theta_array(),
        center=start.rotation_center(),
        missing=0,
        clipped=0,
        rejected=0,
        t_first_message=0.0,
        t_last_projection=0.0,
    )


def test_what_cannot_be_applied_is_skipped_and_said_never_a_failed_scan() -> None:
    tiny = replace(START, cols=4, n_angles=6)
    sinogram = torch.rand(4, 6, 4)
    done = preprocessor(stripe_removal="auto").apply(completed(tiny, sinogram.clone()))
    assert done.preprocessing is not None
    assert done.preprocessing.applied["stripe_removal"].startswith("skipped: size=")
    assert (done.center, done.preprocessing.center_source) == (2.0, "default")  # too small
    torch.testing.assert_close(done.sinogram, sinogram)  # untouched
    # a full turn declared with its axis on the detector's edge cannot be stitched
    turn = replace(START, center=0.0, theta=tuple(np.arange(90) * 2 * np.pi / 90))
    edge = preprocessor(half_acquisition=True).apply(completed(turn, torch.rand(4, 90, 64)))
    assert edge.preprocessing is not None and edge.center == 0.0
    assert edge.preprocessing.applied["half_acquisition"].startswith("skipped: center=0.0")
    assert edge.sinogram.shape == (4, 90, 64)
    # a half turn is not a half-acquisition scan: reconstructed as it is
    half = preprocessor(half_acquisition=True, center=31.0).apply(
        completed(START, torch.rand(4, 90, 64))
    )
    assert half.preprocessing is not None
    assert half.preprocessing.applied["half_acquisition"] == "skipped: the scan is not a full turn"
    assert (half.center, half.preprocessing.center_source) == (31.0, "config")


def test_the_centre_is_estimated_as_soon_as_the_angles_span_a_half_turn() -> None:
    """Line integrals of an off-centre scan arrive in two parts: nothing is due after the
    first, the estimate (within issue 15's 0.25 px) after the second, before any scan_end; a
    declared or configured centre, or a full turn: never estimated early."""
    cols, angles, axis = 64, 90, 35.0
    scan = simulate_scan("e", rows=4, cols=cols, n_angles=angles, photons=1e4, center=axis)
    dark = scan.darks.astype(np.float64).mean(axis=0)
    flat = scan.flats.astype(np.float64).mean(axis=0)
    ratio = np.clip((scan.projections - dark) / (flat - dark), 1e-6, None)
    integrals = (-np.log(ratio)).astype(np.float32)
    start = ScanStart("e", 0, rows=4, cols=cols, n_angles=angles, dtype="float32", normalized=True)
    cpu = torch.device("cpu")
    auto = preprocessor()
    buffer = ScanBuffer(start, cpu)
    buffer.store(0, integrals[:60])
    assert auto.early_center(buffer) == (False, None)
    buffer.store(60, integrals[60:])
    due, center = auto.early_center(buffer)
    assert due and center is not None and abs(center - axis) <= 0.25
    assert preprocessor(center=30.0).early_center(buffer) == (False, None)
    full_turn = tuple(float(t) for t in np.arange(angles) * 2 * np.pi / angles)
    for other in (replace(start, center=32.0), replace(start, theta=full_turn)):
        known = ScanBuffer(other, cpu)
        known.store(0, integrals)
        assert auto.early_center(known) == (False, None)
