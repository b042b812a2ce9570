"""The scans being received, as the operator sees them live: each one's provisional rotation
centre, and the control endpoint that changes it, `POST /scans/{scan_id}/center`.

The centre a scan is previewed about (`service.preview`) before its data can estimate one:

    declared   scan_start's `center`
    config     `preprocess.center` a number
    previous   the centre the last scan of the same width was reconstructed about
    default    the detector's middle, cols/2
    operator   set by `POST /scans/{scan_id}/center` while the scan is received; the scan's
               final slices are reconstructed about it too (as if scan_start had declared it)

The endpoint is served on the metrics port (`service.health`) and answers requests from
loopback peers only: the HTTP server has no authentication (CURVE secures the ZeroMQ sockets
only), so whoever may move a running scan's axis must be on the service's host, or come
through an SSH tunnel or an authenticating proxy there. docs/protocol.md, "Live centre".
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from service.metrics import Metrics
from service.protocol import ScanStart

log = logging.getLogger(__name__)

CENTER_PATH = re.compile(r"^/scans/([A-Za-z0-9._-]{1,128})/center$")
MAX_BODY_BYTES = 1024  # `{"center": 1234.5}` and then some


class CenterRefused(ValueError):
    """A centre change that cannot be applied: `status` is the HTTP answer (400, 404)."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@dataclass
class LiveScan:
    """One scan being received: its width and the centre its previews use."""

    scan_id: str
    cols: int
    center: float
    source: str  # declared, config, previous, default, estimated, operator
    operator: bool = False  # the centre was set by POST: the final slices use it


