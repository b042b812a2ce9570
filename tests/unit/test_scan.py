"""Scan assembly: references, normalisation, ordering, and the stateful rejections."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from service.errors import ProtocolError
from service.protocol import FrameChunk, ScanEnd, ScanStart
from service.scan import CompletedScan, ScanAssembler

ROWS, COLS, ANGLES = 3, 5, 6


class Recorder:
    def __init__(self) -> None:
        self.completed: list[CompletedScan] = []
        self.events: list[dict[str, Any]] = []
        self.starts: list[ScanStart] = []

    def assembler(self, max_live_scans: int = 2) -> ScanAssembler:
        return ScanAssembler(torch.device("cpu"), max_live_scans, self.completed.append,
                             self.events.append, on_start=self.starts.append)


def frames(kind: str, seq: int, index: int, data: np.ndarray, scan_id: str = "s") -> FrameChunk:
    return FrameChunk.from_array(kind, scan_id, seq, index, data)  # type: ignore[arg-type]


def reason(assembler: ScanAssembler, message: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        assembler.handle(message)
    return info.value.reason


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"darks": rng.integers(90, 110, (2, ROWS, COLS)).astype(np.uint16),
            "flats": rng.integers(4000, 4200, (3, ROWS, COLS)).astype(np.uint16),
            "projections": rng.integers(500, 3000, (ANGLES, ROWS, COLS)).astype(np.uint16)}


def test_sinogram_is_flat_field_corrected_and_transposed(data: dict[str, np.ndarray]) -> None:
    rec = Recorder()
    assembler = rec.assembler()
    assembler.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_dark=2, n_flat=3))
    assembler.handle(frames("projections", 1, 3, data["projections"][3:]))  # before references
    assembler.handle(frames("dark", 2, 0, data["darks"]))
    assembler.handle(frames("flat", 3, 1, data["flats"][1:]))
    assembler.handle(frames("flat", 4, 0, data["flats"][:1]))
    assembler.handle(frames("projections", 5, 0, data["projections"][:3]))
    assembler.handle(ScanEnd("s", 6, ANGLES))
    (scan,) = rec.completed
    dark = data["darks"].mean(axis=0)
    flat = data["flats"].mean(axis=0)
    expected = -np.log((data["projections"] - dark) / (flat - dark))
    np.testing.assert_allclose(scan.sinogram.numpy(), expected.transpose(1, 0, 2), rtol=1e-5)
    assert scan.missing == 0 and assembler.live_scans == 0
    assert rec.events[0]["event"] == "scan_started"


def test_stateful_rejections_leave_the_scan_intact(data: dict[str, np.ndarray]) -> None:
    rec = Recorder()
    assembler = rec.assembler(max_live_scans=1)
    start = ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_flat=3)
    assembler.handle(start)
    assert reason(assembler, start) == "scan_exists"
    assert reason(assembler, ScanStart("t", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1)) \
        == "too_many_scans"
    assert rec.starts == [start]  # only an accepted start has its geometry prepared
    assert reason(assembler, frames("projections", 1, 0, data["projections"][:1], "x")) \
        == "unknown_scan"
    assert reason(assembler, frames("projections", 1, 5, data["projections"][:2])) \
        == "index_out_of_range"
    assert reason(assembler, frames("flat", 1, 0, data["flats"][:4].repeat(2, 0)[:4])) \
        == "index_out_of_range"
    assembler.handle(frames("flat", 1, 0, data["flats"]))
    assert reason(assembler, frames("projections", 1, 0, data["projections"][:1])) \
        == "duplicate"  # seq 1 again
    assembler.handle(frames("projections", 2, 0, data["projections"][:2]))
    assert reason(assembler, frames("projections", 3, 1, data["projections"][:2])) \
        == "duplicate"  # overlaps projection 1
    assembler.handle(frames("projections", 4, 2, data["projections"][2:]))
    assembler.handle(ScanEnd("s", 5, ANGLES))
    assert len(rec.completed) == 1 and rec.completed[0].rejected == 4


def test_raw_scan_without_flats_is_refused() -> None:
    rec = Recorder()
    assert reason(rec.assembler(), ScanStart("s", 0, 1, 1, 2, "uint8")) == "no_flats"


def test_normalized_scan_stores_line_integrals_as_sent() -> None:
    rec = Recorder()
    assembler = rec.assembler()
    line_integrals = np.random.default_rng(2).random((ANGLES, ROWS, COLS), dtype=np.float32)
    assembler.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "float32", normalized=True))
    assembler.handle(frames("projections", 1, 0, line_integrals))
    assembler.handle(ScanEnd("s", 2, ANGLES))
    np.testing.assert_array_equal(rec.completed[0].sinogram.numpy(),
                                  line_integrals.transpose(1, 0, 2))


def test_idle_scan_times_out_and_is_released(data: dict[str, np.ndarray]) -> None:
    rec = Recorder()
    assembler = rec.assembler()
    assembler.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_flat=3))
    assembler.handle(frames("flat", 1, 0, data["flats"]))
    assembler.handle(frames("projections", 2, 0, data["projections"][:1]))
    assert assembler.expire(timeout_s=3600) == []
    assert assembler.expire(timeout_s=0) == ["s"]
    assert assembler.live_scans == 0 and not rec.completed
    assert rec.events[-1]["event"] == "scan_failed" and "no message" in rec.events[-1]["reason"]


def test_time_blocked_on_our_own_backpressure_does_not_time_scans_out(
        data: dict[str, np.ndarray]) -> None:
    rec = Recorder()
    assembler = rec.assembler()
    assembler.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_flat=3))
    scan = assembler.scans["s"]
    scan.t_last_message -= 100.0  # silent for 100 s ...
    assembler.extend_deadlines(100.0)  # ... all of it spent blocked handing over another scan
    assert assembler.expire(timeout_s=50) == []
    scan.t_last_message -= 100.0
    assert assembler.expire(timeout_s=50) == ["s"]


def test_live_scans_share_a_memory_budget() -> None:
    rec = Recorder()
    need = ROWS * ANGLES * COLS * 4
    assembler = ScanAssembler(torch.device("cpu"), 8, rec.completed.append, rec.events.append,
                              max_live_bytes=2 * need)
    assembler.handle(ScanStart("a", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1))
    assembler.handle(ScanStart("b", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1))
    assert reason(assembler, ScanStart("c", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1)) \
        == "too_many_scans"


def test_references_for_a_normalized_scan_are_a_bad_value() -> None:
    rec = Recorder()
    assembler = rec.assembler()
    assembler.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "float32", normalized=True))
    darks = np.zeros((1, ROWS, COLS), np.float32)
    assert reason(assembler, frames("dark", 1, 0, darks)) == "bad_value"
