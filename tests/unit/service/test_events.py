"""The published messages as types: each encodes to the map viewers have always received (the
same keys in the same order, so the same msgpack bytes) and decodes back to itself."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from service.events import (
    ScanCompleted,
    ScanFailed,
    ScanLatency,
    ScanStarted,
    SliceHeader,
    UnknownEvent,
    decode_event,
)

STARTED = ScanStarted("s", 4, 8, 16, {"energy_kev": 25.0})
COMPLETED = ScanCompleted("s", 4, 1, 2, 3, "tomogan", ScanLatency(0.5, 1.5, None))
FAILED = ScanFailed("s", "no flat field frames arrived")
# The maps as the service built them by hand before these types existed.
WIRE: list[tuple[Any, dict[str, Any]]] = [
    (
        STARTED,
        {
            "event": "scan_started",
            "scan_id": "s",
            "rows": 4,
            "cols": 8,
            "n_angles": 16,
            "meta": {"energy_kev": 25.0},
        },
    ),
    (
        COMPLETED,
        {
            "event": "scan_completed",
            "scan_id": "s",
            "slices": 4,
            "missing_projections": 1,
            "rejected_messages": 2,
            "clipped_pixels": 3,
            "model": "tomogan",
            "latency": {"tail_s": 0.5, "fbp_ms_per_slice": 1.5, "denoise_ms_per_slice": None},
            "non_finite_pixels": 0,
        },
    ),
    (FAILED, {"event": "scan_failed", "scan_id": "s", "reason": "no flat field frames arrived"}),
]


@pytest.mark.parametrize(("event", "wire"), WIRE)
def test_events_encode_to_the_same_bytes_and_decode_back(event: Any, wire: dict) -> None:
    assert msgpack.packb(event.encode()) == msgpack.packb(wire)
    published = {"v": 1, "t_published": 12.5, **wire, "pub_seq": 7}  # what a viewer receives
    assert decode_event(msgpack.unpackb(msgpack.packb(published))) == event


def test_unknown_and_malformed_events_raise() -> None:
    with pytest.raises(UnknownEvent, match="scan_paused"):
        decode_event({"event": "scan_paused", "scan_id": "s"})
    with pytest.raises(UnknownEvent):
        decode_event({"scan_id": "s"})
    with pytest.raises(ValueError, match="reason"):
        decode_event({"event": "scan_failed", "scan_id": "s"})
    with pytest.raises(ValueError, match="rows"):
        decode_event({"event": "scan_started", "scan_id": "s", "rows": "4", "cols": 1})


def test_slice_header_keeps_the_published_key_order() -> None:
    scan_part = SliceHeader("s", 4, "tomogan", 100.0, 2, {"wait": 0.1, "fbp": 0.01})
    assert list(scan_part.encode()) == [
        "scan_id",
        "rows",
        "model",
        "t_last_projection",
        "index",
        "timing",
    ]
    received = {
        **scan_part.encode(),
        "v": 1,
        "shape": [8, 8],
        "dtype": "float32",
        "t_published": 100.5,
        "pub_seq": 3,
    }
    received["timing"] = {"wait": 0.1, "fbp": 0.01, "end_to_end": 0.5}
    header = SliceHeader.decode(received)
    assert header.encode() == received and list(header.encode()) == list(received)
    assert header.shape == (8, 8) and header.end_to_end == 0.5 and header.pub_seq == 3
    with pytest.raises(ValueError, match="index"):
        SliceHeader.decode({**received, "index": None})


def test_a_denoised_slice_header_carries_the_scans_intensity_factor() -> None:
    header = SliceHeader("s", 4, "tomogan", 100.0, 2, {"fbp": 0.01}, scale=0.31)
    assert header.encode()["scale"] == 0.31
    assert SliceHeader.decode(header.encode()).scale == 0.31
    plain = SliceHeader("s", 4, "none", 100.0, 2, {"fbp": 0.01})
    assert "scale" not in plain.encode() and SliceHeader.decode(plain.encode()).scale is None