class LiveScans:
    """The registry of scans being received. Thread-safe: the ingest thread opens and closes
    scans, the HTTP threads change centres, the preview thread reads them, the reconstruct
    loop's preview sink reports the centres scans were reconstructed about (`learn`).

    `known_center(start)` is the centre known before the data (declared or configured;
    `ScanPreprocessor.known_center`); listeners added with `on_change` are called with the
    scan_id on the thread that changed a centre and must not block.
    """

    def __init__(
        self, metrics: Metrics, known_center: Callable[[ScanStart], float | None] | None = None
    ) -> None:
        self.metrics = metrics
        self.known_center = known_center
        self._lock = threading.Lock()
        self._scans: dict[str, LiveScan] = {}
        self._previous: dict[int, float] = {}  # cols -> the last centre reconstructed about
        self._listeners: list[Callable[[str], None]] = []

    def on_change(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def open(self, start: ScanStart) -> LiveScan:
        """Register a started scan with its provisional centre (the policy in the module's
        docstring)."""
        known = self.known_center(start) if self.known_center is not None else None
        with self._lock:
            if start.center is not None:
                center, source = float(start.center), "declared"
            elif known is not None:
                center, source = known, "config"
            elif start.cols in self._previous:
                center, source = self._previous[start.cols], "previous"
            else:
                center, source = start.cols / 2, "default"
            scan = LiveScan(start.scan_id, start.cols, center, source)
            self._scans[start.scan_id] = scan
            return LiveScan(**vars(scan))

    def get(self, scan_id: str) -> LiveScan | None:
        """A copy of the live scan's state, None when it is not live."""
        with self._lock:
            scan = self._scans.get(scan_id)
            return None if scan is None else LiveScan(**vars(scan))

    def close(self, scan_id: str) -> LiveScan | None:
        """The scan is complete or failed: no more changes; its last state."""
        with self._lock:
            return self._scans.pop(scan_id, None)

    def learn(self, cols: int, center: float) -> None:
        """A scan `cols` wide is reconstructed about `center`: the next scan of that width
        without a known centre is previewed about it."""
        with self._lock:
            self._previous[cols] = center

    def estimated(self, scan_id: str, center: float) -> bool:
        """The centre of live scan `scan_id`, estimated from its data as they arrived
        (`ScanPreprocessor.early_center`), replaces a provisional one (default, previous);
        never a declared, configured or operator's centre. Whether it did."""
        with self._lock:
            scan = self._scans.get(scan_id)
            if scan is None or scan.source not in ("default", "previous"):
                return False
            scan.center, scan.source = center, "estimated"
        for listener in self._listeners:
            listener(scan_id)
        return True

    def set_center(self, scan_id: str, value: Any) -> tuple[float, float]:
        """Move scan `scan_id`'s axis to `value` (pixels, tomocast's convention); returns
        (previous, new). `CenterRefused` when the value is not a finite number on the detector
        or the scan is not being received."""
        try:
            center = _check_number(value)
            with self._lock:
                scan = self._scans.get(scan_id)
                if scan is None:
                    raise CenterRefused(
                        "404 Not Found",
                        f"scan {scan_id!r} is not being received (it ended, or never started): "
                        "a centre can be changed until its scan_end",
                    )
                if not 0 <= center <= scan.cols:
                    raise CenterRefused(
                        "400 Bad Request",
                        f"center={center!r} is off the detector: use 0 .. {scan.cols} "
                        f"(cols/2 = {scan.cols / 2:g} is the middle)",
                    )
                previous = scan.center
                scan.center, scan.source, scan.operator = center, "operator", True
        except CenterRefused:
            self.metrics.center_changes.labels("rejected").inc()
            raise
        self.metrics.center_changes.labels("accepted").inc()
        log.info("scan_id=%s centre set live: %.3f -> %.3f px", scan_id, previous, center)
        for listener in self._listeners:
            listener(scan_id)
        return previous, center


def _check_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CenterRefused("400 Bad Request", f"center={value!r} is not a number")
    try:
        center = float(value)
    except OverflowError:  # an integer beyond float's range
        center = math.inf
    if not math.isfinite(center):
        raise CenterRefused("400 Bad Request", f"center={value!r:.40} is not finite")
    return center


class CenterControl:
    """`POST /scans/{scan_id}/center` with the body `{"center": PIXELS}` (JSON), served by
    `service.health.HealthServer` on its request threads. Loopback peers only (403 otherwise).
    Answers JSON: `{"scan_id", "center", "previous"}` (200) or `{"error"}` (400, 403, 404, 405,
    413)."""

    def __init__(self, live: LiveScans) -> None:
        self.live = live

    def handles(self, path: str) -> bool:
        return path.startswith("/scans/")

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        try:
            return _json(start_response, "200 OK", self._change(environ))
        except CenterRefused as exc:
            return _json(start_response, exc.status, {"error": str(exc)})

    def _change(self, environ: dict[str, Any]) -> dict[str, Any]:
        match = CENTER_PATH.match(environ.get("PATH_INFO", ""))
        if match is None:
            raise CenterRefused("404 Not Found", "try POST /scans/{scan_id}/center")
        if environ.get("REQUEST_METHOD") != "POST":
            raise CenterRefused("405 Method Not Allowed", 'use POST with {"center": PIXELS}')
        if not _loopback(environ.get("REMOTE_ADDR", "")):
            raise CenterRefused(
                "403 Forbidden",
                "the control endpoint answers loopback peers only: run the request on the "
                "service's host (or through an SSH tunnel to it)",
            )
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            raise CenterRefused(
                "400 Bad Request" if length <= MAX_BODY_BYTES else "413 Content Too Large",
                f'send a JSON body {{"center": PIXELS}} of at most {MAX_BODY_BYTES} bytes',
            )
        try:
            body = json.loads(environ["wsgi.input"].read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CenterRefused("400 Bad Request", f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict) or "center" not in body:
            raise CenterRefused("400 Bad Request", 'send {"center": PIXELS}')
        scan_id = match.group(1)
        previous, center = self.live.set_center(scan_id, body["center"])
        return {"scan_id": scan_id, "center": center, "previous": previous}


def _loopback(address: str) -> bool:
    try:
        return ip_address(address).is_loopback
    except ValueError:
        return False


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = (json.dumps(body) + "\n").encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
    ]
    if status.startswith("405"):
        headers.append(("Allow", "POST"))
    start_response(status, headers)
    return [data]
