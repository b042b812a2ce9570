"""`tomocast bench denoise` runs end to end at a tiny size (no timing is asserted); a variant out
of device memory costs its own row only; compile keeps a graph per case."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from service.bench import denoise as bench_denoise


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    parser = argparse.ArgumentParser()
    bench_denoise.add_arguments(parser)
    assert bench_denoise.run(parser.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def test_bench_denoise_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(
        capsys,
        "--sizes",
        "24",
        "--batches",
        "1",
        "2",
        "--repeat",
        "2",
        "--variants",
        "eager,script,frozen,engine-fp32,engine-int8",
        "--json",
    )
    report = json.loads(out)
    assert report["bench"] == "denoise"
    assert report["command"].startswith("tomocast bench denoise --sizes 24 --batches 1 2")
    rows = report["results"]
    assert [(r["batch"], r["variant"]) for r in rows] == [
        (b, v) for b in (1, 2) for v in ("eager", "script", "frozen", "engine-fp32", "engine-int8")
    ]
    for row in rows:
        assert row["ms_per_slice_min"] > 0 and row["setup_s"] >= 0
    baseline = [r for r in rows if r["variant"] == "eager"]
    assert all(r["rms_vs_baseline"] == 0 for r in baseline)
    # same weights: fp32 variants agree with eager to rounding, int8 within its tolerance
    for row in rows:
        limit = 0.01 if row["variant"] == "engine-int8" else 1e-4
        assert row["rms_vs_baseline"] <= limit, row


def test_bench_denoise_table_and_tiles(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(
        capsys,
        "--sizes",
        "40",
        "--batches",
        "1",
        "--repeat",
        "1",
        "--variants",
        "eager,engine-fp32",
        "--memory-limit",
        str(64 * 64 * 896),
    )
    assert "| 40 | 1 | engine-fp32 |" in out


def test_bench_denoise_refuses_an_unknown_variant() -> None:
    parser = argparse.ArgumentParser()
    bench_denoise.add_arguments(parser)
    with pytest.raises(SystemExit, match="unknown variant"):
        bench_denoise.run(parser.parse_args(["--variants", "eager,fast"]))


def test_add_arguments_reuses_flags_the_bench_parser_has() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cuda")
    bench_denoise.add_arguments(parser)  # no conflict
    assert parser.parse_args([]).device == "cuda"


MACHINE = {
    "cpu": "cpu",
    "cpus": 2,
    "torch": "2",
    "torch_threads": 2,
    "device": "cpu",
    "load_average_before": 0.0,
    "load_average_after": 0.0,
}


def _oom_at_batch_2(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > 1:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return x[:, 1]


def _scripted_oom(x: torch.Tensor) -> torch.Tensor:
    # what a TorchScript module raises for the allocator's OutOfMemoryError (pytorch#148642)
    raise RuntimeError(
        "The following operation failed in the TorchScript interpreter.\n"
        "RuntimeError: CUDA out of memory. Tried to allocate 8.00 GiB"
    )


def test_a_variant_out_of_memory_is_reported_and_the_others_timed() -> None:
    args = argparse.Namespace(repeat=2, seed=0)
    variants = {"eager": lambda x: x[:, 1], "big": _oom_at_batch_2, "script": _scripted_oom}
    setup = dict.fromkeys(variants, 0.0)
    stacks = torch.rand(2, 3, 8, 8)
    rows = bench_denoise._time_case(variants, setup, stacks[:1], torch.device("cpu"), args)
    assert [r.get("error") for r in rows] == [None, None, "out of memory"]
    assert rows[1]["rms_vs_baseline"] == 0 and rows[1]["speedup_min"] > 0
    rows += bench_denoise._time_case(variants, setup, stacks, torch.device("cpu"), args)
    assert [(r["batch"], r.get("error")) for r in rows[3:]] == [
        (2, None),
        (2, "out of memory"),
        (2, "out of memory"),
    ]
    table = bench_denoise._table({"command": "c", "machine": MACHINE, "results": rows})
    assert "| 8 | 2 | big | out of memory | out of memory |" in table
    # the baseline ran out: the others are timed, with nothing to compare against
    alone = bench_denoise._time_case(
        {"big": _oom_at_batch_2, "eager": lambda x: x[:, 1]},
        setup,
        stacks,
        torch.device("cpu"),
        args,
    )
    assert alone[0]["error"] == "out of memory"
    assert alone[1]["ms_per_slice_min"] > 0 and alone[1]["speedup_min"] is None
    assert "| 8 | 2 | eager |" in bench_denoise._table(
        {"command": "c", "machine": MACHINE, "results": alone}
    )


def test_other_errors_still_end_the_run() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench_denoise._time_case(
            {"eager": broken},
            {"eager": 0.0},
            torch.rand(1, 3, 8, 8),
            torch.device("cpu"),
            argparse.Namespace(repeat=1, seed=0),
        )


def test_compile_keeps_a_graph_per_case() -> None:
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    before = getattr(dynamo, name)
    context, note = bench_denoise._recompile_limit(12)
    with context:
        assert getattr(dynamo, name) == max(12, before)
    assert getattr(dynamo, name) == before
    assert f"torch._dynamo.config.{name} {before} -> {max(12, before)}" in note


def test_each_int8_variant_calibrates_as_a_fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # The set-up column is what a fresh process pays: an int8 engine already calibrated in this
    # process (workers.denoise's cache) must not make the bench's int8 set-up look free.
    import workers.denoise as denoise

    denoise.load_denoiser(None, "cpu", precision="int8")  # the cache now holds the default
    calls: list[str] = []
    real = denoise.quantize_int8

    def counted(module: torch.nn.Module, arch: str, depth: int) -> object:
        calls.append(arch)
        return real(module, arch, depth)

    monkeypatch.setattr(denoise, "quantize_int8", counted)
    path = denoise.default_artifact_path("cpu")
    bench_denoise._build("engine-int8", path, torch.device("cpu"), None)
    bench_denoise._build("engine-int8", path, torch.device("cpu"), None)
    assert calls == ["tomogan", "tomogan"]
