"""The publisher: slices and scan events out to viewers over ZeroMQ.

One thread owns the XPUB socket. Producers (the ingest and worker threads) each hold a
`PublishChannel`, an inproc PUSH socket into that thread, because ZeroMQ sockets must not be
shared between threads. XPUB rather than PUB lets the service answer the viewers' handshake: a
viewer subscribes to its topics, then to a unique `hello.<token>` topic, and the service
publishes on that topic as soon as it sees the subscription. Subscriptions travel in order, so
when the hello arrives every earlier subscription of that viewer is in place and nothing
published afterwards is missed. Slow viewers lose messages at the high-water mark (PUB semantics)
and never slow the pipeline; every message carries `pub_seq`, numbered per topic, from which a
viewer counts what it lost (`Subscriber.dropped`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from service.config import PublishSettings
from service.metrics import Metrics
from service.security import ServerKeys

log = logging.getLogger(__name__)

HELLO_PREFIX = b"hello."
_STOP = b"\x00stop"
_INPROC = "inproc://tomocast-publisher-{}"


class Publisher:
    """Owns the XPUB socket and its forwarding thread. `start`/`stop` from the owner's thread;
    `channel()` from each producer thread (one channel per thread)."""

    def __init__(
        self,
        settings: PublishSettings,
        context: zmq.Context,
        metrics: Metrics,
        service_info: dict[str, Any],
        curve: ServerKeys | None = None,
    ) -> None:
        self.settings = settings
        self.context = context
        self.metrics = metrics
        self.service_info = service_info
        self.curve = curve
        self._inproc = _INPROC.format(id(self))
        self._xpub: zmq.Socket | None = None
        self._pull: zmq.Socket | None = None
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.endpoint = settings.endpoint

    def start(self) -> None:
        self._xpub = self.context.socket(zmq.XPUB)
        self._xpub.setsockopt(zmq.SNDHWM, self.settings.sndhwm)
        self._xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every hello subscription reaches us
        self._xpub.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(self._xpub)
        self._xpub.bind(self.settings.endpoint)
        self.endpoint = self._xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pull = self.context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 1000)
        self._pull.bind(self._inproc)
        self._thread.start()
        log.info("publishing on %s", self.endpoint)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def channel(self) -> PublishChannel:
        return PublishChannel(self.context, self._inproc, self.metrics)

    def stop(self) -> None:
        """Forward everything already queued, then close the sockets."""
        if not self._thread.is_alive():
            return
        push = self.context.socket(zmq.PUSH)
        push.connect(self._inproc)
        push.send(_STOP)
        push.close(linger=-1)
        self._thread.join()

    def _run(self) -> None:
        assert self._xpub is not None and self._pull is not None
        poller = zmq.Poller()
        poller.register(self._xpub, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        hello = msgpack.packb({"v": 1, **self.service_info})
        sequence: dict[bytes, int] = {}
        try:
            while True:
                ready = dict(poller.poll())
                if self._xpub in ready:
                    subscription = self._xpub.recv()
                    if subscription[:1] == b"\x01" and subscription[1:].startswith(HELLO_PREFIX):
                        self._xpub.send_multipart([subscription[1:], hello])
                if self._pull in ready:
                    frames = self._pull.recv_multipart(copy=False)
                    if frames[0].bytes == _STOP:
                        # The producers are closed by now, but PULL reads its pipes in turn:
                        # messages of theirs may still wait behind the sentinel's pipe.
                        while self._pull.poll(0):
                            self._forward(self._pull.recv_multipart(copy=False), sequence)
                        return
                    self._forward(frames, sequence)
        finally:
            self._pull.close(linger=0)
            self._xpub.close(linger=0)

    def _forward(self, frames: list[zmq.Frame], sequence: dict[bytes, int]) -> None:
        assert self._xpub is not None
        self.metrics.queue_depth.labels("publish").dec()
        topic = frames[0].bytes
        # One counter per topic, stamped here where every producer's messages meet: a viewer
        # that sees a gap in `pub_seq` knows it lost messages (PUB drops silently for a slow
        # viewer; only the viewer can count what it missed).
        header = msgpack.unpackb(frames[1].bytes)
        header["pub_seq"] = sequence[topic] = sequence.get(topic, -1) + 1
        try:
            self._xpub.send_multipart([topic, msgpack.packb(header), *frames[2:]], copy=False)
        except zmq.ZMQError:  # one message lost, never the publisher
            log.exception("could not publish a %s message", topic[:16])
            self.metrics.errors.labels("publish").inc()


class PublishChannel:
    """A producer's handle on the publisher. Owned by one thread; not thread-safe."""

    def __init__(self, context: zmq.Context, inproc: str, metrics: Metrics) -> None:
        self._push = context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 1000)  # blocks the producer if the forwarder lags
        self._push.connect(inproc)
        self.metrics = metrics

    def send_slice(self, topic: str, header: dict[str, Any], data: np.ndarray) -> None:
        """Publish one slice; stamps `t_published` and the `end_to_end` timing."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        now = time.time()
        header = {
            **header,
            "v": 1,
            "shape": list(data.shape),
            "dtype": "float32",
            "t_published": now,
        }
        timing = dict(header.get("timing", {}))
        if "t_last_projection" in header:
            timing["end_to_end"] = now - header["t_last_projection"]
            if topic == "slice":
                self.metrics.stage_seconds.labels("end_to_end").observe(timing["end_to_end"])
        header["timing"] = timing
        self.metrics.queue_depth.labels("publish").inc()
        self._push.send_multipart([topic.encode(), msgpack.packb(header), data], copy=False)
        self.metrics.slices.labels(topic).inc()

    def send_event(self, header: dict[str, Any]) -> None:
        header = {"v": 1, "t_published": time.time(), **header}
        self.metrics.queue_depth.labels("publish").inc()
        self._push.send_multipart([b"event", msgpack.packb(header, default=_plain)])

    def close(self) -> None:
        self._push.close(linger=-1)


def _plain(value: Any) -> Any:
    """msgpack fallback for numpy scalars and arrays in event headers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__} in an event")
