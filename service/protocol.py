"""Wire protocol v1: the one place ingest messages are encoded, decoded and validated.

Every message is multipart: frame 0 a msgpack map (the header), frame 1 the payload where the
type has one (a raw C-order little-endian array of the scan's dtype). docs/protocol.md is the
reference for DAQ engineers; this module is its executable form.

`decode` checks everything that can be checked from one message alone. What needs the scan's
state (payload size against the scan's shape, index ranges, duplicates, seq gaps) is checked by
`service.scan` with `FrameChunk.to_array` and the scan's own bookkeeping.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import numpy as np

from service.errors import ProtocolError
from workers.conventions import CENTER_CONVENTIONS, from_tomopy_center

PROTOCOL_VERSION = 1
DTYPES: dict[str, np.dtype[Any]] = {
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "float32": np.dtype("<f4"),
}
FRAME_KINDS = ("dark", "flat", "projections")
MESSAGE_TYPES = ("scan_start", *FRAME_KINDS, "scan_end")
# 1-128 of [A-Za-z0-9._-], and not only dots: scan ids name files and folders downstream.
SCAN_ID = re.compile(r"(?!\.+\Z)[A-Za-z0-9._-]{1,128}\Z")

# Every label `tomocast_rejected_messages_total{reason}` can take; metrics pre-create them all.
REJECT_REASONS = (
    "bad_framing",  # wrong number of frames for the type
    "not_msgpack",  # frame 0 is not a msgpack map
    "bad_version",  # `v` is not 1
    "unknown_type",
    "missing_key",
    "bad_value",  # a key has the wrong type or is out of range
    "too_large",  # declared sizes above the configured limits
    "payload_size",  # payload bytes != count * rows * cols * itemsize
    "non_finite",  # NaN or inf in a float32 payload
    "unknown_scan",  # frames or scan_end for a scan that is not live
    "scan_exists",  # a second scan_start for a live scan_id
    "index_out_of_range",
    "duplicate",  # a seq or a frame index already received
    "no_flats",  # raw (not normalized) scan without flat fields
    "too_many_scans",  # more live scans than ingest.max_live_scans
)


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before anything is allocated for a message or a scan: by `decode`
    (one message), and by the scan assembler (`max_live_*`: the scans assembled together).

    The one source of their defaults: the `ingest.*` settings of the same names take theirs
    from here (`service.config.IngestSettings`)."""

    max_rows: int = 4096
    max_cols: int = 4096
    max_angles: int = 16384
    max_reference_frames: int = 1024  # darks or flats per scan
    max_scan_bytes: int = 8 << 30  # float32 sinogram buffer: rows * n_angles * cols * 4
    max_meta_bytes: int = 1 << 20
    max_live_scans: int = 4  # scans being assembled at once
    max_live_bytes: int = 8 << 30  # their sinograms together, in their storage dtype

    @property
    def max_header_bytes(self) -> int:
        """Frame 0 is refused above this before it is unpacked: meta, a theta list of float64s
        (9 bytes each in msgpack) and the fixed keys."""
        return self.max_meta_bytes + 9 * self.max_angles + 4096


@dataclass(frozen=True)
class ScanStart:
    scan_id: str
    seq: int
    rows: int
    cols: int
    n_angles: int
    dtype: str
    theta: tuple[float, ...] | None = None
    center: float | None = None
    n_dark: int = 0
    n_flat: int = 0
    normalized: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    # v1.1 continuous rotation (service.continuous): open-ended, a reconstruction of the
    # latest `window` projections every `every` projections; None: the defaults (decode fills
    # them in for a continuous scan)
    continuous: bool = False
    window: int | None = None
    every: int | None = None

    @property
    def type(self) -> str:
        return "scan_start"

    def theta_array(self) -> np.ndarray:
        """Projection angles in radians: as sent, or evenly spaced over [0, pi)."""
        if self.theta is not None:
            return np.asarray(self.theta, dtype=np.float64)
        return np.arange(self.n_angles, dtype=np.float64) * (math.pi / self.n_angles)

    def rotation_center(self) -> float:
        """Rotation axis in TomoPy's convention (cols/2 is the detector's middle)."""
        return self.cols / 2.0 if self.center is None else float(self.center)


