"""Work units and their coordinator (`service.engine`, `service.cluster.Spread`): the rows of a
scan cut into units with the denoiser's halo, run on several engines, merged in row order, give
what the loop gives on one device, for any batch size, depth and unit size; backpressure bounds
the units in flight; a lost engine's units are re-run on another."""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future
from dataclasses import replace

import numpy as np
import pytest
import torch

from service.cluster import Spread
from service.config import ClusterSettings, PublishSettings, WorkerSettings
from service.engine import (
    EngineLost,
    LocalEngine,
    RowEngine,
    ScanPart,
    UnitResult,
    WorkUnit,
    plan_units,
    probe_unit,
)
from service.events import ScanCompleted, ScanEnded
from service.metrics import Metrics
from service.protocol import ScanStart
from service.reconstruct import Worker
from service.sinks import ScanDescription, SliceBatch
from service.sinogram import CompletedScan
from tests.unit.service.test_reconstruct import ReusingReconstructor, WeighingDenoiser

COLS, ANGLES = 12, 5
CPU = torch.device("cpu")


class Collect:
    """A sink keeping every batch, in the order written."""

    def __init__(self) -> None:
        self.batches: list[SliceBatch] = []
        self.outcomes: list[ScanEnded] = []

    def begin(self, scan: ScanDescription) -> None:
        pass

    def write(self, batch: SliceBatch) -> None:
        self.batches.append(batch)

    def end(self, outcome: ScanEnded) -> None:
        self.outcomes.append(outcome)

    def by_row(self, topic: str) -> dict[int, np.ndarray]:
        rows: dict[int, np.ndarray] = {}
        for batch in self.batches:
            if batch.topic == topic:
                for k, data in enumerate(batch.slices):
                    assert batch.first + k not in rows, f"row {batch.first + k} written twice"
                    rows[batch.first + k] = data
        return rows


def make_scan(rows: int) -> CompletedScan:
    sinogram = torch.from_numpy(
        np.random.default_rng(rows).random((rows, ANGLES, COLS), dtype=np.float32)
    )
    start = ScanStart("s", 0, rows, COLS, ANGLES, "float32")
    theta = np.linspace(0, np.pi, ANGLES, endpoint=False)
    return CompletedScan(start, sinogram, theta, COLS / 2, 0, 0, 0, 0.0, 0.0)


def engine(batch: int, depth: int | None) -> RowEngine:
    denoiser = None if depth is None else WeighingDenoiser(depth, CPU)
    settings = WorkerSettings(device="cpu", batch_rows=batch)
    return RowEngine(settings, True, ReusingReconstructor(CPU), denoiser)


@pytest.mark.parametrize(
    ("rows", "batch", "halo", "unit_rows"),
    [(1, 1, 0, 1), (17, 4, 1, 4), (17, 1, 3, 2), (40, 8, 2, 10), (9, 8, 5, 8), (30, 3, 0, 7)],
)
def test_units_cover_every_row_once_with_their_halo_on_the_batch_grid(
    rows: int, batch: int, halo: int, unit_rows: int
) -> None:
    units = plan_units(rows, batch, halo, unit_rows)
    assert [u.index for u in units] == list(range(len(units)))
    assert units[0].first == 0 and units[-1].stop == rows
    for before, after in itertools.pairwise(units):
        assert before.stop == after.first
    for unit in units:
        assert unit.rows > 0
        assert unit.lo <= max(0, unit.first - halo) and unit.lo % batch == 0
        assert unit.hi == min(rows, unit.stop + halo)
        assert unit.hi == rows or unit.hi % batch == 0
    probe = probe_unit(rows, batch, halo)
    assert probe.rows == 0 and probe.lo == 0 and (probe.hi > halo or probe.hi == rows)


