"""The streaming spine end to end over real loopback TCP: DAQ -> service -> viewer."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import msgpack
import numpy as np
import pytest

from service.app import Service
from service.client import Detector, Published, Subscriber
from service.events import Event, ScanCompleted, ScanEnded, ScanStarted
from service.sim.simulate import SimulatedScan, simulate_scan
from workers.recon import recon

ROWS, COLS, ANGLES = 10, 64, 90


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan(
        "it-scan", rows=ROWS, cols=COLS, n_angles=ANGLES, photons=2000.0, n_dark=3, n_flat=4, seed=3
    )


def offline_line_integrals(scan: SimulatedScan) -> np.ndarray:
    """Flat-field correction written independently of the service, in float64 numpy."""
    dark = scan.darks.astype(np.float64).mean(axis=0)
    flat = scan.flats.astype(np.float64).mean(axis=0)
    ratio = (scan.projections.astype(np.float64) - dark) / (flat - dark)
    return (-np.log(np.clip(ratio, 1e-6, None))).astype(np.float32)


def collect(viewer: Subscriber, until_events: int = 1) -> tuple[list[Published], list[Event]]:
    """Everything published until `until_events` scans have ended."""
    messages: list[Published] = []
    events: list[Event] = []
    while len([e for e in events if isinstance(e, ScanEnded)]) < until_events:
        message = viewer.recv(timeout=60.0)
        assert message is not None, "the service published nothing for 60 s"
        event = message.event()
        if event is not None:
            events.append(event)
        else:
            messages.append(message)
    return messages, events


def rejected(service: Service, reason: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "tomocast_rejected_messages_total", {"reason": reason}
    )
    assert value is not None
    return value


@pytest.mark.parametrize("method", ["gridding", "direct"])
def test_every_slice_once_and_recon_matches_offline(
    start_service: Any, scan: SimulatedScan, method: str
) -> None:
    service, endpoints = start_service(publish={"recon": True}, worker={"fbp_method": method})
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan("it-scan", scan.projections, darks=scan.darks, flats=scan.flats, chunk=7)
        messages, events = collect(viewer)
    counts = Counter((m.topic, m.header["index"]) for m in messages)
    assert sorted(counts) == sorted((t, i) for t in ("slice", "recon") for i in range(ROWS))
    assert set(counts.values()) == {1}
    assert all(m.data is not None and m.data.shape == (COLS, COLS) for m in messages)
    assert [type(e) for e in events] == [ScanStarted, ScanCompleted]
    completed = events[1]
    assert isinstance(completed, ScanCompleted)
    assert completed.slices == ROWS and completed.missing_projections == 0

    # no centre in scan_start: the service estimates it (preprocess.center = "auto")
    assert completed.center_source == "estimated"
    assert completed.center == pytest.approx(COLS / 2, abs=0.25)
    reference = recon(
        offline_line_integrals(scan),
        scan.theta,
        center=completed.center,
        device="cpu",
        method=method,
    )
    got = np.stack(
        [m.data for m in sorted(messages, key=lambda m: m.header["index"]) if m.topic == "recon"]
    )
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4 * scale)
    header = next(m.header for m in messages if m.topic == "slice")
    assert header["scan_id"] == "it-scan" and header["rows"] == ROWS
    assert header["model"] == service.denoiser.name
    assert header["t_published"] >= header["t_last_projection"]
    assert {"fbp", "denoise", "end_to_end"} <= set(header["timing"])


def test_malformed_messages_mid_scan_cost_only_themselves(
    start_service: Any, scan: SimulatedScan
) -> None:
    service, endpoints = start_service()
    with Subscriber(endpoints.publish) as viewer, Detector(endpoints.ingest) as detector:
        viewer.wait_ready()
        detector.start_scan("it-scan", ROWS, COLS, ANGLES, "uint16", n_dark=3, n_flat=4)
        detector.send_frames("dark", "it-scan", 0, scan.darks)
        detector.send_frames("flat", "it-scan", 0, scan.flats)
        half = ANGLES // 2
        detector.send_frames("projections", "it-scan", 0, scan.projections[:half])
        detector.send_raw([b"\x93\x01\x02"])  # a msgpack array, not a map
        detector.send_raw([b"\xc1\xc1 not msgpack at all"])
        wrong_size = {
            "v": 1,
            "type": "projections",
            "scan_id": "it-scan",
            "seq": detector.next_seq("it-scan"),
            "index": half,
            "count": 2,
        }
        detector.send_raw([msgpack.packb(wrong_size), scan.projections[half].tobytes()])
        detector.send_frames("projections", "it-scan", half, scan.projections[half:])
        detector.end_scan("it-scan", ANGLES)
        messages, events = collect(viewer)
    assert sorted(m.header["index"] for m in messages) == list(range(ROWS))
    completed = events[-1]
    assert isinstance(completed, ScanCompleted)
    assert completed.missing_projections == 0 and completed.rejected_messages == 1
    assert rejected(service, "not_msgpack") == 2
    assert rejected(service, "payload_size") == 1


def test_chunks_in_any_order_before_references_with_a_duplicate(
    start_service: Any, scan: SimulatedScan
) -> None:
    service, endpoints = start_service(publish={"recon": True}, worker={"fbp_method": "gridding"})
    order = np.random.default_rng(0).permutation(np.arange(0, ANGLES, 9))
    with (
        Subscriber(endpoints.publish, ("recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.start_scan("it-scan", ROWS, COLS, ANGLES, "uint16", n_dark=3, n_flat=4)
        for index in order:  # projections first, references last
            detector.send_frames(
                "projections", "it-scan", int(index), scan.projections[index : index + 9]
            )
        detector.send_frames("projections", "it-scan", 9, scan.projections[9:18])  # duplicate
        detector.send_frames("flat", "it-scan", 2, scan.flats[2:])
        detector.send_frames("dark", "it-scan", 0, scan.darks)
        detector.send_frames("flat", "it-scan", 0, scan.flats[:2])
        detector.end_scan("it-scan", ANGLES)
        messages, events = collect(viewer)
    assert rejected(service, "duplicate") == 1
    completed = events[-1]
    assert isinstance(completed, ScanCompleted) and completed.center is not None
    reference = recon(
        offline_line_integrals(scan),
        scan.theta,
        center=completed.center,
        device="cpu",
        method="gridding",
    )
    got = np.stack([m.data for m in sorted(messages, key=lambda m: m.header["index"])])
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4 * float(np.abs(reference).max()))


def test_missing_projections_reconstruct_with_the_angles_present(
    start_service: Any, scan: SimulatedScan
) -> None:
    _, endpoints = start_service(publish={"recon": True}, worker={"fbp_method": "gridding"})
    keep = [i for i in range(0, ANGLES, 10) if i != 40]
    with (
        Subscriber(endpoints.publish, ("recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.start_scan("it-scan", ROWS, COLS, ANGLES, "uint16", n_dark=3, n_flat=4)
        detector.send_frames("dark", "it-scan", 0, scan.darks)
        detector.send_frames("flat", "it-scan", 0, scan.flats)
        for index in keep:
            detector.send_frames(
                "projections", "it-scan", index, scan.projections[index : index + 10]
            )
        detector.end_scan("it-scan", ANGLES)
        messages, events = collect(viewer)
    completed = events[-1]
    assert isinstance(completed, ScanCompleted) and completed.missing_projections == 10
    present = np.concatenate([np.arange(i, i + 10) for i in keep])
    reference = recon(
        offline_line_integrals(scan)[present],
        scan.theta[present],
        center=COLS / 2,
        device="cpu",
        method="gridding",
    )
    got = np.stack([m.data for m in sorted(messages, key=lambda m: m.header["index"])])
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4 * float(np.abs(reference).max()))


def test_health_endpoints_report_ready(start_service: Any) -> None:
    service, endpoints = start_service()
    base = f"http://127.0.0.1:{endpoints.metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{base}/readyz", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'tomocast_rejected_messages_total{reason="payload_size"} 0.0' in text
    service._ready.clear()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{base}/readyz", timeout=10)
    info.value.close()
    assert info.value.code == 503


def test_float16_sinogram_storage_reconstructs_as_well(
    start_service: Any, scan: SimulatedScan
) -> None:
    # ingest.sinogram_dtype = float16 halves the scan buffer; FBP still computes in float32.
    _, endpoints = start_service(model={"enabled": False}, ingest={"sinogram_dtype": "float16"})
    with (
        Subscriber(endpoints.publish, ("slice", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan("it-scan", scan.projections, darks=scan.darks, flats=scan.flats, chunk=7)
        messages, events = collect(viewer)
    assert isinstance(events[-1], ScanCompleted)
    got = np.stack([m.data for m in sorted(messages, key=lambda m: m.header["index"])])
    reference = recon(offline_line_integrals(scan), scan.theta, center=COLS / 2, device="cpu")
    # float16 rounds each line integral by at most 2^-11 relative, far below the photon noise:
    # what it changes in the slices is small against what the noise already put there
    # (independent errors add in quadrature: 0.15 of it is +1.1% total error)...
    noise = np.linalg.norm(reference - scan.truth)
    assert np.linalg.norm(got - reference) <= 0.15 * noise
    # ...and the slices are no further from the phantom than float32's
    assert np.linalg.norm(got - scan.truth) <= 1.01 * noise
