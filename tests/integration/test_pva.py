"""EPICS PV Access (`publish.pva_prefix`): a real p4p client on loopback reads what the ZeroMQ
viewers got; the sink never waits for PV Access (latest value wins, counted)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service.client import Detector, Published, Subscriber
from service.errors import ConfigError
from service.events import ScanCompleted, ScanEnded, ScanLatency
from service.metrics import Metrics
from service.sim.simulate import SimulatedScan, simulate_scan
from service.sinks import ScanDescription, SliceBatch, SliceSink, SliceTiming

ROWS, COLS, ANGLES = 5, 32, 36
# The server on loopback only, TCP and UDP ports chosen by the system (tests run in parallel)
SERVER_ENV = {
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_SERVER_PORT": "0",
    "EPICS_PVAS_BROADCAST_PORT": "0",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_BEACON_ADDR_LIST": "",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
}


@pytest.fixture
def pva_env(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("p4p")
    for key, value in SERVER_ENV.items():
        monkeypatch.setenv(key, value)


def client(server_conf: dict[str, str]) -> Any:
    """A p4p client that searches the test's server only (by TCP, on its port)."""
    from p4p.client.thread import Context

    port = server_conf["EPICS_PVAS_SERVER_PORT"]
    return Context(
        "pva",
        conf={
            "EPICS_PVA_ADDR_LIST": "127.0.0.1",
            "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{port}",
            "EPICS_PVA_BROADCAST_PORT": server_conf["EPICS_PVAS_BROADCAST_PORT"],
        },
        useenv=False,
    )


@pytest.fixture
def wait_for() -> Iterator[Any]:
    """wait_for(context, pv, predicate): the first value of `pv` (a monitor) that satisfies
    `predicate`, within 30 s."""
    subscriptions: list[Any] = []

    def wait(context: Any, pv: str, predicate: Any) -> Any:
        seen = threading.Event()
        found: list[Any] = []

        def update(value: Any) -> None:
            if not isinstance(value, Exception) and not found and predicate(value):
                found.append(value)
                seen.set()

        subscriptions.append(context.monitor(pv, update))
        assert seen.wait(30.0), f"{pv} never satisfied the test within 30 s"
        return found[0]

    yield wait
    for subscription in subscriptions:
        subscription.close()


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan("pva", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=2000.0, seed=3)


def until_completed(viewer: Subscriber) -> list[Published]:
    messages: list[Published] = []
    while True:
        message = viewer.recv(timeout=60.0)
        assert message is not None, "nothing published for 60 s"
        messages.append(message)
        if isinstance(message.event(), ScanEnded):
            return messages


def test_a_p4p_client_reads_the_last_zeromq_slice(
    pva_env: None, start_service: Any, scan: SimulatedScan, wait_for: Any
) -> None:
    prefix = "TOMOCAST:TEST:"
    service, endpoints = start_service(
        publish={"pva_prefix": prefix, "recon": True}, worker={"batch_rows": 3}
    )
    assert service.pva is not None
    context = client(service.pva.conf)
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan("pva-1", scan.projections, darks=scan.darks, flats=scan.flats, chunk=9)
        messages = until_completed(viewer)
    assert isinstance(messages[-1].event(), ScanCompleted)
    try:
        # State is posted after the images it follows: "completed" means the last ones are out
        wait_for(context, prefix + "State", lambda v: v == "completed")
        last = {m.topic: m for m in messages if m.topic in ("slice", "recon")}
        for topic, pv in (("slice", "Slice"), ("recon", "Recon")):
            value = context.get(prefix + pv, timeout=10.0)
            assert value.dtype == np.float32 and value.shape == (COLS, COLS)
            np.testing.assert_array_equal(np.asarray(value), last[topic].data)
            assert value.attrib["scan_id"] == "pva-1"
            assert value.attrib["index"] == last[topic].header["index"]
            # the guard's verdict travels with the image as with the ZeroMQ header
            assert bool(value.attrib["denoised"]) == bool(last[topic].header["denoised"])
            if "consistency" in last[topic].header:
                assert value.attrib["consistency"] == pytest.approx(
                    last[topic].header["consistency"]
                )
            raw = value.raw
            assert raw["uniqueId"] >= 1
            assert abs(value.timestamp - last[topic].header["t_published"]) < 5.0
            assert [d["size"] for d in raw["dimension"]] == [COLS, COLS]
        assert context.get(prefix + "Slice", timeout=10.0).attrib["model"] == service.denoiser.name
        assert context.get(prefix + "ScanId") == "pva-1"
        assert int(context.get(prefix + "SlicesDone")) == ROWS
        assert int(context.get(prefix + "SlicesTotal")) == ROWS
        assert context.get(prefix + "Model") == service.denoiser.name
        latency = float(context.get(prefix + "Latency"))
        assert 0.0 < latency < 60.0
    finally:
        context.close()
    sample = service.metrics.registry.get_sample_value
    posted = sample("tomocast_pva_updates_total", {"pv": "Slice"})
    superseded = sample("tomocast_pva_superseded_total", {"pv": "Slice"})
    # one hand-over per batch of up to 3 rows: each posted or counted as superseded
    assert posted is not None and superseded is not None and posted >= 1
    assert posted + superseded >= -(-ROWS // 3)


def _description(scan_id: str) -> ScanDescription:
    return ScanDescription(
        scan_id=scan_id,
        rows=3,
        cols=4,
        theta=np.linspace(0, np.pi, 6),
        center=2.0,
        model="none",
        t_last_projection=0.0,
    )


def _batch(scan_id: str, row: int, value: float) -> SliceBatch:
    slices = np.full((1, 4, 4), value, np.float32)
    return SliceBatch(scan_id, "slice", row, slices, SliceTiming(0.0, 0.001))


def test_the_sink_never_waits_latest_value_wins_and_is_counted(
    pva_env: None, wait_for: Any
) -> None:
    from service.pva import PVAServer

    metrics = Metrics()
    pva = PVAServer("UNIT:", metrics, "none")
    assert isinstance(pva, SliceSink)
    conf = pva.open()
    context = client(conf)
    try:
        # the pva thread is not running yet: nothing is posted, write returns at once
        pva.begin(_description("s"))
        for row in range(3):
            pva.write(_batch("s", row, float(row + 1)))
        pva.end(ScanCompleted("s", 3, 0, 0, 0, "none", ScanLatency(0.1, 1.0, None)))
        superseded = metrics.registry.get_sample_value
        assert superseded("tomocast_pva_superseded_total", {"pv": "Slice"}) == 2
        pva.start()
        value = wait_for(context, "UNIT:Slice", lambda v: v.size > 0)
        np.testing.assert_array_equal(np.asarray(value), np.full((4, 4), 3.0, np.float32))
        assert value.attrib["index"] == 2
        wait_for(context, "UNIT:State", lambda v: v == "completed")
        assert superseded("tomocast_pva_updates_total", {"pv": "Slice"}) == 1
    finally:
        context.close()
        pva.stop()
        assert pva.join(10.0)
        pva.close()


def test_without_p4p_a_set_prefix_stops_the_start_with_a_clear_error(
    start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "p4p", None)  # import p4p raises ImportError
    with pytest.raises(ConfigError, match=r"publish\.pva_prefix.*p4p.*tomocast\[pva\]"):
        start_service(publish={"pva_prefix": "X:"}, model={"enabled": False})
