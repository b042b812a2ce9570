"""EPICS PV Access: the latest slice and the scan's status as PVs, for control-room viewers.

With `publish.pva_prefix` set (say `BL:TOMO:`), the service serves over PV Access (p4p, the
optional extra `tomocast[pva]`):

    <prefix>Slice        NTNDArray  the latest slice of topic `slice` (denoised; plain FBP without
                                    a denoiser), float32 (h, w); uniqueId counts the slices
                                    posted, timeStamp/dataTimeStamp the time the loop handed it
                                    over; attributes scan_id, index (detector row), rows, model,
                                    ColorMode 0, denoised (false where the no-harm guard
                                    published FBP) and consistency (the guard's score, where
                                    it has one)
    <prefix>Recon        NTNDArray  the latest plain FBP slice (topic `recon`, publish.recon)
    <prefix>ScanId       NTScalar string   the scan being reconstructed (or the last one)
    <prefix>SlicesDone   NTScalar int      its slices handed out so far
    <prefix>SlicesTotal  NTScalar int      its rows
    <prefix>Latency      NTScalar double   seconds, last projection -> latest slice handed out
    <prefix>Model        NTScalar string   the denoiser's name ("none" without one)
    <prefix>State        NTScalar string   "idle", "reconstructing", "completed" or "failed"

A `SliceSink` (`service.sinks`) of the reconstruct loop that never blocks it. Policy: **latest
value wins** — `write` (on the loop's thread) only replaces the pending update of each PV and
wakes the `pva` thread, which posts it to the p4p server; an update replaced before it was
posted is counted in `tomocast_pva_superseded_total{pv}`, each one posted in
`tomocast_pva_updates_total{pv}`. A PV viewer therefore sees the newest slice at its own pace
and never slows the pipeline. The server's network setup comes from the usual EPICS
environment (`EPICS_PVAS_INTF_ADDR_LIST`, `EPICS_PVAS_SERVER_PORT`, ...), docs/operations.md.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import ConfigError
from service.events import ScanCompleted, ScanEnded
from service.metrics import PVA_IMAGES, Metrics
from service.sinks import ScanDescription, SliceBatch
from service.stage import StageThread

log = logging.getLogger(__name__)

# PV name suffix -> NTScalar type code ('s' string, 'i' int32, 'd' double) and initial value
STATUS_PVS: dict[str, tuple[str, Any]] = {
    "ScanId": ("s", ""),
    "SlicesDone": ("i", 0),
    "SlicesTotal": ("i", 0),
    "Latency": ("d", 0.0),
    "Model": ("s", "none"),
    "State": ("s", "idle"),
}


def _p4p() -> Any:
    """The p4p modules, or a ConfigError that says how to get them."""
    try:
        import p4p.nt
        import p4p.server
        import p4p.server.thread
    except ImportError as exc:
        raise ConfigError(
            f"publish.pva_prefix is set but p4p cannot be imported ({exc}): install the "
            "extra (pip install 'tomocast[pva]'), or leave publish.pva_prefix empty"
        ) from None
    return p4p


@dataclass(frozen=True)
class _Image:
    """One slice waiting to be posted: everything the NTNDArray carries."""

    data: np.ndarray  # (h, w) float32, kept as the loop handed it over (never written again)
    attributes: dict[str, Any]
    timestamp: float


class PVAServer(StageThread):
    """The PV Access server (p4p) and the `pva` thread that posts to it.

    `begin`/`write`/`end` (its `SliceSink`) run on the reconstruct loop's thread and never
    wait for anything but a lock held for a dict update; `open`, `start`, `stop`, `join` on
    the owner's. The p4p server and its PVs are touched from the `pva` thread only once
    started (and by `open`/`close` around it)."""

    def __init__(
        self,
        prefix: str,
        metrics: Metrics,
        model: str,
        conf: dict[str, str] | None = None,
    ) -> None:
        super().__init__("pva", metrics)
        self.prefix = prefix
        self.model = model
        self._conf = conf  # None: the EPICS_PVAS_* environment
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending_images: dict[str, _Image] = {}  # PV suffix -> the newest not yet posted
        self._pending_status: dict[str, Any] = {}
        self._unique_id = {name: 0 for name in PVA_IMAGES}
        self._scans: dict[str, tuple[ScanDescription, int]] = {}  # scan_id -> (scan, done)
        self._server: Any = None
        self._nt: Any = None  # p4p.nt, once open
        self._pvs: dict[str, Any] = {}
        self.conf: dict[str, str] = {}  # the server's effective EPICS_PVAS_* (after open)

    @property
    def names(self) -> list[str]:
        return [self.prefix + suffix for suffix in (*PVA_IMAGES, *STATUS_PVS)]

    def open(self) -> dict[str, str]:
        """Create the PVs and start serving them (ConfigError without p4p); the server's
        effective configuration (`EPICS_PVAS_SERVER_PORT` is the TCP port it listens on)."""
        p4p = _p4p()
        nt, SharedPV = p4p.nt, p4p.server.thread.SharedPV
        self._nt = nt
        empty = nt.NTNDArray().wrap(np.zeros((0, 0), np.float32))
        for name in PVA_IMAGES:
            self._pvs[name] = SharedPV(initial=empty)
        for name, (code, value) in STATUS_PVS.items():
            self._pvs[name] = SharedPV(nt=nt.NTScalar(code), initial=value)
        self._pvs["Model"].post(self.model)
        providers = [{self.prefix + name: pv for name, pv in self._pvs.items()}]
        if self._conf is None:
            self._server = p4p.server.Server(providers=providers)
        else:
            self._server = p4p.server.Server(providers=providers, conf=self._conf, useenv=False)
        conf: dict[str, str] = self._server.conf()
        self.conf = conf
        log.info(
            "PV Access: serving %s on port %s (interfaces %s)",
            ", ".join(self.names),
            conf.get("EPICS_PVAS_SERVER_PORT"),
            conf.get("EPICS_PVAS_INTF_ADDR_LIST"),
        )
        return conf

    # ---- SliceSink: the loop's thread ----------------------------------------------------------

    def begin(self, scan: ScanDescription) -> None:
        self._scans[scan.scan_id] = (scan, 0)
        self._hand_over(
            status={
                "ScanId": scan.scan_id,
                "SlicesDone": 0,
                "SlicesTotal": scan.rows,
                "Model": scan.model,
                "State": "reconstructing",
            }
        )

    def write(self, batch: SliceBatch) -> None:
        if batch.scan_id not in self._scans:  # not begun (or already ended): nothing to show
            return
        scan, done = self._scans[batch.scan_id]
        now = time.time()
        attributes: dict[str, Any] = {
            "scan_id": batch.scan_id,
            "index": batch.stop - 1,
            "rows": scan.rows,
            "model": scan.model,
        }
        # the no-harm guard's verdict on the slice shown (plain FBP is never denoised) and its
        # score where it has one
        if batch.topic == "recon" or batch.denoised is None:
            attributes["denoised"] = False
        else:
            attributes["denoised"] = bool(batch.denoised[-1])
        if batch.consistency is not None and np.isfinite(batch.consistency[-1]):
            attributes["consistency"] = float(batch.consistency[-1])
        image = _Image(batch.slices[-1], attributes, now)
        if batch.topic == "recon":
            self._hand_over(images={"Recon": image})
            return
        done += len(batch.slices)
        self._scans[batch.scan_id] = (scan, done)
        status = {"SlicesDone": done, "Latency": now - scan.t_last_projection}
        self._hand_over(images={"Slice": image}, status=status)

    def end(self, outcome: ScanEnded) -> None:
        self._scans.pop(outcome.scan_id, None)
        state = "completed" if isinstance(outcome, ScanCompleted) else "failed"
        self._hand_over(status={"State": state})

    def _hand_over(
        self, images: dict[str, _Image] | None = None, status: dict[str, Any] | None = None
    ) -> None:
        """Replace the pending updates (latest wins, counted) and wake the `pva` thread."""
        with self._lock:
            for name, image in (images or {}).items():
                if name in self._pending_images:
                    self.metrics.pva_superseded.labels(name).inc()
                self._pending_images[name] = image
            self._pending_status.update(status or {})
        self._wake.set()

    # ---- the pva thread ----------------------------------------------------------------------

    def _signal_stop(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                images, self._pending_images = self._pending_images, {}
                status, self._pending_status = self._pending_status, {}
            # images first: a client that sees State "completed" finds the last slices posted
            for name, image in images.items():
                self.guarded(f"PV {self.prefix}{name}", self._post_image, name, image)
            for name, value in status.items():
                self.guarded(f"PV {self.prefix}{name}", self._post_status, name, value)
            if self.stopping and not self._wake.is_set():
                return

    def _post_status(self, name: str, value: Any) -> None:
        self._pvs[name].post(value, timestamp=time.time())

    def _post_image(self, name: str, image: _Image) -> None:
        self._unique_id[name] += 1
        value = self._nt.NTNDArray().wrap(
            np.ascontiguousarray(image.data, dtype=np.float32),
            attrib=image.attributes,
            timestamp=image.timestamp,
        )
        value["uniqueId"] = self._unique_id[name] & 0x7FFFFFFF  # int32 on the wire
        value["dataTimeStamp"] = value["timeStamp"]
        self._pvs[name].post(value)
        self.metrics.pva_updates.labels(name).inc()

    def close(self) -> None:
        """Stop serving (after `join`): PV clients see the PVs disconnect."""
        if self._server is not None:
            self._server.stop()
            self._server = None
