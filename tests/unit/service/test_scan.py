"""Scan assembly: references, normalisation, ordering, and the stateful rejections."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from service.errors import ProtocolError
from service.events import Event, ScanFailed, ScanStarted
from service.protocol import FrameChunk, Limits, ScanEnd, ScanStart
from service.scan import (
    Clipped,
    Completed,
    Failed,
    Outcome,
    ScanAssembler,
    Started,
)
from service.sinogram import CompletedScan

ROWS, COLS, ANGLES = 3, 5, 6


class Recorder:
    """An assembler whose outcomes are filed as the ingest dispatches them."""

    def __init__(self, max_live_scans: int = 2, **options: Any) -> None:
        self.assembler = ScanAssembler(
            torch.device("cpu"), Limits(max_live_scans=max_live_scans, **options)
        )
        self.completed: list[CompletedScan] = []
        self.events: list[Event] = []
        self.starts: list[ScanStart] = []
        self.clipped = 0

    def handle(self, message: Any) -> None:
        self.file(self.assembler.handle(message))

    def file(self, outcomes: list[Outcome] | list[Failed]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, Started):
                self.events.append(outcome.event)
                self.starts.append(outcome.start)
            elif isinstance(outcome, Completed):
                self.completed.append(outcome.scan)
            elif isinstance(outcome, Failed):
                self.events.append(outcome.event)
            else:
                self.clipped += outcome.pixels


def frames(kind: str, seq: int, index: int, data: np.ndarray, scan_id: str = "s") -> FrameChunk:
    return FrameChunk.from_array(kind, scan_id, seq, index, data)  # type: ignore[arg-type]


def reason(assembler: ScanAssembler, message: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        assembler.handle(message)
    return info.value.reason


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "darks": rng.integers(90, 110, (2, ROWS, COLS)).astype(np.uint16),
        "flats": rng.integers(4000, 4200, (3, ROWS, COLS)).astype(np.uint16),
        "projections": rng.integers(500, 3000, (ANGLES, ROWS, COLS)).astype(np.uint16),
    }


def test_sinogram_is_flat_field_corrected_and_transposed(data: dict[str, np.ndarray]) -> None:
    rec = Recorder()
    assembler = rec.assembler
    rec.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_dark=2, n_flat=3))
    rec.handle(frames("projections", 1, 3, data["projections"][3:]))  # before references
    rec.handle(frames("dark", 2, 0, data["darks"]))
    rec.handle(frames("flat", 3, 1, data["flats"][1:]))
    rec.handle(frames("flat", 4, 0, data["flats"][:1]))
    rec.handle(frames("projections", 5, 0, data["projections"][:3]))
    rec.handle(ScanEnd("s", 6, ANGLES))
    (scan,) = rec.completed
    dark = data["darks"].mean(axis=0)
    flat = data["flats"].mean(axis=0)
    expected = -np.log((data["projections"] - dark) / (flat - dark))
    np.testing.assert_allclose(scan.sinogram.numpy(), expected.transpose(1, 0, 2), rtol=1e-5)
    assert scan.missing == 0 and assembler.live_scans == 0
    assert isinstance(rec.events[0], ScanStarted)


def test_stateful_rejections_leave_the_scan_intact(data: dict[str, np.ndarray]) -> None:
    rec = Recorder(max_live_scans=1)
    assembler = rec.assembler
    start = ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_flat=3)
    rec.handle(start)
    assert reason(assembler, start) == "scan_exists"
    assert (
        reason(assembler, ScanStart("t", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1))
        == "too_many_scans"
    )
    assert rec.starts == [start]  # only an accepted start has its geometry prepared
    assert (
        reason(assembler, frames("projections", 1, 0, data["projections"][:1], "x"))
        == "unknown_scan"
    )
    assert (
        reason(assembler, frames("projections", 1, 5, data["projections"][:2]))
        == "index_out_of_range"
    )
    assert (
        reason(assembler, frames("flat", 1, 0, data["flats"][:4].repeat(2, 0)[:4]))
        == "index_out_of_range"
    )
    rec.handle(frames("flat", 1, 0, data["flats"]))
    assert (
        reason(assembler, frames("projections", 1, 0, data["projections"][:1])) == "duplicate"
    )  # seq 1 again
    rec.handle(frames("projections", 2, 0, data["projections"][:2]))
    assert (
        reason(assembler, frames("projections", 3, 1, data["projections"][:2])) == "duplicate"
    )  # overlaps projection 1
    rec.handle(frames("projections", 4, 2, data["projections"][2:]))
    rec.handle(ScanEnd("s", 5, ANGLES))
    assert len(rec.completed) == 1 and rec.completed[0].rejected == 4


def test_raw_scan_without_flats_is_refused() -> None:
    rec = Recorder()
    assert reason(rec.assembler, ScanStart("s", 0, 1, 1, 2, "uint8")) == "no_flats"


def test_normalized_scan_stores_line_integrals_as_sent() -> None:
    rec = Recorder()
    line_integrals = np.random.default_rng(2).random((ANGLES, ROWS, COLS), dtype=np.float32)
    rec.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "float32", normalized=True))
    rec.handle(frames("projections", 1, 0, line_integrals))
    rec.handle(ScanEnd("s", 2, ANGLES))
    np.testing.assert_array_equal(
        rec.completed[0].sinogram.numpy(), line_integrals.transpose(1, 0, 2)
    )


def test_idle_scan_times_out_and_is_released(data: dict[str, np.ndarray]) -> None:
    rec = Recorder()
    assembler = rec.assembler
    rec.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_flat=3))
    rec.handle(frames("flat", 1, 0, data["flats"]))
    rec.handle(frames("projections", 2, 0, data["projections"][:1]))
    assert assembler.expire(timeout_s=3600) == []
    failed = assembler.expire(timeout_s=0)
    assert [f.start.scan_id for f in failed] == ["s"]
    rec.file(failed)
    assert assembler.live_scans == 0 and not rec.completed
    failed = rec.events[-1]
    assert isinstance(failed, ScanFailed) and "no message" in failed.reason


def test_time_blocked_on_our_own_backpressure_does_not_time_scans_out(
    data: dict[str, np.ndarray],
) -> None:
    rec = Recorder()
    assembler = rec.assembler
    rec.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_flat=3))
    scan = assembler.scans["s"]
    scan.t_last_message -= 100.0  # silent for 100 s ...
    assembler.extend_deadlines(100.0)  # ... all of it spent blocked handing over another scan
    assert assembler.expire(timeout_s=50) == []
    scan.t_last_message -= 100.0
    assert [f.start.scan_id for f in assembler.expire(timeout_s=50)] == ["s"]


def test_live_scans_share_a_memory_budget() -> None:
    need = ROWS * ANGLES * COLS * 4
    rec = Recorder(max_live_scans=8, max_live_bytes=2 * need)
    assembler = rec.assembler
    rec.handle(ScanStart("a", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1))
    rec.handle(ScanStart("b", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1))
    assert (
        reason(assembler, ScanStart("c", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1))
        == "too_many_scans"
    )


def test_references_for_a_normalized_scan_are_a_bad_value() -> None:
    rec = Recorder()
    assembler = rec.assembler
    rec.handle(ScanStart("s", 0, ROWS, COLS, ANGLES, "float32", normalized=True))
    darks = np.zeros((1, ROWS, COLS), np.float32)
    assert reason(assembler, frames("dark", 1, 0, darks)) == "bad_value"


# ---- float16 storage (ingest.sinogram_dtype) ------------------------------------------------


def _assemble(storage: torch.dtype, start: ScanStart, messages: list[Any]) -> CompletedScan:
    rec = Recorder()
    rec.assembler = ScanAssembler(torch.device("cpu"), Limits(max_live_scans=2), storage)
    rec.handle(start)
    for message in messages:
        rec.handle(message)
    (scan,) = rec.completed
    return scan


def test_float16_storage_holds_raw_counts_up_to_uint16_max(data: dict[str, np.ndarray]) -> None:
    # Projections before the flats wait as raw counts: 65,535 is past float16's 65,504, so they
    # are stored halved (exactly) and the flat-field ratio comes out as in float32.
    projections = data["projections"].copy()
    projections[0, 0, :] = 65535
    flats = np.full((3, ROWS, COLS), 65000, np.uint16)
    start = ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_dark=2, n_flat=3)
    messages = [
        frames("projections", 1, 0, projections),
        frames("dark", 2, 0, data["darks"]),
        frames("flat", 3, 0, flats),
        ScanEnd("s", 4, ANGLES),
    ]
    single, double = (_assemble(dtype, start, messages) for dtype in (torch.float16, torch.float32))
    assert single.sinogram.dtype == torch.float16 and double.sinogram.dtype == torch.float32
    assert single.clipped == double.clipped
    got = single.sinogram.float().numpy()
    assert np.isfinite(got).all()
    # float16 keeps 11 significant bits: 2^-11 relative, plus the rounding of the counts
    np.testing.assert_allclose(got, double.sinogram.numpy(), rtol=2**-10, atol=2e-3)


def test_float16_storage_scales_uint32_counts_exactly() -> None:
    # Counts far beyond float16's range wait scaled by 2^-17 until the flats come: the ratio
    # after flat-field correction must be float32's, not clamped at 65,504.
    counts = np.array([1e6, 3e9, 4e8, 2e9, 1e5, 3.9e9], dtype=np.uint32)
    projections = np.broadcast_to(counts[:, None, None], (ANGLES, ROWS, COLS)).copy()
    flats = np.full((1, ROWS, COLS), 4_000_000_000, np.uint32)
    start = ScanStart("s", 0, ROWS, COLS, ANGLES, "uint32", n_flat=1)
    messages = [
        frames("projections", 1, 0, projections),
        frames("flat", 2, 0, flats),
        ScanEnd("s", 3, ANGLES),
    ]
    single = _assemble(torch.float16, start, messages)
    assert single.sinogram.dtype == torch.float16 and single.clipped == 0
    expected = -np.log(counts.astype(np.float64) / 4e9)
    np.testing.assert_allclose(
        single.sinogram.float().numpy()[0, :, 0], expected, rtol=2**-10, atol=2**-11
    )


def test_float16_storage_of_line_integrals_and_its_memory() -> None:
    rng = np.random.default_rng(3)
    integrals = rng.uniform(0, 6, (ANGLES, ROWS, COLS)).astype(np.float32)
    integrals[0, 0, 0] = 1e9  # nonsense from the DAQ stays finite
    start = ScanStart("s", 0, ROWS, COLS, ANGLES, "float32", normalized=True)
    messages = [frames("projections", 1, 0, integrals), ScanEnd("s", 2, ANGLES)]
    single = _assemble(torch.float16, start, messages)
    assert single.sinogram.dtype == torch.float16
    assert bool(torch.isfinite(single.sinogram).all())
    np.testing.assert_allclose(
        single.sinogram.float().numpy()[:, 1:], integrals.transpose(1, 0, 2)[:, 1:], rtol=2**-11
    )


def test_float16_budget_holds_twice_the_scans() -> None:
    one_fp32 = ROWS * ANGLES * COLS * 4
    for storage, live in ((torch.float32, 1), (torch.float16, 2)):
        assembler = ScanAssembler(
            torch.device("cpu"), Limits(max_live_scans=4, max_live_bytes=one_fp32), storage
        )
        starts = [ScanStart(f"s{i}", 0, ROWS, COLS, ANGLES, "uint16", n_flat=1) for i in range(3)]
        for start in starts[:live]:
            assembler.handle(start)
        assert reason(assembler, starts[live]) == "too_many_scans"
        assert assembler.live_scans == live


def test_raw_float32_scans_keep_float32_storage() -> None:
    # Raw float32 counts have no known range to scale below float16's maximum.
    start = ScanStart("s", 0, ROWS, COLS, ANGLES, "float32", n_flat=1)
    counts = np.full((ANGLES, ROWS, COLS), 1e6, np.float32)
    scan = _assemble(
        torch.float16,
        start,
        [
            frames("projections", 1, 0, counts),
            frames("flat", 2, 0, counts[:1] * 2),
            ScanEnd("s", 3, ANGLES),
        ],
    )
    assert scan.sinogram.dtype == torch.float32
    np.testing.assert_allclose(scan.sinogram.numpy(), np.log(2), rtol=1e-6)


def test_outcomes_say_what_each_message_led_to(data: dict[str, np.ndarray]) -> None:
    assembler = ScanAssembler(torch.device("cpu"))
    start = ScanStart("s", 0, ROWS, COLS, ANGLES, "uint16", n_flat=3)
    assert assembler.handle(start) == [Started(start)]
    assert Started(start).event == ScanStarted("s", ROWS, COLS, ANGLES, {})
    dark_pixels = np.zeros((1, ROWS, COLS), np.uint16)  # a transmission of 0: clipped
    clipped = assembler.handle(frames("projections", 1, 0, dark_pixels))
    assert clipped == []  # raw counts wait for the flats
    assert assembler.handle(frames("flat", 2, 0, data["flats"])) == [Clipped(ROWS * COLS)]
    (failed,) = assembler.handle(ScanEnd("s", 3, 1))  # one projection: too few to reconstruct
    assert isinstance(failed, Failed) and failed.start is start
    assert failed.event == ScanFailed("s", "only 1 projections arrived")
    assert assembler.live_scans == 0
    assembler.handle(ScanStart("t", 0, ROWS, COLS, ANGLES, "uint16", n_flat=3))
    assert [f.event for f in assembler.drop_all("stopping")] == [ScanFailed("t", "stopping")]


def test_one_client_gets_at_most_its_share_of_live_scans(data: dict[str, np.ndarray]) -> None:
    assembler = ScanAssembler(
        torch.device("cpu"), Limits(max_live_scans=4), idle_evict_s=30.0, per_client=2
    )

    def start(scan_id: str, client: str | None) -> list[Outcome]:
        message = ScanStart(scan_id, 0, ROWS, COLS, ANGLES, "uint16", n_flat=3)
        return assembler.handle(message, client)

    start("a1", "key-a")
    start("a2", "key-a")
    with pytest.raises(ProtocolError) as refusal:
        start("a3", "key-a")  # its own scans are not silent long enough to make way
    assert refusal.value.reason == "too_many_scans"
    assert "max_live_scans_per_client=2" in str(refusal.value)
    start("b1", "key-b")  # another key still gets in
    start("anon", None)  # without CURVE there is no identity to cap
    # the same key, once its oldest scan has been silent for idle_evict_s: that one makes way
    assembler.scans["a1"].t_last_message -= 31.0
    outcomes = start("a3", "key-a")
    failed = [o for o in outcomes if isinstance(o, Failed)]
    assert [f.start.scan_id for f in failed] == ["a1"] and failed[0].evicted
    assert sorted(assembler.scans) == ["a2", "a3", "anon", "b1"]
    # scans belong to the key that started them
    with pytest.raises(ProtocolError) as foreign:
        assembler.handle(frames("flat", 1, 0, data["flats"], scan_id="b1"), "key-a")
    assert foreign.value.reason == "unknown_scan"
    assembler.handle(frames("flat", 1, 0, data["flats"], scan_id="b1"), "key-b")
    assert len(assembler.scans["b1"].flats.seen) == 3
