"""`tomocast bench archive`: the archive's sink, plain h5py and a raw write timed in one run,
the files they wrote cleaned up, bad flags refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_bench_archive_times_the_three_writers_in_one_run(
    tmp_path: Path, compression: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "archive", "--sizes", "32", "48", "--rows", "5", "--batch", "2"]
    argv += ["--repeat", "2", "--compression", compression, "--directory", str(tmp_path)]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"].startswith(
        f"tomocast bench archive --sizes 32 48 --rows 5 --batch 2 --compression {compression}"
    )
    assert [row["cols"] for row in report["results"]] == [32, 48]
    for row in report["results"]:
        assert row["megabytes"] == pytest.approx(5 * row["cols"] ** 2 * 4 / 1e6)
        for way in ("archive", "h5py", "raw"):
            timing = row[way]
            assert 0 < timing["least_s"] <= timing["median_s"]
            assert timing["mb_per_s"] == pytest.approx(row["megabytes"] / timing["least_s"])
        assert row["archive_over_h5py"] == pytest.approx(
            row["archive"]["least_s"] / row["h5py"]["least_s"]
        )
    assert list(tmp_path.iterdir()) == []  # every file it wrote is gone


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--rows", "0"], "--rows must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--compression", "zstd"], "--compression"),
    ],
)
def test_bench_archive_refuses_bad_flags(
    flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "archive", "--sizes", "16", *flags]) == 2
    assert said in capsys.readouterr().err