@dataclass(frozen=True)
class FrameChunk:
    """`count` consecutive dark, flat or projection frames starting at `index`."""

    kind: Literal["dark", "flat", "projections"]
    scan_id: str
    seq: int
    index: int
    count: int
    payload: bytes | memoryview
    theta: tuple[float, ...] | None = None  # v1.1 projections: one angle each, radians

    @property
    def type(self) -> str:
        return self.kind

    def to_array(self, start: ScanStart) -> np.ndarray:
        """The payload as a (count, rows, cols) array of the scan's dtype (a view, no copy)."""
        dtype = DTYPES[start.dtype]
        expected = self.count * start.rows * start.cols * dtype.itemsize
        got = len(self.payload) if isinstance(self.payload, bytes) else self.payload.nbytes
        if got != expected:
            raise ProtocolError(
                "payload_size",
                f"payload is {got} bytes, expected count*rows*cols*itemsize = {self.count}*"
                f"{start.rows}*{start.cols}*{dtype.itemsize} = {expected}",
                self.scan_id,
                self.seq,
            )
        data = np.frombuffer(self.payload, dtype=dtype).reshape(self.count, start.rows, start.cols)
        if dtype.kind == "f":
            # ~8 MiB at a time: the mask of a whole 1 GiB payload would be 256 MiB more
            step = max(1, (8 << 20) // max(1, data[0].nbytes))
            bad = sum(
                int(block.size - np.count_nonzero(np.isfinite(block)))
                for block in (data[i : i + step] for i in range(0, len(data), step))
            )
            if bad:
                raise ProtocolError(
                    "non_finite",
                    f"{bad} NaN/inf values in a float32 payload",
                    self.scan_id,
                    self.seq,
                )
        return data

    @classmethod
    def from_array(
        cls,
        kind: Literal["dark", "flat", "projections"],
        scan_id: str,
        seq: int,
        index: int,
        data: np.ndarray,
    ) -> FrameChunk:
        """Wrap a (count, rows, cols) or (rows, cols) array for sending."""
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise ValueError(f"frames must be (count, rows, cols), got shape {data.shape}")
        if data.dtype.name not in DTYPES:
            raise ValueError(f"dtype {data.dtype} is not one of {sorted(DTYPES)}")
        data = np.ascontiguousarray(data, dtype=DTYPES[data.dtype.name])
        return cls(kind, scan_id, seq, index, data.shape[0], data.data.cast("B"))


@dataclass(frozen=True)
class ScanEnd:
    scan_id: str
    seq: int
    count: int

    @property
    def type(self) -> str:
        return "scan_end"


Message = ScanStart | FrameChunk | ScanEnd


# ---- encoding ----------------------------------------------------------------------------------


def encode(message: Message) -> list[bytes | memoryview]:
    """The multipart frames of `message`, ready for `socket.send_multipart`."""
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": message.type,
        "scan_id": message.scan_id,
        "seq": message.seq,
    }
    if isinstance(message, ScanStart):
        header.update(
            rows=message.rows,
            cols=message.cols,
            n_angles=message.n_angles,
            dtype=message.dtype,
            n_dark=message.n_dark,
            n_flat=message.n_flat,
            normalized=message.normalized,
        )
        if message.theta is not None:
            header["theta"] = [float(t) for t in message.theta]
        if message.center is not None:
            header["center"] = float(message.center)
        if message.meta:
            header["meta"] = message.meta
        if message.continuous:
            header["continuous"] = True
            for key in ("window", "every"):
                if getattr(message, key) is not None:
                    header[key] = getattr(message, key)
        return [msgpack.packb(header)]
    if isinstance(message, FrameChunk):
        header.update(index=message.index, count=message.count)
        if message.theta is not None:
            header["theta"] = [float(t) for t in message.theta]
        return [msgpack.packb(header), message.payload]
    header["count"] = message.count
    return [msgpack.packb(header)]


# ---- decoding ----------------------------------------------------------------------------------


def _frame_bytes(frame: Any) -> bytes | memoryview:
    # zmq.Frame (copy=False receive) exposes .buffer; bytes come through as they are.
    buffer: bytes | memoryview | None = getattr(frame, "buffer", None)
    if buffer is not None:
        return buffer
    whole: bytes | memoryview = frame
    return whole


