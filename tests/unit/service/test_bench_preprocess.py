"""`tomocast bench preprocess`: every step timed beside FBP in one run, ratios consistent."""

from __future__ import annotations

import json

import pytest

from service.cli import main


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_bench_preprocess_reports_each_step_against_fbp(
    capsys: pytest.CaptureFixture[str], clock: str
) -> None:
    flags = ["--sizes", "32", "--rows", "2", "--repeat", "1", "--clock", clock, "--json"]
    assert main(["bench", "preprocess", *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"].startswith("tomocast bench preprocess --sizes 32 --rows 2")
    assert f"--clock {clock}" in report["command"] and report["clock"] == clock
    steps = {row["step"]: row for row in report["results"]}
    assert {"fbp", "flat-field + -log", "zingers", "stripes (auto)", "phase (paganin)"} <= set(
        steps
    )
    assert steps["fbp"]["fbp_ratio"] == 1.0
    assert steps["center (vo)"]["per"] == "estimate"
    fbp = steps["fbp"]["seconds"]
    for row in report["results"]:
        assert row["seconds"] > 0
        assert row["fbp_ratio"] == pytest.approx(row["seconds"] / fbp)


def test_bench_preprocess_refuses_a_tiny_detector(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "preprocess", "--sizes", "8"]) == 2
    assert "--sizes must be >= 16" in capsys.readouterr().err
    assert main(["bench", "preprocess", "--clock", "cpu", "--device", "cuda"]) == 2
    assert "--clock cpu times the CPU device only" in capsys.readouterr().err
