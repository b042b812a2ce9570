"""Wire protocol v1: encode/decode round trips and every stateless rejection."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from service.errors import ProtocolError
from service.protocol import FrameChunk, Limits, ScanEnd, ScanStart, decode, encode

LIMITS = Limits()


def header(**keys: object) -> bytes:
    return msgpack.packb(
        {
            "v": 1,
            "type": "scan_start",
            "scan_id": "s1",
            "seq": 0,
            "rows": 4,
            "cols": 8,
            "n_angles": 10,
            "dtype": "uint16",
            **keys,
        }
    )


def reason_of(frames: list[bytes], limits: Limits = LIMITS) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    return info.value.reason


def test_scan_start_round_trip_keeps_every_field() -> None:
    start = ScanStart(
        "a.b-c_1",
        0,
        4,
        8,
        3,
        "float32",
        theta=(0.0, 1.0, 2.0),
        center=3.5,
        n_dark=2,
        n_flat=5,
        normalized=True,
        meta={"energy_keV": 25},
    )
    assert decode(encode(start), LIMITS) == start


def test_frames_round_trip_and_payload_view() -> None:
    start = ScanStart("s", 0, 2, 3, 5, "uint16")
    data = np.arange(12, dtype=np.uint16).reshape(2, 2, 3)
    chunk = FrameChunk.from_array("projections", "s", 1, 3, data)
    decoded = decode([bytes(f) for f in encode(chunk)], LIMITS)
    assert isinstance(decoded, FrameChunk)
    assert (decoded.kind, decoded.index, decoded.count) == ("projections", 3, 2)
    np.testing.assert_array_equal(decoded.to_array(start), data)


def test_scan_end_round_trip() -> None:
    assert decode(encode(ScanEnd("s", 7, 360)), LIMITS) == ScanEnd("s", 7, 360)


def test_defaults_theta_evenly_over_half_turn_and_center_middle() -> None:
    start = decode([header()], LIMITS)
    assert isinstance(start, ScanStart)
    np.testing.assert_allclose(start.theta_array(), np.arange(10) * np.pi / 10)
    assert start.rotation_center() == 4.0


def test_a_centre_in_tomopys_convention_is_the_same_axis() -> None:
    from workers.conventions import from_tomopy_center

    # TomoPy's find_center_vo puts a centred axis at pixel index (cols - 1) / 2 = 3.5 here
    tomopy = decode([header(center=3.5, center_convention="tomopy")], LIMITS)
    native = decode([header(center=4.0)], LIMITS)
    explicit = decode([header(center=4.0, center_convention="tomocast")], LIMITS)
    assert isinstance(tomopy, ScanStart) and isinstance(native, ScanStart)
    assert tomopy.rotation_center() == native.rotation_center() == from_tomopy_center(3.5)
    assert explicit == native
    # no centre: the convention changes nothing (the centre is estimated or the middle)
    assert decode([header(center_convention="tomopy")], LIMITS) == decode([header()], LIMITS)
    assert reason_of([header(center=3.5, center_convention="astra")]) == "bad_value"
    assert reason_of([header(center=7.8, center_convention="tomopy")]) == "bad_value"  # 8.3


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"\xc1garbage"], "not_msgpack"),
        ([msgpack.packb([1, 2, 3])], "not_msgpack"),
        ([msgpack.packb({1: "int key"})], "not_msgpack"),
        ([header(v=2)], "bad_version"),
        ([header(v=True)], "bad_version"),
        ([header(type="bogus")], "unknown_type"),
        ([header(rows="4")], "bad_value"),
        ([header(rows=True)], "bad_value"),
        ([header(rows=0)], "bad_value"),
        ([header(dtype="float64")], "bad_value"),
        ([header(scan_id="has space")], "bad_value"),
        ([header(scan_id="x" * 129)], "bad_value"),
        ([header(scan_id="..")], "bad_value"),
        ([header(seq=-1)], "bad_value"),
        ([header(theta=[0.0, 1.0])], "bad_value"),
        ([header(theta=[float("nan")] * 10)], "bad_value"),
        ([header(center=9.5)], "bad_value"),
        ([header(normalized=1)], "bad_value"),
        ([header(rows=5000)], "too_large"),
        ([header(n_flat=5000)], "too_large"),
        ([header(), b"payload"], "bad_framing"),
        ([], "bad_framing"),
    ],
)
def test_bad_headers_are_rejected_with_their_reason(frames: list[bytes], reason: str) -> None:
    assert reason_of(frames) == reason


def test_missing_keys_are_named() -> None:
    raw = msgpack.packb(
        {
            "v": 1,
            "type": "scan_start",
            "scan_id": "s",
            "seq": 0,
            "rows": 1,
            "cols": 1,
            "dtype": "uint8",
        }
    )
    with pytest.raises(ProtocolError, match="n_angles") as info:
        decode([raw], LIMITS)
    assert info.value.reason == "missing_key"
    assert info.value.scan_id == "s" and info.value.seq == 0


def test_declared_scan_size_is_checked_against_the_limit_before_allocation() -> None:
    limits = Limits(max_scan_bytes=4 * 8 * 10 * 4 - 1)
    assert reason_of([header()], limits) == "too_large"
    assert isinstance(decode([header()], Limits(max_scan_bytes=4 * 8 * 10 * 4)), ScanStart)


def test_frames_need_a_payload_and_sane_index() -> None:
    frames_header = msgpack.packb(
        {"v": 1, "type": "projections", "scan_id": "s", "seq": 1, "index": 0, "count": 1}
    )
    assert reason_of([frames_header]) == "bad_framing"
    big = msgpack.packb(
        {
            "v": 1,
            "type": "projections",
            "scan_id": "s",
            "seq": 1,
            "index": 0,
            "count": LIMITS.max_angles + 1,
        }
    )
    assert reason_of([big, b""]) == "too_large"
    # v1.1: continuous scans number projections past max_angles (the scan checks the index)
    far = msgpack.packb(
        {"v": 1, "type": "projections", "scan_id": "s", "seq": 1, "index": 1 << 49, "count": 1}
    )
    assert reason_of([far, b""]) == "too_large"


def test_payload_size_and_non_finite_are_checked_against_the_scan() -> None:
    start = ScanStart("s", 0, 2, 2, 4, "float32")
    short = FrameChunk("projections", "s", 1, 0, 1, b"\x00" * 12)
    with pytest.raises(ProtocolError) as info:
        short.to_array(start)
    assert info.value.reason == "payload_size"
    bad = np.ones((1, 2, 2), np.float32)
    bad[0, 1, 1] = np.nan
    with pytest.raises(ProtocolError) as info:
        FrameChunk.from_array("projections", "s", 1, 0, bad).to_array(start)
    assert info.value.reason == "non_finite"


def test_meta_keys_must_be_strings_at_every_depth() -> None:
    assert reason_of([header(meta={"ok": {b"bytes key": 1}})]) == "bad_value"
    assert reason_of([header(meta={"list": [{"a": 1}, {b"k": "bytes key"}]})]) == "bad_value"
    assert isinstance(decode([header(meta={"a": [{"b": 1}], "c": None})], LIMITS), ScanStart)


def test_oversized_header_is_refused_before_unpacking() -> None:
    limits = Limits(max_meta_bytes=1024, max_angles=16)
    bloated = msgpack.packb(
        {"v": 1, "type": "scan_end", "scan_id": "s", "seq": 1, "count": 0, "junk": [[]] * 16}
        | {f"k{i}": [[]] * 16 for i in range(400)}
    )
    assert len(bloated) > limits.max_header_bytes
    assert reason_of([bloated], limits) == "too_large"


def test_a_meta_over_its_limit_is_too_large_not_a_broken_header() -> None:
    limits = Limits(max_meta_bytes=1024)
    oversized = header(meta={"notes": "x" * 2000})  # one string: within the frame's cap
    assert len(oversized) <= limits.max_header_bytes
    assert reason_of([oversized], limits) == "too_large"
    assert reason_of([header(meta={"blob": b"\x00" * 2000})], limits) == "too_large"
