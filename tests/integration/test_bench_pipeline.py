"""`tomocast bench pipeline`: simulated scans through a real service on loopback, tiny size."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import pytest

from service.bench import pipeline as bench_pipeline
from service.events import ScanCompleted
from workers.denoise import DEFAULT_MODEL


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    bench_pipeline.add_arguments(parser)
    code = bench_pipeline.run(parser.parse_args(list(argv)))
    return code, capsys.readouterr().out


def test_bench_pipeline_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(
        capsys,
        "--rows",
        "5",
        "--cols",
        "32",
        "--angles",
        "24",
        "--scans",
        "2",
        "--batch",
        "2",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["bench"] == "pipeline" and report["model"] == DEFAULT_MODEL
    assert report["slices"] == 10 and report["dropped"] == 0 and report["failed_scans"] == 0
    assert set(report["ms_per_slice"]) == {"fbp", "denoise", "guard", "publish"}
    latency = report["end_to_end_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert len(report["scan_tail_s"]["each"]) == 2
    assert report["prepare_geometry"] is True
    assert report["slices_per_s"] > 0


def test_bench_pipeline_paced_without_denoiser(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(
        capsys,
        "--rows",
        "3",
        "--cols",
        "32",
        "--angles",
        "24",
        "--scans",
        "1",
        "--rate",
        "400",
        "--chunk",
        "4",
        "--no-denoise",
        "--no-prepare",
    )
    assert code == 0
    assert "--rate 400" in out and "| model (precision) | none (None) |" in out
    assert "--no-prepare" in out and "| FBP geometry built at scan_start | False |" in out
    assert "end-to-end latency p50 / p95 / p99" in out


def test_bench_pipeline_burst_and_paced_reports_both_tails_and_their_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _run(
        capsys,
        *("--rows", "4", "--cols", "32", "--angles", "48", "--scans", "2", "--rate", "400"),
        *("--chunk", "4", "--no-denoise", "--incremental", "--block-angles", "8"),
        *("--declare-center", "--burst-and-paced", "--json"),
    )
    assert code == 0
    report = json.loads(out)
    assert report["slices"] == 16 and report["failed_scans"] == 0  # 2 scans, each sent twice
    assert report["incremental"] is True and report["center_declared"] is True
    paced, bursts = report["scan_tail_s"]["each"], report["burst_tail_s"]["each"]
    ratios = report["paced_over_burst"]["each"]
    assert len(paced) == len(bursts) == len(ratios) == 2
    np.testing.assert_allclose(ratios, np.asarray(paced) / np.asarray(bursts))
    # the first scan's burst builds the geometry: the medians are of the second scan
    assert report["paced_over_burst"]["median"] == pytest.approx(ratios[1])
    assert report["burst_tail_s"]["median"] == pytest.approx(bursts[1])
    assert "--burst-and-paced" in report["command"] and "--incremental" in report["command"]


def test_bench_pipeline_burst_and_paced_needs_a_rate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="--rate"):
        _run(capsys, "--rows", "2", "--cols", "16", "--scans", "1", "--burst-and-paced")


@pytest.mark.gpu
def test_bench_pipeline_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(
        capsys,
        "--rows",
        "9",
        "--cols",
        "64",
        "--angles",
        "48",
        "--scans",
        "2",
        "--batch",
        "4",
        "--device",
        "cuda",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["slices"] == 18 and report["failed_scans"] == 0
    assert report["precision"] == "fp16"


@pytest.mark.gpu
def test_cuda_conveyor_publishes_what_the_cpu_computes(start_service: Any) -> None:
    """Streams, pinned slots and non-blocking copies must change nothing but the timing: every
    slice once, FBP as the CPU's, denoised as the CPU's fp32 engine within fp16's tolerance."""
    from service.client import Detector, Subscriber
    from service.sim.simulate import simulate_scan
    from workers.denoise import adjacent_stack, load_denoiser
    from workers.recon import recon

    rows, cols = 11, 64
    scan = simulate_scan("gpu-scan", rows=rows, cols=cols, n_angles=90, seed=5)
    service, endpoints = start_service(
        worker={"device": "cuda", "batch_rows": 4}, publish={"recon": True}
    )
    got: dict[tuple[str, int], Any] = {}
    with (
        Subscriber(endpoints.publish, ("slice", "recon", "event")) as viewer,
        Detector(endpoints.ingest) as detector,
    ):
        viewer.wait_ready()
        detector.send_scan("gpu-scan", scan.projections, darks=scan.darks, flats=scan.flats)
        while True:
            message = viewer.recv(timeout=120)
            assert message is not None
            if isinstance(message.event(), ScanCompleted):
                break
            if message.topic != "event":
                key = (message.topic, message.header["index"])
                assert key not in got
                got[key] = message.data
    assert sorted(got) == sorted((t, i) for t in ("recon", "slice") for i in range(rows))
    volume = np.stack([got["recon", i] for i in range(rows)])
    dark, flat = scan.darks.mean(0), scan.flats.mean(0)
    line_integrals = -np.log(np.clip((scan.projections - dark) / (flat - dark), 1e-6, None))
    reference = recon(line_integrals.astype(np.float32), scan.theta, device="cpu")
    np.testing.assert_allclose(volume, reference, rtol=0, atol=1e-3 * np.abs(reference).max())
    cpu = load_denoiser(None, "cpu", precision="fp32")
    import torch

    expected = cpu.denoise(adjacent_stack(torch.from_numpy(volume), 0, rows, 3)).numpy()
    denoised = np.stack([got["slice", i] for i in range(rows)])
    # fp16 keeps ~3 significant digits: 1% of the data range (the scale at this width)
    scale = cpu.metadata.normalisation(volume.shape[-1])[1]
    np.testing.assert_allclose(denoised, expected, rtol=0, atol=1e-2 * scale)
    assert service.denoiser is not None and service.denoiser.precision == "fp16"