def decode(frames: Sequence[Any], limits: Limits) -> Message:
    """Parse and validate one multipart message; raise ProtocolError naming what is wrong."""
    if not frames or len(frames) > 2:
        raise ProtocolError("bad_framing", f"expected 1 or 2 frames, got {len(frames)}")
    header = _unpack_header(_frame_bytes(frames[0]), limits)
    scan_id = header.get("scan_id")
    seq = header.get("seq")
    where = (scan_id if isinstance(scan_id, str) else None, seq if _is_int(seq) else None)

    def fail(reason: str, detail: str) -> ProtocolError:
        return ProtocolError(reason, detail, *where)

    if "v" not in header:
        raise fail("missing_key", "header has no 'v' (protocol version)")
    if header["v"] != PROTOCOL_VERSION or not _is_int(header["v"]):
        raise fail("bad_version", f"v={header['v']!r}: this service speaks protocol v1")
    kind = header.get("type")
    if kind is None:
        raise fail("missing_key", "header has no 'type'")
    if kind not in MESSAGE_TYPES:
        raise fail("unknown_type", f"type={kind!r} is not one of {', '.join(MESSAGE_TYPES)}")
    get = _Getter(header, fail)
    scan_id = get.str_("scan_id")
    if not SCAN_ID.match(scan_id):
        raise fail(
            "bad_value", f"scan_id={scan_id!r} must be 1-128 of [A-Za-z0-9._-], not only dots"
        )
    seq = get.int_("seq", minimum=0)
    expected_frames = 2 if kind in FRAME_KINDS else 1
    if len(frames) != expected_frames:
        raise fail(
            "bad_framing", f"a {kind} message has {expected_frames} frame(s), got {len(frames)}"
        )

    if kind == "scan_start":
        return _scan_start(get, scan_id, seq, limits, fail)
    if kind == "scan_end":
        return ScanEnd(scan_id, seq, get.int_("count", minimum=0))
    index = get.int_("index", minimum=0)
    count = get.int_("count", minimum=1)
    bound = limits.max_angles if kind == "projections" else limits.max_reference_frames
    if kind == "projections" and count <= bound and index <= MAX_CONTINUOUS_INDEX:
        # continuous scans number projections without end: the scan checks the index range
        pass
    elif index + count > bound:
        raise fail("too_large", f"index+count={index + count} exceeds the limit of {bound} frames")
    theta = None
    if kind == "projections":
        theta = _theta(get.optional("theta", list), count, "count", fail)
    return FrameChunk(kind, scan_id, seq, index, count, _frame_bytes(frames[1]), theta)


# v1.1: a continuous scan's projection index may pass n_angles; a bound all the same (2**48
# projections: years at 1 MHz) so that index arithmetic stays exact in float64
MAX_CONTINUOUS_INDEX = 1 << 48


def _theta(theta: list[Any] | None, n: int, name: str, fail: Any) -> tuple[float, ...] | None:
    """A theta list as sent: `n` finite numbers (radians) within float32's range, or None."""
    if theta is None:
        return None
    if len(theta) != n:
        raise fail("bad_value", f"theta has {len(theta)} angles, {name}={n}")
    if not all(_is_number(t) and abs(t) <= FLOAT32_MAX for t in theta):
        # the loop computes in float32: 1e39 is finite here and inf there
        raise fail(
            "bad_value",
            f"theta must be a list of finite numbers (radians) within float32's "
            f"+-{FLOAT32_MAX:.4g}",
        )
    return tuple(float(t) for t in theta)


def _continuous(
    get: _Getter, rows: int, cols: int, n_angles: int, theta: Any, limits: Limits, fail: Any
) -> tuple[bool, int | None, int | None]:
    """v1.1 `continuous`, `window`, `every` of a scan_start: checked, defaults filled in."""
    continuous = bool(get.optional("continuous", bool))
    if not continuous:
        for key in ("window", "every"):
            if key in get.header:
                raise fail("bad_value", f"{key} is only meaningful with continuous=true")
        return False, None, None
    window = get.int_("window", minimum=1, default=0) or half_turn(n_angles, theta)
    every = get.int_("every", minimum=1, default=0) or window
    if window < 2:
        raise fail("bad_value", f"window={window} must be >= 2 projections")
    if window > limits.max_angles:
        raise fail("bad_value", f"window={window} exceeds max_angles={limits.max_angles}")
    if every > limits.max_angles:
        raise fail("bad_value", f"every={every} exceeds max_angles={limits.max_angles}")
    ring = rows * cols * window * 4
    if ring > limits.max_scan_bytes:
        raise fail(
            "too_large",
            f"the ring buffer window*rows*cols*4 = {ring} bytes exceeds "
            f"max_scan_bytes={limits.max_scan_bytes}: a smaller window or bin the detector",
        )
    return True, window, every


def half_turn(n_angles: int, theta: tuple[float, ...] | None) -> int:
    """Projections in a half-turn: pi over the declared theta's step when it has one, else
    n_angles (the default theta spans [0, pi) in n_angles steps)."""
    if theta is not None and len(theta) >= 2:
        step = abs(theta[1] - theta[0])
        if step > 0 and math.isfinite(math.pi / step):
            return max(2, min(1 << 30, round(math.pi / step)))
    return n_angles


