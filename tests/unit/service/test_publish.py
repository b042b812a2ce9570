"""The publisher: everything queued before stop() is forwarded, numbered per topic."""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from service.client import Subscriber
from service.config import PublishSettings
from service.events import ScanFailed, ScanStarted, SliceHeader
from service.metrics import Metrics
from service.publish import Publisher
from tests.support.helpers import wait_for


def test_stop_forwards_every_queued_message_in_order() -> None:
    context = zmq.Context()
    publisher = Publisher(
        PublishSettings(endpoint="tcp://127.0.0.1:*", sndhwm=100_000),
        context,
        Metrics(),
        {"service": "test"},
    )
    publisher.start()
    count = 1500
    with Subscriber(publisher.endpoint, ("event",), context=context) as viewer:
        viewer.wait_ready()

        def produce() -> None:
            channel = publisher.channel()
            for i in range(count):
                channel.send_event(ScanFailed(f"s{i}", "tick"))
            channel.close()

        producer = threading.Thread(target=produce)
        producer.start()
        producer.join()
        publisher.stop()
        assert publisher.join(30)
        got = []
        while (message := viewer.recv(timeout=10.0)) is not None and len(got) < count:
            got.append(message.header)
            if len(got) == count:
                break
    context.term()
    assert [h["scan_id"] for h in got] == [f"s{i}" for i in range(count)]
    assert [h["pub_seq"] for h in got] == list(range(count))
    assert viewer.dropped == {}


def test_stop_delivers_what_a_slow_viewer_has_not_yet_taken() -> None:
    """A viewer that reads slower than the service publishes still gets, after stop(), every
    slice forwarded before it: the socket's queue is not thrown away at close."""
    context = zmq.Context()
    metrics = Metrics()
    publisher = Publisher(
        PublishSettings(endpoint="tcp://127.0.0.1:*", sndhwm=1000), context, metrics, {}
    )
    publisher.start()
    count, data = 40, np.ones((512, 512), np.float32)  # 1 MiB each: more than TCP buffers
    with Subscriber(publisher.endpoint, ("slice",), context=context, rcvhwm=2) as viewer:
        viewer.wait_ready()
        channel = publisher.channel()
        for index in range(count):
            channel.send_slice("slice", SliceHeader("s", 512, "m", time.time(), index, {}), data)
        channel.close()
        wait_for(
            "every slice forwarded to the socket",
            lambda: (
                metrics.registry.get_sample_value("tomocast_queue_depth", {"queue": "publish"}) == 0
            ),
        )
        publisher.stop()  # the viewer has read nothing yet
        assert publisher.join(30)
        got = []
        while len(got) < count and (message := viewer.recv(timeout=10.0)) is not None:
            got.append(message.header["index"])
    context.term()
    assert got == list(range(count))


def test_no_slice_of_a_scan_goes_out_after_its_end() -> None:
    """The drain timeout fails a scan from the stopping thread while the worker may still be
    writing a batch of it: the publisher sends nothing of a scan after its end event, and a
    scan_id used again (a new scan_started) publishes as any other."""
    context = zmq.Context()
    metrics = Metrics()
    publisher = Publisher(
        PublishSettings(endpoint="tcp://127.0.0.1:*"), context, metrics, {"service": "test"}
    )
    publisher.start()
    data = np.ones((2, 2), np.float32)

    def drained() -> bool:
        return metrics.registry.get_sample_value("tomocast_queue_depth", {"queue": "publish"}) == 0

    def header(scan_id: str, index: int) -> SliceHeader:
        return SliceHeader(scan_id, 2, "m", time.time(), index, {})

    with Subscriber(publisher.endpoint, ("slice", "event"), context=context) as viewer:
        viewer.wait_ready()
        stopping, worker = publisher.channel(), publisher.channel()
        worker.send_slice("slice", header("s", 0), data)
        worker.send_slice("slice", header("s", 1), data)
        wait_for("two slices forwarded", lambda: drained())
        stopping.send_event(ScanFailed("s", "drain timeout"))
        wait_for("the end forwarded", lambda: drained())
        worker.send_slice("slice", header("s", 2), data)  # the batch the worker was in
        worker.send_event(ScanStarted("s", 2, 2, 4))  # the same id, a new scan
        worker.send_slice("slice", header("s", 0), data)
        worker.send_event(ScanFailed("end", "marker"))
        got = []
        while (message := viewer.recv(timeout=10.0)) is not None:
            got.append((message.topic, message.header.get("event"), message.header["scan_id"]))
            if message.header["scan_id"] == "end":
                break
        for channel in (stopping, worker):
            channel.close()
    publisher.stop()
    assert publisher.join(30)
    context.term()
    assert [(t, e) for t, e, _ in got] == [
        ("slice", None),
        ("slice", None),
        ("event", "scan_failed"),
        ("event", "scan_started"),
        ("slice", None),
        ("event", "scan_failed"),
    ]
    late = metrics.registry.get_sample_value(
        "tomocast_late_slices_dropped_total", {"topic": "slice"}
    )
    assert late == 1
