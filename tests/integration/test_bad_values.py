"""Values no detector can produce, over real sockets: they never come out as NaN, infinity or
plausible-looking pixels, and every one is counted in the scan's event and the metrics."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import torch

from service.client import Detector, Published, Subscriber
from service.events import ScanCompleted, ScanEnded
from workers.fbp import FBP
from workers.finite import LINE_INTEGRAL_MAX

ROWS, COLS, ANGLES = 6, 32, 24
rng = np.random.default_rng(5)
LINE_INTEGRALS = rng.uniform(0.0, 0.5, (ANGLES, ROWS, COLS)).astype(np.float32)


def scan_messages(viewer: Subscriber, scan_id: str) -> tuple[list[Published], ScanEnded]:
    slices = []
    while True:
        message = viewer.recv(timeout=60.0)
        assert message is not None, f"scan {scan_id} did not end"
        if message.header.get("scan_id") != scan_id:
            continue
        if message.topic != "event":
            slices.append(message)
        elif isinstance(ended := message.event(), ScanEnded):
            return slices, ended


def test_a_wild_line_integral_is_clamped_and_counted_never_nan(start_service: Any) -> None:
    service, endpoints = start_service(publish={"recon": True})
    projections = LINE_INTEGRALS.copy()
    projections[3, 2, 7] = 1e37  # finite in float32; FBP of it overflowed into NaN slices
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan("wild", projections, normalized=True)
        slices, ended = scan_messages(viewer, "wild")
    assert isinstance(ended, ScanCompleted)
    assert ended.clipped_pixels == 1 and ended.non_finite_pixels == 0
    assert len(slices) == 2 * ROWS
    for message in slices:
        assert np.isfinite(message.data).all(), message.header["index"]
    assert service.metrics.registry.get_sample_value("tomocast_clipped_pixels_total") == 1
    assert LINE_INTEGRAL_MAX < 65504  # the clamp also keeps float16 sinograms finite


class NaNOnRow:
    """The real FBP, except that reconstructed row `row` comes out NaN and inf (a stand-in for
    a device fault or an overflow the input bound did not foresee)."""

    def __init__(self, row: int) -> None:
        self.inner = FBP(torch.device("cpu"))
        self.row = row

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def reconstruct(
        self, sinograms: torch.Tensor, theta: torch.Tensor, center: float
    ) -> torch.Tensor:
        out = self.inner.reconstruct(sinograms, theta, center).clone()
        if sinograms.shape[0] == ROWS:  # the scan's batch, not the service's warm-up
            out[self.row, : COLS // 2] = float("nan")
            out[self.row, COLS // 2 :] = float("inf")
        return out


def test_non_finite_output_is_published_as_zero_and_counted(start_service: Any) -> None:
    service, endpoints = start_service(
        reconstructor=NaNOnRow(2), worker={"batch_rows": ROWS}, publish={"recon": True}
    )
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan("faulty", LINE_INTEGRALS, normalized=True)
        slices, ended = scan_messages(viewer, "faulty")
    assert isinstance(ended, ScanCompleted)
    for message in slices:
        assert np.isfinite(message.data).all(), (message.topic, message.header["index"])
    recon = {m.header["index"]: m.data for m in slices if m.topic == "recon"}
    assert (recon[2] == 0).all()
    # the FBP row is zeroed before the denoiser reads it, so the denoised slices are finite
    # without a second count: the NaN is counted where it appeared, once
    assert ended.non_finite_pixels == COLS * COLS
    value = service.metrics.registry.get_sample_value
    assert value("tomocast_non_finite_pixels_total") == COLS * COLS


def test_theta_beyond_float32_is_rejected_at_ingest(start_service: Any) -> None:
    service, endpoints = start_service()
    header = {
        "v": 1,
        "type": "scan_start",
        "scan_id": "far",
        "seq": 0,
        "rows": ROWS,
        "cols": COLS,
        "n_angles": ANGLES,
        "dtype": "float32",
        "normalized": True,
        "theta": [1e39] + [0.1 * i for i in range(1, ANGLES)],  # finite in float64 only
    }
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_raw([msgpack.packb(header)])
        detector.send_scan("after", LINE_INTEGRALS, normalized=True)
        _, ended = scan_messages(viewer, "after")
    assert isinstance(ended, ScanCompleted)
    value = service.metrics.registry.get_sample_value
    assert value("tomocast_rejected_messages_total", {"reason": "bad_value"}) == 1
    assert value("tomocast_errors_total", {"stage": "worker"}) == 0
