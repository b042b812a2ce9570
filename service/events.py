"""What the service publishes, as types: the scan events and the slice header.

Each type is defined once here, with `encode` (the exact map the publisher sends, keys in the
order they have always had on the wire) and `decode` (a received map, typed; it raises
`UnknownEvent` or `ValueError` on what it cannot read). docs/protocol.md, "What the service
publishes", describes the same maps for people; nothing outside this module names an event.

Every published message also carries what the publisher adds on its way out: `v` and
`t_published` (`PublishChannel`), `pub_seq` (the forwarding thread). `decode` reads past them
for events; `SliceHeader` keeps them, since viewers time slices with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

EVENT_TOPIC = "event"  # the publisher's topic of every scan event


class UnknownEvent(ValueError):
    """An `event` message whose name this version does not know."""


@dataclass(frozen=True)
class ScanStarted:
    """A `scan_start` was accepted: the scan is being assembled."""

    scan_id: str
    rows: int
    cols: int
    n_angles: int
    meta: dict[str, Any] = field(default_factory=dict)
    type: Literal["scan_started"] = field(default="scan_started", init=False)

    def encode(self) -> dict[str, Any]:
        return {
            "event": self.type,
            "scan_id": self.scan_id,
            "rows": self.rows,
            "cols": self.cols,
            "n_angles": self.n_angles,
            "meta": self.meta,
        }

    @classmethod
    def decode(cls, header: Mapping[str, Any]) -> ScanStarted:
        _expect(header, "scan_started")
        return cls(
            _str(header, "scan_id"),
            _int(header, "rows"),
            _int(header, "cols"),
            _int(header, "n_angles"),
            dict(header.get("meta") or {}),
        )


@dataclass(frozen=True)
class ScanLatency:
    """How long a completed scan took: last projection -> last slice published (seconds), and
    the mean FBP and denoise time per slice (milliseconds; denoise None without a denoiser)."""

    tail_s: float
    fbp_ms_per_slice: float
    denoise_ms_per_slice: float | None

    def encode(self) -> dict[str, Any]:
        return {
            "tail_s": self.tail_s,
            "fbp_ms_per_slice": self.fbp_ms_per_slice,
            "denoise_ms_per_slice": self.denoise_ms_per_slice,
        }

    @classmethod
    def decode(cls, latency: Mapping[str, Any]) -> ScanLatency:
        denoise = latency.get("denoise_ms_per_slice")
        return cls(
            _float(latency, "tail_s"),
            _float(latency, "fbp_ms_per_slice"),
            None if denoise is None else _float(latency, "denoise_ms_per_slice"),
        )


@dataclass(frozen=True)
class ScanCompleted:
    """Every slice of the scan has been published (it comes after the last one)."""

    scan_id: str
    slices: int
    missing_projections: int
    rejected_messages: int
    clipped_pixels: int
    model: str
    latency: ScanLatency
    # reconstructed or denoised pixels that were NaN or infinite, published as 0
    # (workers.finite); absent from the events of senders older than the field: 0
    non_finite_pixels: int = 0
    # the rotation centre reconstructed about (tomocast's convention) and where it came from
    # (declared, config, estimated, default); what `[preprocess]` applied (setting -> what
    # ran); zinger pixels replaced. Encoded when `center` is set (the service always sets it)
    center: float | None = None
    center_source: str | None = None
    preprocessing: dict[str, str] = field(default_factory=dict)
    zinger_pixels: int = 0
    # a continuous scan's end (service.continuous): the windows reconstructed; None otherwise
    windows: int | None = None
    type: Literal["scan_completed"] = field(default="scan_completed", init=False)

    def encode(self) -> dict[str, Any]:
        header = {
            "event": self.type,
            "scan_id": self.scan_id,
            "slices": self.slices,
            "missing_projections": self.missing_projections,
            "rejected_messages": self.rejected_messages,
            "clipped_pixels": self.clipped_pixels,
            "model": self.model,
            "latency": self.latency.encode(),
            "non_finite_pixels": self.non_finite_pixels,
        }
        if self.center is not None:
            header.update(
                center=self.center,
                center_source=self.center_source,
                preprocessing=dict(self.preprocessing),
                zinger_pixels=self.zinger_pixels,
            )
        if self.windows is not None:
            header["windows"] = self.windows
        return header

    @classmethod
    def decode(cls, header: Mapping[str, Any]) -> ScanCompleted:
        _expect(header, "scan_completed")
        latency = header.get("latency")
        if not isinstance(latency, Mapping):
            raise ValueError(f"scan_completed: latency={latency!r} is not a map")
        completed = cls(
            _str(header, "scan_id"),
            _int(header, "slices"),
            _int(header, "missing_projections"),
            _int(header, "rejected_messages"),
            _int(header, "clipped_pixels"),
            _str(header, "model"),
            ScanLatency.decode(latency),
            _int(header, "non_finite_pixels") if "non_finite_pixels" in header else 0,
            *_centre(header),
        )
        if "windows" in header:
            completed = replace(completed, windows=_int(header, "windows"))
        return completed


@dataclass(frozen=True)
class ScanFailed:
    """The scan ends without (all of) its slices: `reason` says why, for the operator."""

    scan_id: str
    reason: str
    type: Literal["scan_failed"] = field(default="scan_failed", init=False)

    def encode(self) -> dict[str, Any]:
        return {"event": self.type, "scan_id": self.scan_id, "reason": self.reason}

    @classmethod
    def decode(cls, header: Mapping[str, Any]) -> ScanFailed:
        _expect(header, "scan_failed")
        return cls(_str(header, "scan_id"), _str(header, "reason"))


@dataclass(frozen=True)
class ModelUpdated:
    """Adapted weights were swapped in, between scans (`service.adapt`, model.adapt): slices of
    every later scan carry `model` in their header. `scan_id` and `rows`: the scan (and how many
    of its rows) the weights were fine-tuned on; `validation_psnr_db`: the adapted network's
    prediction of held-out angles' reconstruction (noise included: compare it with
    `validation_gain_db`, its gain over the weights it replaces, not with a PSNR against a
    truth); `seconds`: the whole adaptation, set-up to swap; `train_seconds`, `steps`: its
    training steps."""

    model: str
    previous: str
    scan_id: str
    rows: int
    validation_psnr_db: float
    validation_gain_db: float
    seconds: float
    train_seconds: float
    steps: int
    type: Literal["model_updated"] = field(default="model_updated", init=False)

    def encode(self) -> dict[str, Any]:
        return {
            "event": self.type,
            "model": self.model,
            "previous": self.previous,
            "scan_id": self.scan_id,
            "rows": self.rows,
            "validation_psnr_db": self.validation_psnr_db,
            "validation_gain_db": self.validation_gain_db,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "steps": self.steps,
        }

    @classmethod
    def decode(cls, header: Mapping[str, Any]) -> ModelUpdated:
        _expect(header, "model_updated")
        return cls(
            _str(header, "model"),
            _str(header, "previous"),
            _str(header, "scan_id"),
            _int(header, "rows"),
            _float(header, "validation_psnr_db"),
            _float(header, "validation_gain_db"),
            _float(header, "seconds"),
            _float(header, "train_seconds"),
            _int(header, "steps"),
        )


Event = ScanStarted | ScanCompleted | ScanFailed | ModelUpdated
ScanEnded = ScanCompleted | ScanFailed  # a scan's last event: isinstance(event, ScanEnded)
SCAN_EVENTS: dict[
    str, type[ScanStarted] | type[ScanCompleted] | type[ScanFailed] | type[ModelUpdated]
] = {
    "scan_started": ScanStarted,
    "scan_completed": ScanCompleted,
    "scan_failed": ScanFailed,
    "model_updated": ModelUpdated,
}


def decode_event(header: Mapping[str, Any]) -> Event:
    """The typed event of a published `event` map; `UnknownEvent` for a name not in
    `SCAN_EVENTS`, `ValueError` for a known one with missing or mistyped keys."""
    name = header.get("event")
    kind = SCAN_EVENTS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise UnknownEvent(f"event={name!r} is not one of {', '.join(SCAN_EVENTS)}")
    return kind.decode(header)


# ---- slices ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceHeader:
    """The header of one published slice (topics `slice` and `recon`).

    The reconstruct loop fills the scan's part (`scan_id` .. `timing`: stage -> seconds per
    slice, `wait`, `fbp` and, with a denoiser, `denoise`); `PublishChannel` stamps the rest
    as it sends (`shape`, `dtype`, `t_published`, and `end_to_end` into `timing`), the
    publisher's thread `pub_seq`. A received header has them all.
    """

    scan_id: str
    rows: int  # slices in the scan
    model: str
    t_last_projection: float  # unix seconds
    index: int  # the detector row
    timing: dict[str, float]
    v: int = 1
    shape: tuple[int, ...] | None = None
    dtype: str = "float32"
    t_published: float | None = None  # unix seconds
    pub_seq: int | None = None
    # denoised slices: the scan's intensity factor, the network's input scale relative to the
    # level it was trained at (one per scan; `workers.denoise.DenoiseEngine.scale_for`)
    scale: float | None = None
    # True: the network's output; False: plain FBP (no denoiser, topic `recon`, or the no-harm
    # guard replaced a denoised slice the measured data contradict). None: a header from a
    # service older than the guard
    denoised: bool | None = None
    # the no-harm guard's score (`service.guard`): chi2(denoised) / max(chi2(FBP), 1); None
    # when the guard did not score the slice (no denoiser, guard off, topic `recon`, or a score
    # that is not finite: then `denoised` is False)
    consistency: float | None = None
    # a continuous scan's window (service.continuous): `window_index`, `first_projection`,
    # `last_projection` (ints) and `continuous_scan` (the scan_id of the scan_start); None
    # for other scans, whose headers have none of these keys
    window: dict[str, Any] | None = None

    def encode(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "scan_id": self.scan_id,
            "rows": self.rows,
            "model": self.model,
            "t_last_projection": self.t_last_projection,
            "index": self.index,
            "timing": dict(self.timing),
        }
        if self.t_published is not None:  # stamped: the whole published header
            header.update(
                v=self.v,
                shape=None if self.shape is None else list(self.shape),
                dtype=self.dtype,
                t_published=self.t_published,
            )
        if self.pub_seq is not None:
            header["pub_seq"] = self.pub_seq
        if self.scale is not None:
            header["scale"] = self.scale
        if self.denoised is not None:
            header["denoised"] = self.denoised
        if self.consistency is not None and math.isfinite(self.consistency):
            header["consistency"] = self.consistency
        if self.window is not None:
            header.update(self.window)
        return header

    @classmethod
    def decode(cls, header: Mapping[str, Any]) -> SliceHeader:
        """Raises ValueError naming the first key that is missing or of the wrong type."""
        timing = header.get("timing", {})
        if not isinstance(timing, Mapping):
            raise ValueError(f"timing={timing!r} is not a map")
        shape = header.get("shape")
        if shape is not None and not (
            isinstance(shape, (list, tuple)) and all(_is_int(n) for n in shape)
        ):
            raise ValueError(f"shape={shape!r} is not a list of integers")
        plane = header.get("plane", "xy")  # absent from the first senders' previews
        if plane not in PREVIEW_PLANES:
            raise ValueError(f"plane={plane!r} is not one of {PREVIEW_PLANES}")
        published = header.get("t_published")
        pub_seq = header.get("pub_seq")
        scale = header.get("scale")
        denoised = header.get("denoised")
        consistency = header.get("consistency")
        return cls(
            scan_id=_str(header, "scan_id"),
            rows=_int(header, "rows"),
            model=str(header.get("model", "")),
            t_last_projection=_float(header, "t_last_projection"),
            index=_int(header, "index"),
            timing={str(k): float(v) for k, v in timing.items() if _is_number(v)},
            v=_int(header, "v") if "v" in header else 1,
            shape=None if shape is None else tuple(shape),
            dtype=str(header.get("dtype", "float32")),
            t_published=None if published is None else _float(header, "t_published"),
            pub_seq=pub_seq if _is_int(pub_seq) else None,
            scale=_float(header, "scale") if _is_number(scale) else None,
            denoised=denoised if isinstance(denoised, bool) else None,
            consistency=_finite_or_none(consistency),
            window=_window(header),
        )

    @property
    def end_to_end(self) -> float | None:
        """Last projection -> this slice published (s), as the service measured it."""
        value = self.timing.get("end_to_end")
        return value if value is not None and math.isfinite(value) else None


PREVIEW_TOPIC = "preview"  # the publisher's topic of partial reconstructions during a scan
PREVIEW_PLANES = ("xy", "xz")  # a row's slice; the vertical cut through every row's slice


@dataclass(frozen=True)
class PreviewHeader:
    """The header of one preview (topic `preview`): row `index` of scan `scan_id` reconstructed
    from the `angles` projections received so far (`fraction` of the `n_angles` declared),
    about `center` (`center_source`: declared, config, operator, previous, default,
    estimated). Filled by `service.preview`; `PublishChannel.send_preview` stamps `shape`,
    `t_published`, the forwarding thread `pub_seq`. `plane` "xy" is a row's slice; "xz" the
    vertical cut through every row's slice at slice row `index`, shape (rows, N)."""

    scan_id: str
    rows: int  # detector rows of the scan
    index: int  # the detector row
    angles: int
    n_angles: int
    center: float
    center_source: str
    t_last_projection: float  # unix seconds: the latest projection included arrived
    preview: bool = True
    v: int = 1
    shape: tuple[int, ...] | None = None
    dtype: str = "float32"
    t_published: float | None = None
    pub_seq: int | None = None
    plane: str = "xy"  # PREVIEW_PLANES

    @property
    def fraction(self) -> float:
        return self.angles / self.n_angles if self.n_angles else 0.0

    def encode(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "v": self.v,
            "scan_id": self.scan_id,
            "preview": True,
            "rows": self.rows,
            "index": self.index,
            "angles": self.angles,
            "n_angles": self.n_angles,
            "fraction": self.fraction,
            "center": self.center,
            "center_source": self.center_source,
            "t_last_projection": self.t_last_projection,
            "dtype": self.dtype,
            "plane": self.plane,
        }
        if self.shape is not None:
            header["shape"] = list(self.shape)
        if self.t_published is not None:
            header["t_published"] = self.t_published
        if self.pub_seq is not None:
            header["pub_seq"] = self.pub_seq
        return header

    @classmethod
    def decode(cls, header: Mapping[str, Any]) -> PreviewHeader:
        """Raises ValueError naming the first key that is missing or of the wrong type."""
        if header.get("preview") is not True:
            raise ValueError(f"preview={header.get('preview')!r}: not a preview header")
        shape = header.get("shape")
        if shape is not None and not (
            isinstance(shape, (list, tuple)) and all(_is_int(n) for n in shape)
        ):
            raise ValueError(f"shape={shape!r} is not a list of integers")
        plane = header.get("plane", "xy")  # absent from the first senders' previews
        if plane not in PREVIEW_PLANES:
            raise ValueError(f"plane={plane!r} is not one of {PREVIEW_PLANES}")
        published = header.get("t_published")
        pub_seq = header.get("pub_seq")
        return cls(
            scan_id=_str(header, "scan_id"),
            rows=_int(header, "rows"),
            index=_int(header, "index"),
            angles=_int(header, "angles"),
            n_angles=_int(header, "n_angles"),
            center=_float(header, "center"),
            center_source=_str(header, "center_source"),
            t_last_projection=_float(header, "t_last_projection"),
            v=_int(header, "v") if "v" in header else 1,
            shape=None if shape is None else tuple(shape),
            dtype=str(header.get("dtype", "float32")),
            t_published=None if published is None else _float(header, "t_published"),
            pub_seq=pub_seq if _is_int(pub_seq) else None,
            plane=plane,
        )


