"""Property-based: whatever bytes arrive, the decoder answers a message or a ProtocolError."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import ProtocolError
from service.protocol import (
    DTYPES,
    MESSAGE_TYPES,
    REJECT_REASONS,
    FrameChunk,
    Limits,
    ScanStart,
    decode,
)

LIMITS = Limits(max_rows=64, max_cols=64, max_angles=256, max_scan_bytes=1 << 20)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
plausible_headers = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), values),
        "type": st.one_of(st.sampled_from(MESSAGE_TYPES), values),
        "scan_id": st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True), values),
        "seq": st.one_of(st.integers(-2, 10), values),
    },
    optional={
        key: st.one_of(st.integers(-2, 300), values)
        for key in ("rows", "cols", "n_angles", "index", "count", "n_dark", "n_flat")
    }
    | {
        "dtype": st.one_of(st.sampled_from(list(DTYPES)), values),
        "theta": st.one_of(st.lists(st.floats(), max_size=300), values),
        "center": values,
        "normalized": values,
        "meta": values,
    },
)


def check(frames: list[bytes]) -> None:
    try:
        message = decode(frames, LIMITS)
    except ProtocolError as exc:
        assert exc.reason in REJECT_REASONS
        assert str(exc)
        return
    assert message.type in MESSAGE_TYPES
    if isinstance(message, ScanStart):
        assert message.rows * message.cols * message.n_angles * 4 <= LIMITS.max_scan_bytes
    if isinstance(message, FrameChunk):
        assert message.count >= 1 and message.index >= 0


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_any_bytes_give_a_message_or_a_protocol_error(frames: list[bytes]) -> None:
    check(frames)


@settings(max_examples=600, deadline=None)
@given(plausible_headers, st.lists(st.binary(max_size=32), max_size=2))
def test_near_miss_headers_give_a_message_or_a_protocol_error(
    header: dict,
    rest: list[bytes],
) -> None:
    check([msgpack.packb(header), *rest])
