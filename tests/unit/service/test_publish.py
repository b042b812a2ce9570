"""The publisher: everything queued before stop() is forwarded, numbered per topic."""

from __future__ import annotations

import threading

import zmq

from service.client import Subscriber
from service.config import PublishSettings
from service.events import ScanFailed
from service.metrics import Metrics
from service.publish import Publisher


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
