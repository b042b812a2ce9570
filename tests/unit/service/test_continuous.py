"""Continuous rotation without sockets: the v1.1 header keys (decode, defaults, encode), and the
ring buffer's windows against the projections sent (raw counts with darks/flats, chunks larger
than the ring, gaps, angles past pi)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from service.continuous import ContinuousEnded, WindowReady
from service.errors import ProtocolError
from service.protocol import FrameChunk, Limits, ScanEnd, ScanStart, decode, encode
from service.scan import ScanAssembler

ROWS, COLS = 2, 6
LIMITS = Limits(max_angles=64, max_scan_bytes=ROWS * COLS * 4 * 64)


def start_header(**keys: Any) -> dict[str, Any]:
    return {
        "v": 1, "type": "scan_start", "scan_id": "c", "seq": 0, "rows": ROWS, "cols": COLS,
        "n_angles": 10, "dtype": "uint16", "n_dark": 1, "n_flat": 2, **keys,
    }  # fmt: skip


def decoded(header: dict[str, Any]) -> Any:
    return decode([msgpack.packb(header)], LIMITS)


def test_defaults_are_a_half_turn_and_every_window() -> None:
    plain = decoded(start_header(continuous=True))
    assert (plain.continuous, plain.window, plain.every) == (True, 10, 10)  # n_angles
    theta = [i * math.pi / 8 for i in range(10)]  # 8 projections a half-turn
    stepped = decoded(start_header(continuous=True, theta=theta, every=3))
    assert (stepped.window, stepped.every) == (8, 3)
    v1 = decoded(start_header())
    assert (v1.continuous, v1.window, v1.every) == (False, None, None)
    assert "continuous" not in msgpack.unpackb(encode(v1)[0])
    assert decode(encode(stepped), LIMITS) == stepped


@pytest.mark.parametrize(
    ("keys", "reason", "words"),
    [
        ({"continuous": True, "window": 1}, "bad_value", "window=1 must be >= 2"),
        ({"continuous": True, "every": 0}, "bad_value", "every=0 must be >= 1"),
        ({"continuous": True, "window": 65}, "bad_value", "exceeds max_angles"),
        ({"continuous": True, "every": 65}, "bad_value", "exceeds max_angles"),
        ({"every": 4}, "bad_value", "only meaningful with continuous=true"),
        ({"continuous": 1}, "bad_value", "wrong type"),
        ({"continuous": True, "window": 64, "rows": 3}, "too_large", "ring buffer"),
    ],
)
def test_bad_continuous_keys_are_refused_with_a_reason(
    keys: dict[str, Any], reason: str, words: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        decoded(start_header(**keys))
    assert info.value.reason == reason and words in str(info.value)


def test_chunk_theta_is_checked_and_round_trips() -> None:
    data = np.zeros((2, ROWS, COLS), np.uint16)
    chunk = FrameChunk.from_array("projections", "c", 1, 40, data)
    header = msgpack.unpackb(encode(chunk)[0])
    for theta in ([0.0], [0.0, float("nan")], [0.0, 1e39], ["a", 1.0]):
        with pytest.raises(ProtocolError) as info:
            decode([msgpack.packb({**header, "theta": theta}), b""], LIMITS)
        assert info.value.reason == "bad_value"
    good = decode([msgpack.packb({**header, "theta": [7.0, 7.5]}), data.tobytes()], LIMITS)
    assert isinstance(good, FrameChunk) and good.theta == (7.0, 7.5) and good.index == 40


def test_windows_of_raw_counts_equal_the_projections_sent() -> None:
    """Raw uint16 counts with a dark and flats; 5 projections a window every 3, chunks of 7
    (larger than the ring), a gap; each window's sinogram and angles against numpy."""
    rng = np.random.default_rng(3)
    dark = rng.integers(90, 110, (1, ROWS, COLS)).astype(np.uint16)
    flats = rng.integers(4000, 5000, (2, ROWS, COLS)).astype(np.uint16)
    counts = rng.integers(500, 3000, (30, ROWS, COLS)).astype(np.uint16)
    theta = np.arange(30) * 0.4  # past pi from index 8 on
    flat = flats.astype(np.float64).mean(axis=0)
    expected = -np.log((counts - dark[0].astype(np.float64)) / (flat - dark[0]))
    assembler = ScanAssembler(torch.device("cpu"), LIMITS)
    start = ScanStart(
        "c", 0, ROWS, COLS, 10, "uint16", n_dark=1, n_flat=2, continuous=True, window=5, every=3
    )
    assembler.handle(start)
    assembler.handle(FrameChunk.from_array("dark", "c", 1, 0, dark))
    assembler.handle(FrameChunk.from_array("flat", "c", 2, 0, flats))
    windows = []
    seq = 3
    sent = [(0, 7), (7, 14), (16, 30)]  # 14, 15 never sent
    for first, stop in sent:
        chunk = FrameChunk.from_array("projections", "c", seq, first, counts[first:stop])
        chunk = replace(chunk, theta=tuple(theta[first:stop]))
        windows += [o.scan for o in assembler.handle(chunk) if isinstance(o, WindowReady)]
        seq += 1
    with pytest.raises(ProtocolError) as info:  # behind the next index
        assembler.handle(FrameChunk.from_array("projections", "c", seq, 3, counts[3:4]))
    assert info.value.reason == "index_out_of_range"
    (end,) = assembler.handle(ScanEnd("c", seq + 1, 28))
    assert isinstance(end, ContinuousEnded) and end.event.windows == len(windows) == 9
    assert not assembler.continuous
    for scan in windows:
        assert scan.window is not None
        k = scan.window["window_index"]
        indices = [i for i in range(3 * k, 3 * k + 5) if i not in (14, 15)]
        assert (scan.window["first_projection"], scan.window["last_projection"]) == (
            3 * k,
            3 * k + 4,
        )
        assert scan.start.scan_id == f"c.w{k}" and scan.missing == 5 - len(indices)
        np.testing.assert_allclose(scan.theta, theta[indices])
        np.testing.assert_allclose(
            scan.sinogram.numpy(), expected[indices].transpose(1, 0, 2), rtol=1e-5, atol=1e-5
        )


def test_a_silent_continuous_scan_times_out_and_frees_its_ring() -> None:
    assembler = ScanAssembler(torch.device("cpu"), LIMITS)
    start = ScanStart("c", 0, ROWS, COLS, 10, "float32", normalized=True, continuous=True, window=4)
    assembler.handle(start)
    assert assembler.held_bytes == ROWS * COLS * 4 * 4 and assembler.live_scans == 1
    with pytest.raises(ProtocolError) as info:  # one scan_id, one live scan
        assembler.handle(replace(start, continuous=False))
    assert info.value.reason == "scan_exists"
    (failed,) = assembler.expire(-1.0)
    assert failed.start.scan_id == "c" and "no message" in failed.reason
    assert assembler.held_bytes == 0 and assembler.live_scans == 0
