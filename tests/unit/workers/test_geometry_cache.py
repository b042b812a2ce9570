"""The geometry cache that `reconstruct` and `prepare` share: a geometry is built once, never
twice at a time, never used half-built, and the cache stays bounded without taking the geometry
a scan in progress uses; and the reconstructors' `prepare`, which fills it ahead of the data."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import pytest
import torch

from tests.support.helpers import GatedGridding, in_thread, wait_for
from workers.fbp import FBP
from workers.geometry_cache import GeometryCache
from workers.gridding import GriddingFBP
from workers.protocols import PreparableReconstructor
from workers.recon import AutoFBP
from workers.rows import theta_tensor

ANGLES, COLS = 96, 64
CENTER = COLS / 2 + 0.3
# float32, as the worker hands the angles over (workers.rows.theta_tensor)
THETA = torch.arange(ANGLES, dtype=torch.float32) * (math.pi / ANGLES)
SINOGRAMS = torch.from_numpy(np.random.default_rng(5).random((3, ANGLES, COLS), dtype=np.float32))


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


def test_a_released_geometry_is_evicted_in_its_turn_like_any_other() -> None:
    cache: GeometryCache[str] = GeometryCache(2)
    cache.get("warm-up", lambda: "w", use=True)
    cache.release()  # the warm-up (or a scan) is over
    cache.get("scan-1", lambda: "g1", use=False)  # two scans start
    cache.get("scan-2", lambda: "g2", use=False)
    assert "warm-up" not in cache and "scan-1" in cache and "scan-2" in cache
    cache.get("scan-1", lambda: "rebuilt", use=True)
    cache.get("scan-2", lambda: "rebuilt", use=True)
    assert cache.builds == 3
    cache.get("scan-3", lambda: "g3", use=False)  # scan 2 is in progress: 1 goes (LRU) ...
    cache.get("scan-4", lambda: "g4", use=False)  # ... then 3, never 2
    assert "scan-2" in cache and "scan-4" in cache and len(cache) == 2
    cache.get("scan-4", lambda: "g4", use=False)  # a prepare counts as a use ...
    cache.release()  # ... and scan 2 is over: it goes before 4
    cache.get("scan-5", lambda: "g5", use=False)
    assert "scan-2" not in cache and "scan-4" in cache and "scan-5" in cache


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
    torch.testing.assert_close(
        slices, method("cpu").reconstruct(SINOGRAMS, THETA, CENTER), rtol=0, atol=0
    )
    fbp.reconstruct(SINOGRAMS, THETA, CENTER + 1)  # another geometry is built as before
    assert fbp.geometries.builds == 2
    assert fbp.prepare(THETA[:0], CENTER, COLS) is False  # no angles: nothing to build
    with pytest.raises(ValueError, match="center"):
        fbp.prepare(THETA, math.inf, COLS)


@pytest.mark.parametrize("method", [GriddingFBP, AutoFBP])
def test_geometries_prepared_after_a_warm_up_are_all_used(
    method: type[GriddingFBP] | type[AutoFBP],
) -> None:
    fbp = method("cpu")  # two geometries cached
    cache = fbp.gridding.geometries if isinstance(fbp, AutoFBP) else fbp.geometries
    fbp.reconstruct(SINOGRAMS[:1, :32], THETA[:32], CENTER)  # the service's warm-up
    fbp.release()
    assert fbp.prepare(THETA, CENTER - 1, COLS)  # two scans start, two geometries
    assert fbp.prepare(THETA, CENTER + 1, COLS)
    fbp.reconstruct(SINOGRAMS, THETA, CENTER - 1)  # the first scan ...
    fbp.release()
    fbp.reconstruct(SINOGRAMS, THETA, CENTER + 1)  # ... and the second find theirs
    assert cache.builds == 3


@pytest.mark.parametrize("method", [FBP, GriddingFBP, AutoFBP])
def test_the_workers_theta_on_the_cpu_prepares_and_reconstructs(
    method: type[FBP] | type[GriddingFBP] | type[AutoFBP],
) -> None:
    angles = np.arange(ANGLES) * (math.pi / ANGLES)  # float64, as a scan_start's
    fbp = method("cpu")
    theta = theta_tensor(angles)
    assert theta.device.type == "cpu" and theta.dtype == torch.float32
    assert fbp.prepare(theta, CENTER, COLS)
    slices = fbp.reconstruct(SINOGRAMS, theta_tensor(angles), CENTER)
    assert not fbp.prepare(theta_tensor(angles), CENTER, COLS)  # what reconstruct used
    torch.testing.assert_close(
        slices, method("cpu").reconstruct(SINOGRAMS, theta, CENTER), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="theta has 95 angles"):
        fbp.reconstruct(SINOGRAMS, theta[1:], CENTER)


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
    torch.testing.assert_close(
        slices[0], GriddingFBP("cpu").reconstruct(SINOGRAMS, THETA, CENTER), rtol=0, atol=0
    )


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
        wait_for(
            "two more prepared geometries", lambda since=builds: fbp.geometries.builds >= since + 2
        )
        torch.testing.assert_close(
            fbp.reconstruct(SINOGRAMS, THETA, CENTER), expected, rtol=0, atol=0
        )
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
    torch.testing.assert_close(
        fbp.reconstruct(SINOGRAMS, THETA, CENTER),
        GriddingFBP("cpu").reconstruct(SINOGRAMS, THETA, CENTER),
    )
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


@pytest.mark.gpu
@pytest.mark.parametrize("method", [FBP, GriddingFBP, AutoFBP])
def test_cuda_sinograms_with_the_workers_theta_on_the_cpu_match_the_cpu(
    method: type[FBP] | type[GriddingFBP] | type[AutoFBP],
) -> None:
    angles = np.arange(ANGLES) * (math.pi / ANGLES)
    fbp = method("cuda")
    preparer, prepared = in_thread(lambda: fbp.prepare(theta_tensor(angles), CENTER, COLS))
    preparer.join(120)
    assert prepared == [True]
    slices = fbp.reconstruct(SINOGRAMS.cuda(), theta_tensor(angles), CENTER)
    assert not fbp.prepare(theta_tensor(angles), CENTER, COLS)  # what reconstruct used
    if isinstance(fbp, AutoFBP):  # the same method on the CPU
        method = FBP if fbp.method_for(ANGLES, COLS) == "direct" else GriddingFBP
    cpu = method("cpu").reconstruct(SINOGRAMS, theta_tensor(angles), CENTER)
    torch.testing.assert_close(slices.cpu(), cpu, rtol=0, atol=1e-4 * float(cpu.abs().max()))
