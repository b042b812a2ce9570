"""`cluster.engine = "ray"`: a scan's work units go to Ray worker actors (their own
reconstructor and denoiser) through the object store. Against one local Ray instance on
loopback for the module (2 CPUs, no dashboard, stopped at the end): a real service with two
actors (and no denoiser or FBP of its own at work) publishes the slices the in-process engine
does, /metrics shows both actors, every actor builds a scan's geometry at its scan_start, and
an actor killed mid-scan has its units re-run on the other, every slice published exactly once,
and is replaced: the live count comes back to two. Skipped when ray is not installed
(`pip install 'tomocast[ray]'`)."""

from __future__ import annotations

import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from service.app import Endpoints, Service
from service.client import Detector, Subscriber
from service.cluster import ClusterModel
from service.config import load_settings
from service.engine import ScanPart, UnitResult, WorkUnit
from service.events import ScanCompleted, ScanEnded
from service.ray_actors import RayEngine
from service.sim.simulate import SimulatedScan, simulate_scan
from tests.support.helpers import wait_for
from workers.denoise import DenoiseEngine

# any ImportError: not installed, or a wheel that does not load on this platform
ray = pytest.importorskip("ray", exc_type=ImportError)

pytestmark = [
    # ray's own modules warn about their dependencies; not ours to fix
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.timeout(240),
]

ROWS, COLS, ANGLES = 24, 48, 40
Slices = dict[tuple[str, int], np.ndarray]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One Ray instance for the module: loopback, 2 CPUs (one per actor), bounded store."""
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan(
        "ray-scan", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=800.0, n_flat=2, seed=9
    )


def serve(**overrides: Any) -> tuple[Service, Endpoints]:
    """A started service on loopback with free ports, on the CPU."""
    base: dict[str, Any] = {
        "ingest": {"endpoint": "tcp://127.0.0.1:*"},
        "publish": {"endpoint": "tcp://127.0.0.1:*"},
        "metrics": {"port": 0},
        "worker": {"device": "cpu", "batch_rows": 4},
        # the shipped network in fp32: no int8 calibration at each of the three loads
        "model": {"precision": "fp32"},
    }
    service = Service(load_settings(None, {**base, **overrides}))
    try:
        return service, service.start()
    except BaseException:
        service.stop()
        raise


def run_scan(endpoints: Endpoints, scan: SimulatedScan, **options: Any) -> Slices:
    """One scan through a service; every slice, checked to be published exactly once.
    `options`: of `Detector.send_scan`."""
    published: list[tuple[str, int, np.ndarray]] = []
    ended: list[ScanEnded] = []
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        detector.send_scan("ray-scan", scan.projections, flats=scan.flats, chunk=10, **options)
        while not ended:
            message = viewer.recv(timeout=60.0)
            assert message is not None, "nothing published for 60 s"
            event = message.event()
            if isinstance(event, ScanEnded):
                ended.append(event)
            elif event is None:
                assert message.data is not None
                published.append((message.topic, message.header["index"], message.data))
    assert isinstance(ended[0], ScanCompleted), ended[0]
    counts = Counter((topic, index) for topic, index, _ in published)
    assert sorted(counts) == [("slice", i) for i in range(ROWS)]
    assert set(counts.values()) == {1}, "a slice was published twice"
    return {(topic, index): data for topic, index, data in published}


def scrape(service: Service, name: str) -> float:
    """`name`'s value (with its labels, if any: `name{label="value"}`) as Prometheus reads it
    from /metrics."""
    url = f"http://127.0.0.1:{service.health.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def assert_same_slices(got: Slices, want: Slices) -> None:
    volume = np.stack([want[("slice", i)] for i in range(ROWS)])
    tolerance = 1e-4 * float(volume.max() - volume.min())
    for key, data in want.items():
        np.testing.assert_allclose(got[key], data, rtol=0, atol=tolerance, err_msg=str(key))


@pytest.fixture(scope="module")
def in_process(scan: SimulatedScan) -> Slices:
    """The reference: the same scan through the in-process engine, one CPU."""
    service, endpoints = serve()
    try:
        return run_scan(endpoints, scan)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def on_ray() -> Iterator[tuple[Service, Endpoints]]:
    """One service with two Ray worker actors for the module (actors take seconds to start):
    the tests run in file order, the one that kills an actor last."""
    service, endpoints = serve(cluster={"engine": "ray", "workers": 2, "unit_rows": 4})
    yield service, endpoints
    service.stop()


def test_two_ray_actors_publish_the_in_process_slices(
    on_ray: tuple[Service, Endpoints], scan: SimulatedScan, in_process: Slices
) -> None:
    service, endpoints = on_ray
    engines = service.spread.engines if service.spread else []
    assert len(engines) == 2 and all(isinstance(e, RayEngine) for e in engines)
    # the model as the actors loaded it: the service process loaded no network of its own
    assert isinstance(service.denoiser, ClusterModel)
    assert not isinstance(service.worker.denoiser if service.worker else None, DenoiseEngine)
    assert service.denoiser.name == "tomogan-beamline-d3" and service.denoiser.depth == 3
    assert scrape(service, "tomocast_cluster_workers") == 2
    assert_same_slices(run_scan(endpoints, scan), in_process)
    assert scrape(service, "tomocast_cluster_workers") == 2
    assert scrape(service, "tomocast_cluster_units_retried_total") == 0


def test_every_actor_builds_the_geometry_at_scan_start(
    on_ray: tuple[Service, Endpoints], scan: SimulatedScan, in_process: Slices
) -> None:
    """A geometry no unit has built yet (a declared centre: an estimated one comes from the
    data), built by both actors between scan_start and the first projection: no unit of the
    scan builds it."""
    service, endpoints = on_ray
    registry = service.metrics.registry

    def sample(name: str, **labels: str) -> float:
        value = registry.get_sample_value(name, labels)
        assert value is not None, name
        return value

    built = sample("tomocast_geometry_prepares_total", outcome="built")
    unit_builds = sample("tomocast_cluster_unit_geometry_builds_total")
    waited: list[int] = []

    def after_the_prepare(count: int) -> None:
        """Before each chunk of projections: the first waits for the actors' prepare."""
        if not waited:
            wait_for(
                "the actors' geometry",
                lambda: sample("tomocast_geometry_prepares_total", outcome="built") == built + 1,
            )
            waited.append(count)

    run_scan(endpoints, scan, center=COLS / 2 + 0.25, pace=after_the_prepare)
    assert waited
    assert sample("tomocast_cluster_unit_geometry_builds_total") == unit_builds
    assert sample("tomocast_errors_total", stage="prepare") == 0