def _scan_start(get: _Getter, scan_id: str, seq: int, limits: Limits, fail: Any) -> ScanStart:
    rows = get.int_("rows", minimum=1)
    cols = get.int_("cols", minimum=1)
    n_angles = get.int_("n_angles", minimum=1)
    dtype = get.str_("dtype")
    if dtype not in DTYPES:
        raise fail("bad_value", f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    for name, value, bound in (
        ("rows", rows, limits.max_rows),
        ("cols", cols, limits.max_cols),
        ("n_angles", n_angles, limits.max_angles),
    ):
        if value > bound:
            raise fail("too_large", f"{name}={value} exceeds the configured limit {bound}")
    scan_bytes = rows * cols * n_angles * 4
    if scan_bytes > limits.max_scan_bytes:
        raise fail(
            "too_large",
            f"rows*n_angles*cols*4 = {scan_bytes} bytes exceeds "
            f"max_scan_bytes={limits.max_scan_bytes}",
        )
    theta = _theta(get.optional("theta", list), n_angles, "n_angles", fail)
    continuous, window, every = _continuous(get, rows, cols, n_angles, theta, limits, fail)
    center = get.optional("center", (int, float))
    convention = get.optional("center_convention", str)
    if convention is not None and convention not in CENTER_CONVENTIONS:
        raise fail(
            "bad_value",
            f"center_convention={convention!r}: choose one of {', '.join(CENTER_CONVENTIONS)}",
        )
    if center is not None and convention == "tomopy" and math.isfinite(center):
        center = from_tomopy_center(center)  # TomoPy's pixel index -> ours (workers.conventions)
    if center is not None and not (math.isfinite(center) and 0 <= center <= cols):
        raise fail("bad_value", f"center={center!r} is outside the detector [0, {cols}]")
    n_dark = get.int_("n_dark", minimum=0, default=0)
    n_flat = get.int_("n_flat", minimum=0, default=0)
    for name, value in (("n_dark", n_dark), ("n_flat", n_flat)):
        if value > limits.max_reference_frames:
            raise fail(
                "too_large",
                f"{name}={value} exceeds the configured limit {limits.max_reference_frames}",
            )
    normalized = get.optional("normalized", bool)
    meta = get.optional("meta", dict) or {}
    if not _plain_keys(meta):
        raise fail("bad_value", "meta maps must have string keys")
    if len(msgpack.packb(meta)) > limits.max_meta_bytes:
        raise fail("too_large", f"meta exceeds max_meta_bytes={limits.max_meta_bytes}")
    return ScanStart(
        scan_id,
        seq,
        rows,
        cols,
        n_angles,
        dtype,
        theta,
        None if center is None else float(center),
        n_dark,
        n_flat,
        bool(normalized),
        meta,
        continuous,
        window,
        every,
    )


FLOAT32_MAX = float(np.finfo(np.float32).max)  # NaN fails `abs(t) <= FLOAT32_MAX`, as inf does


def _plain_keys(value: Any, depth: int = 0) -> bool:
    """Every map inside `value` has str keys (meta is stored as JSON), nested at most 32 deep."""
    if depth > 32:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_keys(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_keys(v, depth + 1) for v in value)
    return True


def _unpack_header(raw: bytes | memoryview, limits: Limits) -> dict[str, Any]:
    size = len(raw) if isinstance(raw, bytes) else raw.nbytes
    if size > limits.max_header_bytes:
        # Checked before unpacking: msgpack objects expand many times over into Python objects.
        raise ProtocolError(
            "too_large",
            f"header frame is {size} bytes, above "
            f"{limits.max_header_bytes} (max_meta_bytes + theta)",
        )
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            # a string or bin expands 1:1, and the frame is within max_header_bytes: a meta too
            # large is refused after unpacking, as too_large (not as a broken header)
            max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes,
            max_array_len=limits.max_angles,
            max_map_len=4096,
            max_ext_len=0,
        )
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ProtocolError("not_msgpack", f"frame 0 is not a msgpack header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(
            "not_msgpack", f"frame 0 is a msgpack {type(header).__name__}, not a map"
        )
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Getter:
    """Typed access to header keys that raises the right ProtocolError."""

    def __init__(self, header: dict[str, Any], fail: Any) -> None:
        self.header = header
        self.fail = fail

    def int_(self, key: str, minimum: int, default: int | None = None) -> int:
        if key not in self.header and default is not None:
            return default
        value = self._present(key)
        if not _is_int(value):
            raise self.fail("bad_value", f"{key}={value!r} must be an integer")
        if value < minimum:
            raise self.fail("bad_value", f"{key}={value} must be >= {minimum}")
        return int(value)

    def str_(self, key: str) -> str:
        value = self._present(key)
        if not isinstance(value, str):
            raise self.fail("bad_value", f"{key}={value!r} must be a string")
        return value

    def optional(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.header.get(key)
        if value is None:
            return None
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail("bad_value", f"{key}={value!r} has the wrong type")
        return value

    def _present(self, key: str) -> Any:
        if key not in self.header:
            raise self.fail("missing_key", f"header has no {key!r}")
        return self.header[key]
