"""`tomocast bench recon` at a tiny size: the output's structure and finite errors, no timing."""

from __future__ import annotations

import json
import math

import pytest

from service.bench import BENCHES
from service.cli import build_parser, main


def test_bench_recon_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                *("bench", "recon", "--sizes", "24", "25", "--batch", "3", "--repeat", "2"),
                *("--clock", "cpu", "--json"),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["command"].startswith("tomocast bench recon --sizes 24 25 --batch 3")
    assert "--clock cpu" in report["command"]
    assert {"cpu", "cpus", "torch_threads", "load_average_before"} <= set(report["machine"])
    results = report["results"]
    for cols in (24, 25):
        rows = {row["engine"]: row for row in results if row["cols"] == cols}
        assert {"tomocast gridding", "tomocast direct", "tomocast recon()"} <= set(rows)
        assert [row["ours"] for row in rows.values()].count(True) == 1
        ours = next(row for row in rows.values() if row["ours"])
        assert ours["ratio"] == 1.0 and ours["slices"] == 3 and ours["repeats"] == 2
        # the script's call makes the service path's slices (same method, same geometry)
        api = rows["tomocast recon()"]
        assert api["rel_error"] == pytest.approx(ours["rel_error"], rel=1e-4)
        assert not api["ours"] and api["slices"] == 3
        for row in rows.values():
            assert row["angles"] == round(1.5 * cols)
            assert math.isfinite(row["rel_error"]) and 0 < row["rel_error"] < 0.5, row
            assert 0 < row["ms_per_slice_min"] <= row["ms_per_slice_median"]
            assert math.isfinite(row["ratio"])
    assert main(["bench", "recon", "--clock", "cpu", "--device", "cuda", "--sizes", "24"]) == 2
    assert "--clock cpu times the CPU device only" in capsys.readouterr().err
    # every peer is either timed or named as not importable
    engines = {row["engine"] for row in results}
    for peer in ("scikit-image iradon", "astra-toolbox FBP (CPU)", "tomopy gridrec"):
        assert peer in engines or any(note.startswith(peer) for note in report["notes"])
    assert "scikit-image iradon" in engines  # in the test extra


def test_bench_recon_table_and_slow_peers(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "bench",
                "recon",
                "--sizes",
                "16",
                "--angles",
                "20",
                "--batch",
                "2",
                "--repeat",
                "1",
                "--peer-budget",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("tomocast bench recon --sizes 16 --angles 20 --batch 2 --repeat 1")
    assert "clock: wall" in out
    assert "   16     20  tomocast gridding" in out
    assert "tomocast gridding" in out and "x ours" in out
    # a zero budget still times one slice of each slow peer, and says so
    assert "scikit-image iradon at 16: timed 1 of 2 slices (--peer-budget 0 s)" in out


def test_bench_what_is_extensible_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert BENCHES["recon"] == "service.bench.recon"
    with pytest.raises(SystemExit):
        main(["bench", "no-such-stage"])
    assert main(["bench", "recon", "--sizes", "4"]) == 2
    assert "--sizes" in capsys.readouterr().err
    # the log level goes before or after WHAT
    parser = build_parser()
    for argv in (
        ["bench", "--log-level", "INFO", "recon"],
        ["bench", "recon", "--log-level", "INFO"],
    ):
        assert parser.parse_args(argv).log_level == "INFO"
    assert parser.parse_args(["bench", "recon"]).log_level == "WARNING"
