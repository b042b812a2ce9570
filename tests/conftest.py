"""Shared fixtures: a real service on loopback TCP with free ports, and the gpu marker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from service.app import Endpoints, Service


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**base}
    for key, value in extra.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


@pytest.fixture
def start_service() -> Iterator[Callable[..., tuple[Service, Endpoints]]]:
    """Start an in-process service on free loopback ports; stopped at the end of the test."""
    from service.app import Service
    from service.config import load_settings

    started: list[Service] = []

    def start(reconstructor: Any = None, **overrides: Any) -> tuple[Service, Endpoints]:
        base = {
            "ingest": {"endpoint": "tcp://127.0.0.1:*"},
            "publish": {"endpoint": "tcp://127.0.0.1:*"},
            "metrics": {"port": 0},
            "worker": {"device": "cpu"},
        }
        service = Service(load_settings(None, _merge(base, overrides)), reconstructor)
        started.append(service)
        return service, service.start()

    yield start
    for service in started:
        service.stop()
