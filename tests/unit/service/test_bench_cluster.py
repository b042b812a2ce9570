"""`tomocast bench cluster` at a tiny size: its report's structure and byte counts, no timing."""

from __future__ import annotations

import json

import pytest

from service.cli import main


def test_bench_cluster_reports_each_count_and_the_bytes_per_slice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows, cols, angles = 8, 16, 12
    argv = ["bench", "cluster", "--rows", str(rows), "--cols", str(cols), "--angles", str(angles)]
    argv += ["--batch", "2", "--unit-rows", "4", "--workers", "1", "2", "--repeat", "1"]
    assert main([*argv, "--no-denoise", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"].startswith("tomocast bench cluster --engine local --workers 1 2")
    assert [r["workers"] for r in report["results"]] == [1, 2]
    first = report["results"][0]
    assert first["speedup"] == 1.0
    for result in report["results"]:
        assert result["seconds"] > 0 and result["slices_per_s"] > 0
        # without a denoiser no halo: each row travels once, as float32; each slice comes back
        assert result["sent_bytes_per_slice"] == angles * cols * 4
        assert result["returned_bytes_per_slice"] == cols * cols * 4


def test_bench_cluster_refuses_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "cluster", "--workers", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
