"""The vertical (XZ) preview over real loopback sockets: when every row of a scan is live, each
preview render also publishes the cut through the rows' slices at their middle slice row, and
with every angle in it is the same cut of the final slices (denoiser off, direct FBP)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.client import Detector, Published, Subscriber
from service.events import PreviewHeader, ScanCompleted, ScanEnded
from service.sim.simulate import SimulatedScan
from tests.integration.test_preview import (
    ANGLES,
    CENTER,
    COLS,
    ROWS,
    final_slices,
    is_preview,
    line_integrals,
    receive,
    send_paced,
)
from tests.integration.test_preview import scan as scan  # its fixture
from tests.support.helpers import in_thread
from workers.recon import recon

MIDDLE = COLS // 2  # the slice row the XZ preview cuts through (slices are COLS x COLS)


def is_vertical(message: Published, angles: int | None = None) -> bool:
    return is_preview(message, angles) and message.header["plane"] == "xz"


@pytest.mark.parametrize(
    "settings",
    [
        # every row named in preview.rows: rendered from the snapshots
        {"preview": {"rate_hz": 10.0, "rows": list(range(ROWS))}},
        # the default rows, and every row in the incremental accumulators
        {"preview": {"rate_hz": 20.0}, "incremental": {"enabled": True, "block_angles": 20}},
    ],
    ids=["all-rows-previewed", "incremental"],
)
def test_the_xz_preview_grows_and_ends_as_the_cut_through_the_final_slices(
    start_service: Any, scan: SimulatedScan, settings: dict[str, Any]
) -> None:
    _, endpoints = start_service(
        model={"enabled": False}, worker={"fbp_method": "direct"}, **settings
    )
    with (
        Subscriber(endpoints.publish, ("slice", "event", "preview")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        sender, result = in_thread(
            lambda: send_paced(detector, scan, "pv-xz", ANGLES, center=CENTER)
        )
        before = receive(viewer, lambda m: is_vertical(m, ANGLES))
        sender.join(30)
        assert result == [None], result
        detector.end_scan("pv-xz", ANGLES)
        after = receive(viewer, lambda m: isinstance(m.event(), ScanEnded))
    assert isinstance(after[-1].event(), ScanCompleted)
    first_final = next(i for i, m in enumerate(after) if m.topic == "slice")
    assert not any(is_preview(m) for m in after[first_final:]), "a preview after final slices"

    vertical = [m for m in before if is_vertical(m)]
    headers = [PreviewHeader.decode(m.header) for m in vertical]
    assert all(h.index == MIDDLE and h.rows == ROWS and h.center == CENTER for h in headers)
    assert all(m.data is not None and m.data.shape == (ROWS, COLS) for m in vertical)
    assert [h.angles for h in headers] == sorted(h.angles for h in headers)  # growing
    assert headers[-1].fraction == 1.0

    # a partial one is the cut through the FBP of the angles received so far
    partial = [(m, h) for m, h in zip(vertical, headers, strict=True) if h.angles < ANGLES]
    if partial:  # a fast machine may have folded every angle before the first render
        message, header = partial[0]
        offline = recon(
            line_integrals(scan)[: header.angles],
            scan.start.theta_array()[: header.angles],
            center=CENTER,
            device="cpu",
            method="direct",
        )[:, MIDDLE, :]
        scale = float(np.abs(offline).max())
        np.testing.assert_allclose(message.data, offline, rtol=0, atol=1e-4 * scale)

    # with every angle: the same cut through the final slices
    final = final_slices(after)
    assert sorted(final) == list(range(ROWS))
    cut = np.stack([final[row] for row in range(ROWS)])[:, MIDDLE, :]
    scale = float(np.abs(cut).max())
    assert scale > 0
    np.testing.assert_allclose(vertical[-1].data, cut, rtol=0, atol=1e-5 * scale)


def test_no_xz_preview_when_only_some_rows_are_live(
    start_service: Any, scan: SimulatedScan
) -> None:
    """The default rows (3 of 8), no incremental: row previews only."""
    _, endpoints = start_service(
        model={"enabled": False}, worker={"fbp_method": "direct"}, preview={"rate_hz": 10.0}
    )
    with (
        Subscriber(endpoints.publish, ("event", "preview")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        send_paced(detector, scan, "pv-xy", ANGLES, center=CENTER)
        detector.end_scan("pv-xy", ANGLES)
        got = receive(viewer, lambda m: isinstance(m.event(), ScanEnded))
    previews = [m for m in got if is_preview(m)]
    assert previews and all(m.header["plane"] == "xy" for m in previews)