@pytest.mark.parametrize(
    ("rows", "batch", "depth", "unit_rows", "engines"),
    [
        (23, 4, 3, 4, 2),
        (23, 1, 3, 2, 3),
        (23, 2, 5, 3, 2),
        (30, 8, 7, 8, 2),
        (9, 3, None, 3, 2),
        (5, 8, 3, 4, 2),
    ],
)
def test_spread_over_engines_gives_what_one_loop_gives(
    rows: int, batch: int, depth: int | None, unit_rows: int, engines: int
) -> None:
    scan = make_scan(rows)
    reference = Collect()
    denoiser = None if depth is None else WeighingDenoiser(depth, CPU)
    Worker(
        WorkerSettings(device="cpu", batch_rows=batch),
        PublishSettings(recon=True),
        queue.Queue(),
        ReusingReconstructor(CPU),
        denoiser,
        [reference],
        Metrics(),
    ).process(scan)

    metrics = Metrics()
    local = [FlakyEngine(str(i), engine(batch, depth), None) for i in range(engines)]
    halo = depth // 2 if depth else 0
    settings = ClusterSettings(unit_rows=unit_rows, in_flight=2)
    spread = Spread(list(local), batch, halo, depth is not None, settings, metrics)
    got = Collect()
    done = spread.reconstruct(scan, got.write, threading.Event())
    spread.close()

    firsts = [b.first for b in got.batches if b.topic == "slice"]
    assert firsts == sorted(firsts), "slices out of row order"
    for topic in ("slice", "recon"):
        want, have = reference.by_row(topic), got.by_row(topic)
        assert sorted(have) == sorted(want)
        for row, data in want.items():
            np.testing.assert_array_equal(have[row], data, err_msg=f"{topic} row {row}")
    if denoiser is not None:
        assert done.scale == denoiser.scales[0]
        assert {b.scale for b in got.batches if b.topic == "slice"} == {denoiser.scales[0]}
    assert metrics.registry.get_sample_value("tomocast_cluster_workers") == engines
    assert max(e.most_held for e in local) <= 2, "more units in flight than cluster.in_flight"


class FlakyEngine:
    """A `LocalEngine` that is lost after `lose_after` units: that unit and any later fail with
    `EngineLost`. Records the most units it held unfinished at once."""

    def __init__(self, name: str, row_engine: RowEngine, lose_after: int | None) -> None:
        self._name, self.lose_after = name, lose_after
        self.local = LocalEngine(name, row_engine)
        self._alive = True
        self.ran = 0
        self.units: list[int] = []  # the indices of the units it ran (the probe's: -1)
        self.held: list[Future[UnitResult]] = []
        self.most_held = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def alive(self) -> bool:
        return self._alive

    def submit(self, part: ScanPart, unit: WorkUnit, scale: float | None) -> Future[UnitResult]:
        future: Future[UnitResult] = Future()
        self.held = [f for f in self.held if not f.done()] + [future]
        self.most_held = max(self.most_held, len(self.held))
        if self.lose_after is not None and self.ran >= self.lose_after:
            future.set_exception(EngineLost(f"{self._name} died"))
            return future
        self.ran += 1
        self.units.append(unit.index)
        self.held[-1] = future = self.local.submit(part, unit, scale)
        return future

    def prepare(self, theta: np.ndarray, center: float, cols: int) -> Future[bool]:
        return self.local.prepare(theta, center, cols)

    def lost(self) -> None:
        self._alive = False

    def close(self) -> None:
        self.local.close()


def test_a_lost_engine_has_its_units_rerun_elsewhere_each_slice_once() -> None:
    rows, batch, depth = 40, 2, 3
    scan = make_scan(rows)
    reference = Collect()
    Worker(
        WorkerSettings(device="cpu", batch_rows=batch),
        PublishSettings(),
        queue.Queue(),
        ReusingReconstructor(CPU),
        WeighingDenoiser(depth, CPU),
        [reference],
        Metrics(),
    ).process(scan)
    metrics = Metrics()
    healthy = FlakyEngine("a", engine(batch, depth), None)
    dying = FlakyEngine("b", engine(batch, depth), 2)
    settings = ClusterSettings(unit_rows=4, in_flight=2)
    spread = Spread([healthy, dying], batch, 1, True, settings, metrics)
    got = Collect()
    spread.reconstruct(scan, got.write, threading.Event())
    spread.close()
    want, have = reference.by_row("slice"), got.by_row("slice")
    assert sorted(have) == list(range(rows))
    for row, data in want.items():
        np.testing.assert_array_equal(have[row], data)
    assert metrics.registry.get_sample_value("tomocast_cluster_workers") == 1
    assert metrics.registry.get_sample_value("tomocast_cluster_workers_lost_total") == 1
    retried = metrics.registry.get_sample_value("tomocast_cluster_units_retried_total")
    assert retried is not None and retried >= 1
    assert healthy.most_held <= 2 and dying.most_held <= 2