def test_an_actor_killed_mid_scan_loses_nothing(
    on_ray: tuple[Service, Endpoints], scan: SimulatedScan, in_process: Slices
) -> None:
    service, endpoints = on_ray
    assert service.spread is not None
    victim = service.spread.engines[1]
    assert isinstance(victim, RayEngine) and victim.alive
    submit = victim.submit
    killed: list[str] = []

    def submit_then_kill(part: ScanPart, unit: WorkUnit, scale: float | None) -> Future[UnitResult]:
        """Actor 1 is killed the moment its first unit of the scan is on its way to it."""
        future = submit(part, unit, scale)
        if not killed:
            ray.kill(victim.actor, no_restart=True)
            killed.append(victim.name)
        return future

    victim.submit = submit_then_kill  # type: ignore[method-assign]
    slices = run_scan(endpoints, scan)
    assert killed
    assert_same_slices(slices, in_process)
    assert scrape(service, "tomocast_cluster_workers_lost_total") == 1
    assert scrape(service, "tomocast_cluster_units_retried_total") >= 1
    # a new actor takes the lost one's place: the live count comes back to 2
    assert scrape(service, "tomocast_cluster_workers_replaced_total") == 1
    assert service.spread.wait_started(timeout=120), "the replacement did not start"
    assert scrape(service, "tomocast_cluster_workers") == 2
    replacement = service.spread.engines[1]
    assert isinstance(replacement, RayEngine) and replacement is not victim
    # and it works: the next scan's units reach it, the slices are the same
    ran = scrape(service, 'tomocast_cluster_unit_seconds_count{worker="1"}')
    assert_same_slices(run_scan(endpoints, scan), in_process)
    assert scrape(service, 'tomocast_cluster_unit_seconds_count{worker="1"}') > ran
    assert scrape(service, "tomocast_cluster_workers") == 2
    assert scrape(service, "tomocast_cluster_workers_lost_total") == 1
