"""`tomocast bench guard`: the guard timed beside the denoiser in one run, ratios consistent,
and the guard's verdict on the slices timed reported (whatever the shipped model makes of them:
the lead retrains it, so no verdict is assumed here)."""

from __future__ import annotations

import json
import math

import pytest

from service.cli import main


def test_bench_guard_reports_the_guard_against_the_denoiser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["bench", "guard", "--sizes", "32", "--angles", "40", "--rows", "3", "--repeat", "1"]
    assert main([*argv, "--max-angles", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"].startswith(
        "tomocast bench guard --sizes 32 --angles 40 --rows 3 --photons 1000.0 --repeat 1"
    )
    assert "--max-angles 20" in report["command"]
    rows = {row["what"]: row for row in report["results"]}
    assert set(rows) == {"denoise", "guard (photon variance)", "guard (estimated variance)"}
    denoise = rows["denoise"]
    assert denoise["of_denoise"] == 1.0
    for name in ("guard (photon variance)", "guard (estimated variance)"):
        row = rows[name]
        assert 0 < row["ms_per_slice_min"] <= row["ms_per_slice_median"]
        assert row["of_denoise"] == pytest.approx(
            row["ms_per_slice_min"] / denoise["ms_per_slice_min"]
        )
        assert 0 <= row["kept"] <= 1 and math.isfinite(row["consistency_median"])
        assert row["max_angles"] == 20


def test_bench_guard_refuses_a_tiny_detector(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "guard", "--sizes", "8"]) == 2
    assert "--sizes must be >= 16" in capsys.readouterr().err