def started(error: BaseException | None = None) -> Future[object]:
    """A replacement's start, over: ready, or failed with `error`."""
    future: Future[object] = Future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future


def one_device_slices(scan: CompletedScan, batch: int, depth: int) -> dict[int, np.ndarray]:
    reference = Collect()
    Worker(
        WorkerSettings(device="cpu", batch_rows=batch),
        PublishSettings(),
        queue.Queue(),
        ReusingReconstructor(CPU),
        WeighingDenoiser(depth, CPU),
        [reference],
        Metrics(),
    ).process(scan)
    return reference.by_row("slice")


def test_a_lost_engine_is_replaced_and_the_workers_come_back_to_their_number() -> None:
    rows, batch, depth = 40, 2, 3
    scan = make_scan(rows)
    metrics = Metrics()
    new: list[FlakyEngine] = []

    def restart(index: int) -> tuple[FlakyEngine, Future[object]]:
        new.append(FlakyEngine(f"new-{index}", engine(batch, depth), None))
        return new[-1], started()

    dying = FlakyEngine("b", engine(batch, depth), 2)
    healthy = FlakyEngine("a", engine(batch, depth), None)
    settings = ClusterSettings(unit_rows=4, in_flight=2)
    spread = Spread([healthy, dying], batch, 1, True, settings, metrics, restart=restart)
    got = Collect()
    spread.reconstruct(scan, got.write, threading.Event())
    assert spread.wait_started(timeout=10)
    spread.close()
    want, have = one_device_slices(scan, batch, depth), got.by_row("slice")
    assert sorted(have) == list(range(rows))
    for row, data in want.items():
        np.testing.assert_array_equal(have[row], data)
    assert len(new) == 1 and spread.engines == [healthy, new[0]]
    assert any(index >= 0 for index in new[0].units), "the replacement ran no unit"
    sample = metrics.registry.get_sample_value
    assert sample("tomocast_cluster_workers") == 2
    assert sample("tomocast_cluster_workers_lost_total") == 1
    assert sample("tomocast_cluster_workers_replaced_total") == 1


def test_replacements_that_never_start_are_given_up_after_cluster_replacements() -> None:
    rows, batch, depth = 24, 2, 3
    scan = make_scan(rows)
    metrics = Metrics()
    tries: list[int] = []

    def restart(index: int) -> tuple[FlakyEngine, Future[object]]:
        tries.append(index)
        doomed = FlakyEngine(f"new-{index}", engine(batch, depth), None)
        return doomed, started(EngineLost("no room on the cluster"))

    healthy = FlakyEngine("a", engine(batch, depth), None)
    dying = FlakyEngine("b", engine(batch, depth), 1)
    settings = ClusterSettings(unit_rows=4, in_flight=2, replacements=2)
    spread = Spread([healthy, dying], batch, 1, True, settings, metrics, restart=restart)
    got = Collect()
    spread.reconstruct(scan, got.write, threading.Event())
    spread.close()
    assert sorted(got.by_row("slice")) == list(range(rows))
    assert tries == [1, 1]
    sample = metrics.registry.get_sample_value
    assert sample("tomocast_cluster_workers") == 1
    assert sample("tomocast_cluster_workers_replaced_total") == 2
    # the lost engine and both replacements that did not start
    assert sample("tomocast_cluster_workers_lost_total") == 3


