"""The geometry cache that `reconstruct` and `prepare` share: a geometry is built once, never
twice at a time, never used half-built, and the cache stays bounded without taking the geometry
a scan in progress uses; and the reconstructors' `prepare`, which fills it ahead of the data."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from workers.fbp import FBP
from workers.geometry_cache import GeometryCache
from workers.gridding import GriddingFBP
from workers.protocols import PreparableReconstructor
from workers.recon import AutoFBP

ANGLES, COLS = 96, 64
CENTER = COLS / 2 + 0.3
# float32, as the worker hands the angles over (service.worker.theta_tensor)
THETA = torch.arange(ANGLES, dtype=torch.float32) * (math.pi / ANGLES)
SINOGRAMS = torch.from_numpy(np.random.default_rng(5).random((3, ANGLES, COLS),
                                                             dtype=np.float32))


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)  # a polling interval with a deadline, not synchronisation


class Gate:
    """A build that waits until the test opens the gate, counting its calls."""

    def __init__(self, value: str, fail: bool = False) -> None:
        self.value, self.fail = value, fail
        self.calls = 0
        self.open = threading.Event()

    def __call__(self) -> str:
        self.calls += 1
        assert self.open.wait(60)
        if self.fail:
            raise RuntimeError("simulated out of memory")
        return self.value


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run `target` on a thread; its result (or exception) lands in the list."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(target())
        except Exception as exc:  # handed to the test to assert on
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# ---- GeometryCache -------------------------------------------------------------------------

def test_a_key_being_built_is_waited_for_never_built_twice_nor_seen_half_built() -> None:
    cache: GeometryCache[str] = GeometryCache(2)
    slow = Gate("prepared")
    preparer, prepared = in_thread(lambda: cache.get("scan", slow, use=False))
    wait_for("the first build to start", lambda: slow.calls == 1)
    second = Gate("built again")
    second.open.set()
    worker, used = in_thread(lambda: cache.get("scan", second, use=True))
    worker.join(0.5)  # a bounded look, not synchronisation: with a second build it would end
    assert worker.is_alive(), "the second caller did not wait for the build under way"
    assert "scan" not in cache and len(cache) == 0  # nothing half-built is visible
    slow.open.set()
    preparer.join(60)
    worker.join(60)
    assert prepared == [("prepared", True)] and used == [("prepared", False)]
    assert second.calls == 0 and cache.builds == 1


def test_a_failed_build_caches_nothing_and_a_waiter_builds_it_itself() -> None:
    cache: GeometryCache[str] = GeometryCache(2)
    broken = Gate("never", fail=True)
    preparer, prepared = in_thread(lambda: cache.get("scan", broken, use=False))
    wait_for("the failing build to start", lambda: broken.calls == 1)
    fallback = Gate("worker's own")
    fallback.open.set()
    worker, used = in_thread(lambda: cache.get("scan", fallback, use=True))
    broken.open.set()
    preparer.join(60)
    worker.join(60)
    assert isinstance(prepared[0], RuntimeError)
    assert used == [("worker's own", True)] and fallback.calls == 1
    assert cache.builds == 1 and "scan" in cache


def test_bounded_and_the_geometry_in_use_is_never_evicted_by_a_prepare() -> None:
    cache: GeometryCache[str] = GeometryCache(2)
    cache.get("scan-1", lambda: "g1", use=True)  # the worker reconstructs scan 1
    cache.get("scan-2", lambda: "g2", use=False)  # scans 2 and 3 start meanwhile
    cache.get("scan-3", lambda: "g3", use=False)
    assert "scan-1" in cache and "scan-2" not in cache and "scan-3" in cache
    assert len(cache) == 2
    cache.get("scan-3", lambda: "rebuilt", use=True)  # the worker moves on to scan 3 ...
    cache.get("scan-4", lambda: "g4", use=False)  # ... so scan 1's geometry may go now
    assert "scan-1" not in cache and "scan-3" in cache and "scan-4" in cache
    assert cache.builds == 4
    with pytest.raises(ValueError, match="capacity"):
        GeometryCache(1)


# ---- the reconstructors' prepare ---------------------------------------------------------

@pytest.mark.parametrize("method", [FBP, GriddingFBP])
def test_after_prepare_reconstruct_builds_nothing(method: type[FBP] | type[GriddingFBP]) -> None:
    fbp = method("cpu")
    assert isinstance(fbp, PreparableReconstructor)
    assert fbp.prepare(THETA, CENTER, COLS) is True
    assert fbp.prepare(THETA.clone(), CENTER, COLS) is False  # cached: equal angles, same key
    assert fbp.geometries.builds == 1
    slices = fbp.reconstruct(SINOGRAMS, THETA.clone(), CENTER)
    assert fbp.geometries.builds == 1
    torch.testing.assert_close(slices, method("cpu").reconstruct(SINOGRAMS, THETA, CENTER),
                               rtol=0, atol=0)
    fbp.reconstruct(SINOGRAMS, THETA, CENTER + 1)  # another geometry is built as before
    assert fbp.geometries.builds == 2
    assert fbp.prepare(THETA[:0], CENTER, COLS) is False  # no angles: nothing to build
    with pytest.raises(ValueError, match="center"):
        fbp.prepare(THETA, math.inf, COLS)


def test_auto_prepares_the_method_it_will_use() -> None:
    auto = AutoFBP("cpu")
    assert isinstance(auto, PreparableReconstructor)
    assert auto.prepare(THETA, CENTER, COLS)
    assert (auto.gridding.geometries.builds, auto.direct.geometries.builds) == (1, 0)
    auto.reconstruct(SINOGRAMS, THETA, CENTER)
    assert (auto.gridding.geometries.builds, auto.direct.geometries.builds) == (1, 0)
    direct = AutoFBP("cpu", max_matrix_bytes=1 << 10)  # gridding's matrix would not fit
    assert direct.prepare(THETA, CENTER, COLS)
    direct.reconstruct(SINOGRAMS, THETA, CENTER)
    assert (direct.gridding.geometries.builds, direct.direct.geometries.builds) == (0, 1)


class GatedGridding(GriddingFBP):
    """The real gridding FBP, its geometry builds counted by center and held at a gate."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.gate = threading.Event()
        self.gate.set()
        self.built: list[float] = []

    def _build(self, theta64: torch.Tensor, center: float, cols: int) -> Any:
        self.built.append(center)
        assert self.gate.wait(60)
        return super()._build(theta64, center, cols)


