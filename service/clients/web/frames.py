"""The web viewer's wire format: one binary WebSocket message per slice.

    uint32 LE  n         length of the JSON header
    n bytes    header    UTF-8 JSON: kind "frame", topic, scan_id, index, rows, shape [h, w],
                         bin, model, t_last_projection, t_published, timing, t_viewer;
                         a continuous scan's windows add window_index, first_projection,
                         last_projection, continuous_scan;
                         previews (topic "preview") add plane, angles, n_angles, fraction,
                         center, center_source
    0..3 bytes padding   so the payload starts on a 4-byte boundary (a Float32Array view)
    h*w*4      payload   float32 little-endian, row-major: the published slice, binned by `bin`

Raw float32 rather than 8-bit PNG was chosen by measurement (docs/viewer.md has the figures and
their commands): encoding costs next to nothing where PNG's costs more than the bytes it saves,
the browser windows and colours the slice itself, and contrast changes need no round trip.
Slices wider than the display size are averaged over bin x bin blocks first, which bounds both
the bandwidth and the viewer's memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

# Header keys of a published slice or preview that the page uses; anything else stays behind.
FRAME_KEYS = (
    "scan_id",
    "index",
    "rows",
    "model",
    "t_last_projection",
    "t_published",
    "timing",
    # a continuous scan's window (protocol v1.1); absent for other scans
    "window_index",
    "first_projection",
    "last_projection",
    "continuous_scan",
)
PREVIEW_KEYS = ("plane", "angles", "n_angles", "fraction", "center", "center_source")


def display_bin(shape: tuple[int, ...], max_size: int) -> int:
    """The smallest integer bin that brings the slice's longer side to at most `max_size`."""
    return max(1, math.ceil(max(shape) / max_size))


def store_bin(
    rows: int, shape: tuple[int, ...], topics: int, budget_bytes: int, at_least: int = 1
) -> int:
    """The smallest bin (>= `at_least`) at which `rows` slices of `topics` topics fit in
    `budget_bytes` as float32."""
    h, w = shape
    full = rows * topics * h * w * 4
    b = max(at_least, math.ceil(math.sqrt(full / max(budget_bytes, 1))))
    while b > 1 and rows * topics * (h // b) * (w // b) * 4 > budget_bytes:
        b += 1  # the floor in h // b can leave it just over
    return b


def bin_slice(data: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (a ragged edge is cropped); float32, C order."""
    data = np.asarray(data, dtype=np.float32)
    if factor == 1:
        return np.ascontiguousarray(data)
    h, w = data.shape[0] // factor, data.shape[1] // factor
    blocks = data[: h * factor, : w * factor].reshape(h, factor, w, factor)
    return np.ascontiguousarray(blocks.mean(axis=(1, 3), dtype=np.float64), dtype=np.float32)


def frame_header(
    topic: str, header: Mapping[str, Any], shape: tuple[int, ...], factor: int
) -> dict[str, Any]:
    """The JSON header of a frame: the published header's useful keys, plus what the page
    needs to read the payload."""
    keys = FRAME_KEYS + PREVIEW_KEYS if topic == "preview" else FRAME_KEYS
    kept = {key: header[key] for key in keys if key in header}
    return {"kind": "frame", "topic": topic, **kept, "shape": list(shape), "bin": factor}


def encode_frame(header: Mapping[str, Any], data: np.ndarray) -> bytes:
    """One binary message: length, JSON header, padding, float32 LE payload."""
    text = dumps(header).encode()
    padding = -(4 + len(text)) % 4
    payload = np.ascontiguousarray(data, dtype="<f4")
    return b"".join((struct.pack("<I", len(text)), text, b" " * padding, payload.tobytes()))


def decode_frame(message: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """The inverse of `encode_frame` (tests and Python clients)."""
    (length,) = struct.unpack_from("<I", message)
    header = json.loads(message[4 : 4 + length])
    start = 4 + length + (-(4 + length) % 4)
    data = np.frombuffer(message, dtype="<f4", offset=start).reshape(header["shape"])
    return header, data


def dumps(message: Mapping[str, Any]) -> str:
    """A text (JSON) message to the page. NaN and infinities become null: JSON has none."""
    return json.dumps(_json_safe(message), separators=(",", ":"), allow_nan=False)


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)