def test_a_stopping_service_replaces_no_engine() -> None:
    rows, batch, depth = 24, 2, 3
    tries: list[int] = []

    def restart(index: int) -> tuple[FlakyEngine, Future[object]]:
        tries.append(index)
        return FlakyEngine(f"new-{index}", engine(batch, depth), None), started()

    metrics = Metrics()
    healthy = FlakyEngine("a", engine(batch, depth), None)
    dying = FlakyEngine("b", engine(batch, depth), 1)
    settings = ClusterSettings(unit_rows=4, in_flight=2)
    spread = Spread([healthy, dying], batch, 1, True, settings, metrics, restart=restart)
    spread.stop_replacing()
    got = Collect()
    spread.reconstruct(make_scan(rows), got.write, threading.Event())
    spread.close()
    assert sorted(got.by_row("slice")) == list(range(rows))
    assert tries == []
    assert metrics.registry.get_sample_value("tomocast_cluster_workers_replaced_total") == 0
    assert metrics.registry.get_sample_value("tomocast_cluster_workers") == 1


class BreakingEngine(FlakyEngine):
    """On scan "bad" (after its probe): unit 0 never finishes, the others fail with an error of
    the computation (not a lost engine)."""

    def submit(self, part: ScanPart, unit: WorkUnit, scale: float | None) -> Future[UnitResult]:
        if part.start.scan_id != "bad" or unit.index < 0:
            return super().submit(part, unit, scale)
        future: Future[UnitResult] = Future()
        if unit.index > 0:
            future.set_exception(RuntimeError("the device fell over"))
        return future


def test_a_failed_scan_leaves_the_engines_free_for_the_next() -> None:
    batch, depth = 2, 3
    engines = [BreakingEngine(str(i), engine(batch, depth), None) for i in range(2)]
    settings = ClusterSettings(unit_rows=2, in_flight=1)
    spread = Spread(list(engines), batch, 1, True, settings, Metrics())
    bad = make_scan(12)
    bad = replace(bad, start=replace(bad.start, scan_id="bad"))
    with pytest.raises(RuntimeError, match="fell over"):
        spread.reconstruct(bad, Collect().write, threading.Event())
    for e in engines:
        e.units.clear()
    got = Collect()
    spread.reconstruct(make_scan(12), got.write, threading.Event())
    spread.close()
    assert sorted(got.by_row("slice")) == list(range(12))
    # the unit left hanging by the failed scan holds no room: both engines work on the next
    assert all(any(index >= 0 for index in e.units) for e in engines)


@pytest.mark.parametrize("nan_row", [2, 3])
def test_non_finite_pixels_of_a_halo_row_are_counted_once(nan_row: int) -> None:
    """Units of 4 rows with a halo of 1: row 2 ends unit 0 and is reconstructed again in unit
    1's halo, row 3 starts unit 1 and is in unit 0's. The scan's count is one device's."""
    rows, batch, depth = 23, 4, 3
    assert [(u.first, u.stop) for u in plan_units(rows, batch, 1, 4)][:2] == [(0, 3), (3, 7)]
    scan = make_scan(rows)
    scan.sinogram[nan_row, 1, 5] = float("nan")

    def completed(spread: Spread | None) -> ScanCompleted:
        sink = Collect()
        Worker(
            WorkerSettings(device="cpu", batch_rows=batch),
            PublishSettings(),
            queue.Queue(),
            ReusingReconstructor(CPU),
            WeighingDenoiser(depth, CPU),
            [sink],
            Metrics(),
            spread=spread,
        ).process(scan)
        assert len(sink.outcomes) == 1 and isinstance(sink.outcomes[0], ScanCompleted)
        return sink.outcomes[0]

    one = completed(None)
    settings = ClusterSettings(unit_rows=4, in_flight=2)
    engines = [LocalEngine(str(i), engine(batch, depth)) for i in range(2)]
    spread = Spread(list(engines), batch, 1, True, settings, Metrics())
    two = completed(spread)
    spread.close()
    # the stand-in FBP spreads the NaN over one column of its slice: cols pixels
    assert one.non_finite_pixels == COLS
    assert two.non_finite_pixels == one.non_finite_pixels
