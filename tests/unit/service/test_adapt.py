"""service/adapt.py: what adaptation keeps of a scan, how adapted weights are named, and the
model slot that swaps them in between scans only (over a real ZeroMQ channel)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq
from torch import nn

from models.artifact import save_artifact
from models.placeholder import placeholder_metadata
from service.adapt import (
    Adapter,
    KeptScan,
    ModelSlot,
    Update,
    adapted_name,
    keep_rows,
    rows_that_fit,
)
from service.config import ModelSettings, WorkerSettings, load_settings
from service.errors import ConfigError
from service.events import ModelUpdated, decode_event
from service.metrics import Metrics
from service.protocol import ScanStart
from service.publish import PublishChannel
from service.sinogram import CompletedScan
from tests.support.helpers import wait_for
from workers.denoise import DenoiseEngine, load_denoiser

INPROC = "inproc://adapt-slot"


def completed_scan(rows: int, angles: int, cols: int, seed: int = 0) -> CompletedScan:
    generator = torch.Generator().manual_seed(seed)
    sinogram = torch.rand((rows, angles, cols), generator=generator)
    start = ScanStart("kept", 0, rows, cols, angles, "float32")
    theta = np.linspace(0, np.pi, angles, endpoint=False)
    return CompletedScan(start, sinogram, theta, cols / 2 + 0.25, 0, 0, 0, 0.0, 0.0)


def test_the_central_rows_that_fit_the_budget_are_kept_as_line_integrals() -> None:
    rows, angles, cols = 10, 20, 16
    per_row = 4 * (angles * cols + 7 * cols * cols)  # K = 2: (3K + 1) cols^2 besides
    assert rows_that_fit(angles, cols, 3 * per_row) == 3
    assert rows_that_fit(angles, cols, 3 * per_row - 1) == 2
    scan = completed_scan(rows, angles, cols)
    kept = keep_rows(scan, 3 * per_row)
    assert kept is not None
    assert (kept.first, kept.rows, kept.scan_rows, kept.scan_id) == (3, 3, rows, "kept")
    assert kept.sinogram.shape == (angles, 3, cols)  # (angles, rows, cols), as files hold them
    np.testing.assert_array_equal(kept.sinogram, scan.sinogram[3:6].numpy().transpose(1, 0, 2))
    np.testing.assert_array_equal(kept.theta, scan.theta)
    assert kept.center == scan.center
    everything = keep_rows(scan, 100 * per_row)
    assert everything is not None and (everything.first, everything.rows) == (0, rows)
    assert keep_rows(scan, per_row - 1) is None


def test_adapted_weights_are_numbered_from_the_base_model(tmp_path: Path) -> None:
    assert adapted_name("tomogan-beamline-d3", tmp_path) == "tomogan-beamline-d3-adapted-1"
    assert adapted_name("tomogan-beamline-d3-adapted-3", tmp_path) == (
        "tomogan-beamline-d3-adapted-4"
    )
    (tmp_path / "m-adapted-1.pt").write_bytes(b"")  # an earlier run's: never overwritten
    assert adapted_name("m", tmp_path) == "m-adapted-2"


def test_adapt_needs_the_denoiser() -> None:
    with pytest.raises(ConfigError, match=r"model\.adapt.*model\.enabled"):
        load_settings(None, {"model": {"adapt": True, "enabled": False}})
    defaults = ModelSettings()
    assert not defaults.adapt and defaults.adapt_seconds > 0 and defaults.adapt_threads == 1


def test_model_updated_round_trips() -> None:
    event = ModelUpdated("m-adapted-1", "m", "scan-7", 16, 11.5, 0.25, 30.0, 20.0, 40)
    header = {"v": 1, "t_published": 1.0, **event.encode()}
    assert decode_event(header) == event
    del header["validation_gain_db"]
    with pytest.raises(ValueError, match="validation_gain_db"):
        decode_event(header)


@pytest.fixture
def channel() -> Iterator[tuple[PublishChannel, zmq.Socket[Any], Metrics]]:
    context: zmq.Context[Any] = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(INPROC)
    metrics = Metrics()
    publish = PublishChannel(context, INPROC, metrics)
    yield publish, pull, metrics
    publish.close()  # again, if the slot closed it: a no-op
    pull.close(linger=0)
    context.term()


class Identity(nn.Module):
    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return stack[:, 1:2]


def placeholder(tmp_path: Path, name: str) -> DenoiseEngine:
    """A denoiser named `name` (the placeholder's metadata) that returns its FBP slice."""
    metadata = placeholder_metadata().model_copy(update={"name": name, "precision": "fp32"})
    return load_denoiser(save_artifact(Identity(), metadata, tmp_path / f"{name}.pt"), "cpu")


def event_received(pull: zmq.Socket[Any]) -> ModelUpdated | None:
    if not pull.poll(2000):
        return None
    topic, header = pull.recv_multipart()
    assert topic == b"event"
    event = decode_event(msgpack.unpackb(header))
    assert isinstance(event, ModelUpdated)
    return event


def update_to(engine: DenoiseEngine) -> Update:
    return Update(engine, ModelUpdated("next", "first", "s", 4, 10.0, 0.1, 5.0, 4.0, 3))


def test_weights_offered_during_a_scan_go_in_after_it_never_inside(
    tmp_path: Path, channel: tuple[PublishChannel, zmq.Socket[Any], Metrics]
) -> None:
    publish, pull, metrics = channel
    first, second = placeholder(tmp_path, "first"), placeholder(tmp_path, "second")
    slot = ModelSlot(first, publish, metrics)
    update = update_to(second)
    with slot.scan() as running:
        assert running is first and not slot.idle.is_set()
        assert slot.offer(update)  # the scan holds the slot: kept for later
        assert slot.current is first and not update.swapped.is_set()
        assert not pull.poll(0)
    assert slot.idle.is_set() and slot.current is second and update.swapped.is_set()
    event = event_received(pull)
    assert event == update.event
    assert (
        metrics.registry.get_sample_value("tomocast_model_updates_total", {"outcome": "updated"})
        == 1
    )
    assert metrics.registry.get_sample_value("tomocast_model_info", {
        "name": "second", "arch": "placeholder", "depth": "3", "precision": "fp32",
        "trained": "false", "version": second.metadata.tomocast_version, "device": "cpu",
    }) == 1  # fmt: skip
    with slot.scan() as running:
        assert running is second
    assert slot.close(1.0)


def test_weights_offered_between_scans_go_in_at_once_and_none_after_close(
    tmp_path: Path, channel: tuple[PublishChannel, zmq.Socket[Any], Metrics]
) -> None:
    publish, pull, metrics = channel
    first, second = placeholder(tmp_path, "first"), placeholder(tmp_path, "second")
    slot = ModelSlot(first, publish, metrics)
    update = update_to(second)
    assert slot.offer(update)
    assert slot.current is second and update.swapped.is_set()
    assert event_received(pull) == update.event
    assert slot.close(1.0)
    assert not slot.offer(update_to(first))
    assert slot.current is second


@pytest.fixture
def adapter_for(tmp_path: Path) -> Iterator[Callable[[DenoiseEngine, Metrics], Adapter]]:
    """An `Adapter` (not started) on the CPU with its slot on `engine`; its channel closed at
    the end."""
    context: zmq.Context[Any] = zmq.Context()
    made: list[Adapter] = []

    def make(engine: DenoiseEngine, metrics: Metrics) -> Adapter:
        channel = PublishChannel(context, "inproc://adapter-unused", metrics)
        settings = ModelSettings(adapt=True, adapt_dir=tmp_path / "adapted")
        slot = ModelSlot(engine, channel, metrics)
        made.append(Adapter(settings, WorkerSettings(), slot, torch.device("cpu"), metrics))
        return made[-1]

    yield make
    for adapter in made:
        adapter.stop()
        assert adapter.join(10.0)
        assert adapter.slot.close(1.0)
    context.term()


def outcomes(metrics: Metrics) -> dict[str, float]:
    return {
        outcome: metrics.registry.get_sample_value(
            "tomocast_model_updates_total", {"outcome": outcome}
        )
        or 0.0
        for outcome in ("updated", "rejected", "failed", "cancelled", "skipped")
    }


def test_a_failed_or_unusable_adaptation_keeps_the_weights_and_counts_why(
    tmp_path: Path, adapter_for: Callable[[DenoiseEngine, Metrics], Adapter]
) -> None:
    metrics = Metrics()
    engine = placeholder(tmp_path, "current")
    adapter = adapter_for(engine, metrics)
    adapter.start()
    try:
        # 3 angles cannot make two subsets of two: skipped, with the reason in the log
        adapter.completed(completed_scan(4, 3, 16))
        wait_for("the skip", lambda: outcomes(metrics)["skipped"] == 1)
        # the weights' file is gone: adapting from them fails (an error, counted)
        engine.path.unlink()
        adapter.completed(completed_scan(4, 20, 16))
        wait_for("the failure", lambda: outcomes(metrics)["failed"] == 1)
    finally:
        adapter.stop()
        assert adapter.join(10.0)
    assert adapter.slot.current is engine
    assert outcomes(metrics) == {
        "updated": 0, "rejected": 0, "failed": 1, "cancelled": 0, "skipped": 1,
    }  # fmt: skip
    assert metrics.registry.get_sample_value("tomocast_errors_total", {"stage": "adapt"}) == 1


def test_a_scan_waiting_at_stop_is_cancelled_and_a_newer_one_replaces_it(
    tmp_path: Path, adapter_for: Callable[[DenoiseEngine, Metrics], Adapter]
) -> None:
    metrics = Metrics()
    adapter = adapter_for(placeholder(tmp_path, "current"), metrics)  # not started
    adapter.completed(completed_scan(4, 20, 16, seed=1))
    adapter.completed(completed_scan(4, 20, 16, seed=2))
    assert outcomes(metrics)["skipped"] == 1  # the first never had its turn
    adapter.stop()
    assert outcomes(metrics)["cancelled"] == 1
    adapter.completed(completed_scan(4, 20, 16))  # after stop: not kept
    assert outcomes(metrics)["cancelled"] == 1 and outcomes(metrics)["skipped"] == 1


def test_kept_scan_rows() -> None:
    kept = KeptScan("s", np.zeros((20, 3, 16), np.float32), np.zeros(20), 8.0, 2, 10)
    assert kept.rows == 3
