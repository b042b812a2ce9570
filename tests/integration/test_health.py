"""/healthz, /readyz and /metrics over real HTTP: readiness flips to 200 only when ready."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service import app
from service.config import load_settings
from service.errors import ConfigError
from service.health import HTTP_THREADS, HealthServer
from service.metrics import Metrics
from workers.denoise import DEFAULT_MODEL


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; 4xx/5xx are answers, not errors."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:  # it holds the connection
            return exc.code, exc.read().decode()


class Switch:
    """A readiness (or liveness) check the test flips; thread-safe like the Service's."""

    def __init__(self, why_not: str, why: str) -> None:
        self._on = threading.Event()
        self.why_not, self.why = why_not, why

    def set(self) -> None:
        self._on.set()

    def __call__(self) -> tuple[bool, str]:
        return (True, self.why) if self._on.is_set() else (False, self.why_not)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def server(metrics: Metrics) -> Iterator[tuple[HealthServer, Switch, Switch]]:
    ready, alive = Switch("loading the model", "ready"), Switch("the worker thread died", "ok")
    alive.set()
    health = HealthServer("127.0.0.1", 0, metrics.registry, ready, alive)
    health.start()
    yield health, ready, alive
    health.stop()


def test_readyz_is_503_with_the_reason_until_ready(
    server: tuple[HealthServer, Switch, Switch],
) -> None:
    health, ready, _ = server
    assert get(health.port, "/readyz") == (503, "loading the model\n")
    assert get(health.port, "/healthz") == (200, "ok\n")  # alive while not ready
    ready.set()
    assert get(health.port, "/readyz") == (200, "ready\n")


def test_healthz_reports_a_dead_service(metrics: Metrics) -> None:
    alive = Switch("the worker thread died", "ok")
    health = HealthServer("127.0.0.1", 0, metrics.registry, lambda: (True, "ready"), alive)
    health.start()
    try:
        assert get(health.port, "/healthz") == (503, "the worker thread died\n")
        alive.set()
        assert get(health.port, "/healthz") == (200, "ok\n")
    finally:
        health.stop()


def test_metrics_and_unknown_paths(
    server: tuple[HealthServer, Switch, Switch], metrics: Metrics
) -> None:
    health, _, _ = server
    metrics.rejected.labels("duplicate").inc()
    status, text = get(health.port, "/metrics")
    assert status == 200
    assert 'tomocast_rejected_messages_total{reason="duplicate"} 1.0' in text
    assert 'tomocast_stage_seconds_bucket{le="0.07",stage="fbp"} 0.0' in text  # budget edge
    status, text = get(health.port, "/")
    assert status == 404 and "/metrics" in text


def test_a_busy_port_is_a_config_error(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics.port={port}"):
            HealthServer("127.0.0.1", port, metrics.registry, lambda: (True, "ready"))


def test_stop_without_start_returns(metrics: Metrics) -> None:
    HealthServer("127.0.0.1", 0, metrics.registry, lambda: (True, "ready")).stop()


def test_service_is_ready_only_after_the_model_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Service with the real model; only the moment the model load returns is held
    back, so the not-ready state can be observed without racing the start-up."""
    loading, release = threading.Event(), threading.Event()
    real_load = app.load_denoiser

    def held_load(path: Path | None, device: Any, **options: Any) -> Any:
        loading.set()
        if not release.wait(60):
            raise TimeoutError("the test never released the model load")
        return real_load(path, device, **options)

    monkeypatch.setattr(app, "load_denoiser", held_load)
    settings = load_settings(
        None,
        {
            "ingest": {"endpoint": "tcp://127.0.0.1:*"},
            "publish": {"endpoint": "tcp://127.0.0.1:*"},
            "metrics": {"port": 0},
            "worker": {"device": "cpu"},
        },
    )
    service = app.Service(settings)
    port = service.health.port
    started: list[app.Endpoints] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            started.append(service.start())
        except BaseException as exc:
            failed.append(exc)
            release.set()

    starter = threading.Thread(target=start, name="test-start")
    starter.start()
    try:
        assert loading.wait(60), "Service.start never began loading the model"
        assert get(port, "/readyz") == (503, "loading the model\n")
        assert get(port, "/healthz")[0] == 200
        status, text = get(port, "/metrics")  # scrapable before ready: zeros, not gaps
        assert status == 200 and "tomocast_slices_published_total" in text
        release.set()
        starter.join(120)
        assert not failed, failed
        assert started, "Service.start did not return"
        assert get(port, "/readyz") == (200, "ready\n")
        assert started[0].ingest.startswith("tcp://127.0.0.1:")
        assert started[0].metrics_port == port
        assert f'name="{DEFAULT_MODEL}"' in get(port, "/metrics")[1]
    finally:
        release.set()
        starter.join(120)
        t0 = time.monotonic()
        service.stop()
        assert time.monotonic() - t0 < 60


def test_half_open_connections_take_a_bounded_number_of_threads(
    server: tuple[HealthServer, Switch, Switch],
) -> None:
    health, ready, _ = server
    ready.set()
    threads_before = threading.active_count()
    idle = []
    try:
        for _ in range(300):  # connect, send nothing: each would hold a thread per connection
            idle.append(socket.create_connection(("127.0.0.1", health.port), timeout=10))
        # the server has accepted them all once a request behind them was accepted (refused
        # or answered: the pool is busy with the first ones)
        with socket.create_connection(("127.0.0.1", health.port), timeout=10) as probe:
            probe.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            probe.recv(1024)
        assert threading.active_count() - threads_before <= HTTP_THREADS
    finally:
        for connection in idle:
            connection.close()
    assert get(health.port, "/readyz") == (200, "ready\n")  # served again once they are gone
