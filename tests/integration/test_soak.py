"""A bounded soak: scans back to back with bad messages mixed in. Every good slice arrives and
resident memory stays flat: after warm-up it grows by less than SOAK_RSS_BOUND over the run."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import numpy as np
import pytest

from service.client import Detector, Subscriber
from service.events import ScanCompleted, ScanEnded

SCANS = int(os.environ.get("TOMOCAST_SOAK_SCANS", "40"))
WARM_UP = 5
# Each scan allocates ~2.5 MiB (raw frames, sinogram, slices): leaking one scan's buffers over 35
# measured scans would pass this bound two times over.
SOAK_RSS_BOUND = 32 << 20
ROWS, COLS, ANGLES = 16, 128, 90


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_scans_back_to_back_with_bad_input_memory_flat(start_service: Any) -> None:
    rng = np.random.default_rng(9)
    flats = (rng.poisson(4000, (2, ROWS, COLS)) + 100).astype(np.uint16)
    projections = (rng.poisson(2000, (ANGLES, ROWS, COLS)) + 100).astype(np.uint16)
    service, endpoints = start_service(ingest={"scan_timeout_s": 600})
    received: dict[str, set[int]] = {}
    rss: list[int] = []
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        for i in range(SCANS):
            scan_id = f"soak-{i:04d}"
            detector.send_raw([b"\xc1 garbage"])
            detector.send_raw(
                [
                    msgpack.packb(
                        {
                            "v": 1,
                            "type": "dark",
                            "scan_id": scan_id,
                            "seq": 0,
                            "index": 0,
                            "count": 1,
                        }
                    ),
                    b"x",
                ]
            )
            detector.send_scan(scan_id, projections, flats=flats, chunk=13)
            completed = None
            while completed is None:
                message = viewer.recv(timeout=60.0)
                assert message is not None, f"{scan_id} stalled"
                if message.topic == "slice":
                    received.setdefault(message.header["scan_id"], set()).add(
                        message.header["index"]
                    )
                elif isinstance(event := message.event(), ScanEnded):
                    completed = event
            assert isinstance(completed, ScanCompleted), completed
            if i >= WARM_UP:
                rss.append(resident_bytes())
    assert received == {f"soak-{i:04d}": set(range(ROWS)) for i in range(SCANS)}
    rejected = service.metrics.registry.get_sample_value
    assert rejected("tomocast_rejected_messages_total", {"reason": "not_msgpack"}) == SCANS
    assert rejected("tomocast_rejected_messages_total", {"reason": "unknown_scan"}) == SCANS
    growth = max(rss) - rss[0]
    assert growth < SOAK_RSS_BOUND, f"resident memory grew by {growth / 2**20:.1f} MiB"