def test_reconstruct_waits_for_the_prepare_under_way() -> None:
    fbp = GatedGridding()
    fbp.gate.clear()
    preparer, prepared = in_thread(lambda: fbp.prepare(THETA, CENTER, COLS))
    wait_for("the prepare to start building", lambda: fbp.built == [CENTER])
    worker, slices = in_thread(lambda: fbp.reconstruct(SINOGRAMS, THETA, CENTER))
    worker.join(0.5)  # a bounded look: the worker must be waiting, not building
    assert worker.is_alive() and fbp.built == [CENTER]
    fbp.gate.set()
    preparer.join(60)
    worker.join(60)
    assert prepared == [True] and fbp.built == [CENTER]
    assert isinstance(slices[0], torch.Tensor)
    torch.testing.assert_close(slices[0], GriddingFBP("cpu").reconstruct(SINOGRAMS, THETA,
                                                                          CENTER),
                               rtol=0, atol=0)


def test_prepares_on_other_threads_never_disturb_the_scan_in_progress() -> None:
    fbp = GatedGridding()  # two geometries cached: three more keep evicting each other
    expected = fbp.reconstruct(SINOGRAMS, THETA, CENTER)  # the scan in progress
    others = (CENTER - 1.5, CENTER + 0.5, CENTER + 2.0)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            for center in others:
                fbp.prepare(THETA, center, COLS)

    threads = [in_thread(churn) for _ in range(2)]
    for _ in range(4):
        # two geometries built since the last batch: a plain LRU would have dropped ours
        builds = fbp.geometries.builds
        wait_for("two more prepared geometries",
                 lambda since=builds: fbp.geometries.builds >= since + 2)
        torch.testing.assert_close(fbp.reconstruct(SINOGRAMS, THETA, CENTER), expected,
                                   rtol=0, atol=0)
    stop.set()
    for thread, result in threads:
        thread.join(120)
        assert result == [None], result
    assert fbp.built.count(CENTER) == 1  # never evicted while in use, never rebuilt
    assert len(fbp.geometries) <= 2


def test_a_failed_prepare_leaves_reconstruct_to_build() -> None:
    class Failing(GriddingFBP):
        failures = 1

        def _build(self, theta64: torch.Tensor, center: float, cols: int) -> Any:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("simulated out of memory")
            return super()._build(theta64, center, cols)

    fbp = Failing("cpu")
    with pytest.raises(RuntimeError, match="simulated"):
        fbp.prepare(THETA, CENTER, COLS)
    assert len(fbp.geometries) == 0
    torch.testing.assert_close(fbp.reconstruct(SINOGRAMS, THETA, CENTER),
                               GriddingFBP("cpu").reconstruct(SINOGRAMS, THETA, CENTER))
    assert fbp.geometries.builds == 1


@pytest.mark.gpu
def test_prepared_on_another_thread_and_stream_matches_the_cpu() -> None:
    fbp = GriddingFBP("cuda")
    preparer, prepared = in_thread(lambda: fbp.prepare(THETA.cuda(), CENTER, COLS))
    preparer.join(120)
    assert prepared == [True]
    with torch.cuda.stream(torch.cuda.Stream()):
        slices = fbp.reconstruct(SINOGRAMS.cuda(), THETA.cuda(), CENTER)
    torch.cuda.synchronize()
    assert fbp.geometries.builds == 1
    cpu = GriddingFBP("cpu").reconstruct(SINOGRAMS, THETA, CENTER)
    torch.testing.assert_close(slices.cpu(), cpu, rtol=0, atol=1e-4 * float(cpu.abs().max()))