def _centre(header: Mapping[str, Any]) -> tuple[float | None, str | None, dict[str, str], int]:
    """scan_completed's centre fields (absent from older senders' events: None, {}, 0)."""
    if "center" not in header:
        return None, None, {}, 0
    preprocessing = header.get("preprocessing") or {}
    if not isinstance(preprocessing, Mapping):
        raise ValueError(f"preprocessing={preprocessing!r} is not a map")
    return (
        _float(header, "center"),
        _str(header, "center_source"),
        {str(k): str(v) for k, v in preprocessing.items()},
        _int(header, "zinger_pixels") if "zinger_pixels" in header else 0,
    )


# ---- checked access to received maps -----------------------------------------------------------


def _expect(header: Mapping[str, Any], name: str) -> None:
    if header.get("event") != name:
        raise ValueError(f"event={header.get('event')!r}, expected {name!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_or_none(value: Any) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(value) else None


def _present(header: Mapping[str, Any], key: str) -> Any:
    if key not in header:
        raise ValueError(f"no {key!r} in {header.get('event', 'slice')!r} header")
    return header[key]


def _str(header: Mapping[str, Any], key: str) -> str:
    value = _present(header, key)
    if not isinstance(value, str):
        raise ValueError(f"{key}={value!r} is not a string")
    return value


def _int(header: Mapping[str, Any], key: str) -> int:
    value = _present(header, key)
    if not _is_int(value):
        raise ValueError(f"{key}={value!r} is not an integer")
    return int(value)


def _float(header: Mapping[str, Any], key: str) -> float:
    value = _present(header, key)
    if not _is_number(value):
        raise ValueError(f"{key}={value!r} is not a number")
    return float(value)


WINDOW_KEYS = ("window_index", "first_projection", "last_projection")


def _window(header: Mapping[str, Any]) -> dict[str, Any] | None:
    """A continuous scan's window keys of a slice header, or None when it has none."""
    if "window_index" not in header:
        return None
    window: dict[str, Any] = {key: _int(header, key) for key in WINDOW_KEYS}
    if isinstance(header.get("continuous_scan"), str):
        window["continuous_scan"] = header["continuous_scan"]
    return window
