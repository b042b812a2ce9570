"""CURVE: only clients with an allowed key get data in or slices out."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from service.client import Detector, Subscriber
from service.errors import ConfigError
from service.events import ScanCompleted
from service.protocol import ScanStart, encode
from service.security import ClientKeys, generate_keys
from tests.support.helpers import wait_for

ROWS, COLS, ANGLES = 4, 32, 20
rng = np.random.default_rng(3)
FLATS = (rng.poisson(4000, (1, ROWS, COLS)) + 100).astype(np.uint16)
PROJECTIONS = (rng.poisson(2000, (ANGLES, ROWS, COLS)) + 100).astype(np.uint16)
FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
}


def intruder(
    context: zmq.Context, kind: int, endpoint: str, curve: ClientKeys | None
) -> tuple[zmq.Socket, int]:
    """A raw client socket, connected; returns it with the outcome of its first handshake."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(FAILED))
    if curve is not None:
        curve.apply(socket)
    if kind == zmq.SUB:
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(endpoint)
    try:
        assert monitor.poll(30_000), "no handshake within 30 s"
        return socket, int(recv_monitor_message(monitor)["event"])
    finally:
        socket.disable_monitor()
        monitor.close()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    names = ("server", "good", "colleague", "intruder")
    made = {name: generate_keys(tmp_path / "keys", name) for name in names}
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(made["good"][0], allowed)
    shutil.copy(made["colleague"][0], allowed)
    return {
        "allowed": allowed,
        **{f"{n}.public": p for n, (p, _) in made.items()},
        **{f"{n}.secret": s for n, (_, s) in made.items()},
    }


def test_unknown_clients_get_nothing_in_and_nothing_out(
    start_service: Any, keys: dict[str, Path]
) -> None:
    service, endpoints = start_service(
        security={
            "server_secret_key": str(keys["server.secret"]),
            "allowed_clients": str(keys["allowed"]),
        }
    )
    good = ClientKeys.from_files(keys["good.secret"], keys["server.public"])
    stranger = ClientKeys.from_files(keys["intruder.secret"], keys["server.public"])
    context = zmq.Context()
    clients = {
        name: intruder(context, kind, endpoint, curve)
        for name, kind, endpoint, curve in (
            ("spy", zmq.SUB, endpoints.publish, stranger),
            ("plain spy", zmq.SUB, endpoints.publish, None),
            ("forger", zmq.PUSH, endpoints.ingest, stranger),
            ("plain forger", zmq.PUSH, endpoints.ingest, None),
        )
    }
    assert {name: event in FAILED for name, (_, event) in clients.items()} == dict.fromkeys(
        clients, True
    )
    for name in ("forger", "plain forger"):
        start = ScanStart(name.replace(" ", "-"), 0, ROWS, COLS, ANGLES, "uint16", n_flat=1)
        # After a failed handshake there may be no pipe left to queue into at all (Again):
        # either way, nothing reaches the service.
        with contextlib.suppress(zmq.Again):
            clients[name][0].send_multipart(encode(start), flags=zmq.NOBLOCK)
    with (
        Subscriber(endpoints.publish, curve=good) as viewer,
        Detector(endpoints.ingest, curve=good) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan("genuine", PROJECTIONS, flats=FLATS)
        seen = []
        while not seen or not isinstance(seen[-1].event(), ScanCompleted):
            message = viewer.recv(timeout=60.0)
            assert message is not None
            seen.append(message)
        for name in ("spy", "plain spy"):
            assert not clients[name][0].poll(0), f"the {name} received something"
    for socket, _ in clients.values():
        socket.close()
    context.term()
    assert {m.header["scan_id"] for m in seen} == {"genuine"}
    assert sorted(m.header["index"] for m in seen if m.topic == "slice") == list(range(ROWS))
    accepted = service.metrics.registry.get_sample_value(
        "tomocast_messages_total", {"type": "scan_start"}
    )
    assert accepted == 1


def test_half_configured_curve_is_a_clear_error(keys: dict[str, Path]) -> None:
    from service.config import load_settings

    with pytest.raises(ConfigError, match="both server_secret_key and allowed_clients"):
        load_settings(None, {"security": {"server_secret_key": str(keys["server.secret"])}})
    with pytest.raises(ConfigError, match="no secret key"):
        ClientKeys.from_files(keys["good.public"], keys["server.public"])


def test_one_client_key_cannot_hold_every_live_scan(
    start_service: Any, keys: dict[str, Path]
) -> None:
    """An allowed key that starts scans and goes silent (a crashed DAQ, or a stolen key) gets
    at most ingest.max_live_scans_per_client places; another key's scan still gets in."""
    service, endpoints = start_service(
        security={
            "server_secret_key": str(keys["server.secret"]),
            "allowed_clients": str(keys["allowed"]),
        },
        # no eviction within the test: only the per-client cap can let the colleague in
        ingest={"max_live_scans": 3, "max_live_scans_per_client": 2, "idle_evict_s": 3600},
    )
    counter = service.metrics.registry.get_sample_value
    assembler = service.ingest.assembler
    assert assembler is not None
    squatter = ClientKeys.from_files(keys["good.secret"], keys["server.public"])
    colleague = ClientKeys.from_files(keys["colleague.secret"], keys["server.public"])
    with (
        Subscriber(endpoints.publish, curve=colleague) as viewer,
        Detector(endpoints.ingest, curve=squatter) as hog,
        Detector(endpoints.ingest, curve=colleague) as daq,
    ):
        viewer.wait_ready()
        for n in range(3):
            hog.start_scan(f"held-{n}", ROWS, COLS, ANGLES, "uint16", n_flat=1)
        wait_for(
            "the third start of one key to be refused",
            lambda: counter("tomocast_rejected_messages_total", {"reason": "too_many_scans"}) == 1,
        )
        assert sorted(assembler.scans) == ["held-0", "held-1"]
        daq.send_scan("genuine", PROJECTIONS, flats=FLATS)
        seen = []
        while not seen or not isinstance(seen[-1].event(), ScanCompleted):
            message = viewer.recv(timeout=60.0)
            assert message is not None, "the other key's scan did not complete"
            seen.append(message)
    slices = [m for m in seen if m.topic == "slice"]
    assert {m.header["scan_id"] for m in slices} == {"genuine"}
    assert sorted(m.header["index"] for m in slices) == list(range(ROWS))
