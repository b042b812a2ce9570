"""Several devices in one process (`worker.devices`): a scan's rows are spread over engines in
work units with the denoiser's halo and merged in row order. Through a real service (real FBP,
the shipped denoiser, ZeroMQ on loopback), two CPU "devices" give the slices of one, bit for bit,
for batch sizes below, at and above the denoiser's halo."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from service.client import Detector, Published, Subscriber
from service.config import Settings
from service.events import ScanCompleted, ScanEnded
from service.sim.simulate import SimulatedScan, simulate_scan
from tests.support.helpers import wait_for
from workers.geometry_cache import geometry_key
from workers.rows import theta_tensor

ROWS, COLS, ANGLES = 21, 48, 40

# Where the settings have the no-harm guard, it publishes plain FBP for most of these small,
# noisy slices: off, the network's own slices are compared; on (one case), its verdicts too.
_GUARD = "guard" in Settings.model_fields
CASES: list[tuple[int, dict[str, Any]]] = [(1, {}), (4, {})]
if _GUARD:
    CASES = [(1, {"guard": {"enabled": False}}), (4, {"guard": {"enabled": False}}), (1, {})]


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan(
        "dev-scan", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=800.0, n_flat=2, seed=5
    )


def run(start_service: Any, scan: SimulatedScan, **overrides: Any) -> dict[tuple[str, int], Any]:
    """One scan through a service; every published slice by (topic, index), each exactly once."""
    service, endpoints = start_service(**overrides)
    messages: list[Published] = []
    ended: list[ScanEnded] = []
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan("dev-scan", scan.projections, flats=scan.flats, chunk=16)
        while not ended:
            message = viewer.recv(timeout=30.0)
            assert message is not None, "nothing published for 30 s"
            event = message.event()
            if isinstance(event, ScanEnded):
                ended.append(event)
            elif event is None:
                messages.append(message)
    assert isinstance(ended[0], ScanCompleted), ended[0]
    counts = Counter((m.topic, m.header["index"]) for m in messages)
    assert set(counts.values()) == {1}, "a slice was published twice"
    got = {(m.topic, m.header["index"]): m for m in messages}
    assert sorted(i for t, i in got if t == "slice") == list(range(ROWS))
    metric = service.metrics.registry.get_sample_value("tomocast_cluster_workers")
    got[("workers", -1)] = metric
    return got


@pytest.mark.parametrize(("batch_rows", "options"), CASES)
def test_two_cpu_devices_match_one_bit_for_bit(
    start_service: Any, scan: SimulatedScan, batch_rows: int, options: dict[str, Any]
) -> None:
    worker = {"batch_rows": batch_rows, "fbp_method": "direct"}
    # fp32: the same network as the default int8, without its calibration at each load
    model = {"precision": "fp32"}
    one = run(start_service, scan, worker=worker, publish={"recon": True}, model=model, **options)
    two = run(
        start_service,
        scan,
        worker={**worker, "devices": ["cpu", "cpu"]},
        publish={"recon": True},
        model=model,
        **options,
        # units of a few rows: every unit edge, halo and reorder step is crossed
        cluster={"unit_rows": 2 * batch_rows, "in_flight": 2},
    )
    assert one.pop(("workers", -1)) == 0 and two.pop(("workers", -1)) == 2
    assert sorted(one) == sorted(two)
    for key, message in one.items():
        np.testing.assert_array_equal(two[key].data, message.data, err_msg=str(key))
        # the scan's denoise scale and whatever else the loop says of the slice
        assert _loop_part(two[key].header) == _loop_part(message.header), key
    # not trivially equal: the denoiser changed slices (unless the guard replaced them all)
    guard_on = _GUARD and options.get("guard", {}).get("enabled", True)
    assert guard_on or any(
        not np.array_equal(one[("slice", i)].data, one[("recon", i)].data) for i in range(ROWS)
    )


def _loop_part(header: dict[str, Any]) -> dict[str, Any]:
    """A slice header less what differs from run to run (times, sequence numbers)."""
    return {
        key: value
        for key, value in header.items()
        if key not in ("timing", "t_published", "t_last_projection", "pub_seq")
    }


@pytest.mark.parametrize("prepare", [True, False])
def test_every_device_builds_the_geometry_at_scan_start(
    start_service: Any, scan: SimulatedScan, prepare: bool
) -> None:
    """With `worker.prepare_geometry`, scan_start has every device build the scan's gridding
    geometry, before any projection is sent: no unit builds it in the scan's tail. Without,
    the units do (the counter is not trivially 0)."""
    service, endpoints = start_service(
        worker={
            "devices": ["cpu", "cpu"],
            "fbp_method": "gridding",
            "batch_rows": 4,
            "prepare_geometry": prepare,
        },
        model={"enabled": False},
        cluster={"unit_rows": 4},
    )
    engines = service.spread.engines
    assert len(engines) == 2

    def metric(name: str, **labels: str) -> float:
        value = service.metrics.registry.get_sample_value(name, labels)
        assert value is not None, name
        return value

    center = COLS / 2 + 0.25  # declared: an estimated centre comes from the data, not ahead
    start = replace(scan.start, center=center)
    theta = theta_tensor(start.theta_array()).to(torch.float64).numpy()
    key = geometry_key(theta, start.rotation_center(), COLS)
    held_before_data: list[bool] = []

    def first_chunk_after_prepare(count: int) -> None:
        """Called before each chunk of projections: the first waits for the prepare."""
        if prepare and not held_before_data:
            wait_for(
                "the devices' geometry",
                lambda: metric("tomocast_geometry_prepares_total", outcome="built") == 1,
            )
            held_before_data.append(all(key in e.engine.reconstructor.geometries for e in engines))

    ended: list[ScanEnded] = []
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        detector.send_scan(
            "dev-scan",
            scan.projections,
            flats=scan.flats,
            chunk=16,
            center=center,
            pace=first_chunk_after_prepare,
        )
        while not ended:
            message = viewer.recv(timeout=30.0)
            assert message is not None, "nothing published for 30 s"
            if isinstance(event := message.event(), ScanEnded):
                ended.append(event)
    assert isinstance(ended[0], ScanCompleted), ended[0]
    builds = metric("tomocast_cluster_unit_geometry_builds_total")
    if prepare:
        assert held_before_data == [True], "a device had not built the geometry"
        assert builds == 0, "a unit built the geometry prepared at scan_start"
        assert metric("tomocast_errors_total", stage="prepare") == 0
    else:
        assert builds >= 1
