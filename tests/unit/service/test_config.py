"""Settings: TOML file, then TOMOCAST_* environment, then flags; clear errors; --help lists all."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import build_parser
from service.config import Settings, load_settings, overrides_from_args
from service.errors import ConfigError


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tomocast.toml"
    path.write_text(text)
    return path


def test_defaults_bind_loopback_and_match_the_design() -> None:
    settings = load_settings()
    assert settings.ingest.endpoint == "tcp://127.0.0.1:5555"
    assert settings.publish.endpoint == "tcp://127.0.0.1:5556"
    assert (settings.metrics.host, settings.metrics.port) == ("127.0.0.1", 9876)


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(
        tmp_path,
        "[worker]\nbatch_rows = 4\ndevice = 'cpu'\n[ingest]\nrcvhwm = 10\nmax_live_scans = 2\n",
    )
    monkeypatch.setenv("TOMOCAST_INGEST__RCVHWM", "20")
    monkeypatch.setenv("TOMOCAST_INGEST__MAX_LIVE_SCANS", "3")
    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(config),
            "--ingest.max_live_scans",
            "7",
            "--ingest",
            "tcp://127.0.0.1:6000",
        ]
    )
    settings = load_settings(args.config, overrides_from_args(args))
    assert settings.worker.batch_rows == 4  # file only
    assert settings.ingest.rcvhwm == 20  # environment beats the file
    assert settings.ingest.max_live_scans == 7  # flag beats the environment
    assert settings.ingest.endpoint == "tcp://127.0.0.1:6000"  # fixed flag


def test_invalid_values_name_the_setting(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "[worker]\ndevice = 'tpu'\n")
    with pytest.raises(ConfigError, match=r"worker\.device.*tpu"):
        load_settings(config)
    with pytest.raises(ConfigError, match=r"publish\.endpoint"):
        load_settings(None, {"publish": {"endpoint": "localhost:5556"}})
    with pytest.raises(ConfigError, match=r"ingest\.bogus"):
        load_settings(None, {"ingest": {"bogus": 1}})


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_serve_help_shows_every_setting_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for section, field in Settings.model_fields.items():
        model = field.annotation
        names = getattr(model, "model_fields", None)
        if names is None:
            assert f"--{section.replace('_', '-')}" in text
            continue
        for name, sub in names.items():
            assert f"--{section}.{name}" in text
            assert f"(default: {sub.default})" in text
    for flag in ("--ingest", "--publish", "--metrics-port", "--model", "--device"):
        assert f"{flag} " in text


def test_denoiser_settings_moved_to_model_and_old_keys_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_toml(tmp_path, "[worker]\ndenoise_precision = 'fp32'\n")
    monkeypatch.setenv("TOMOCAST_WORKER__DENOISE_MEMORY_BYTES", str(64 << 20))
    with caplog.at_level("WARNING", logger="service.config"):
        settings = load_settings(config)
    assert (settings.model.precision, settings.model.memory_bytes) == ("fp32", 64 << 20)
    assert not hasattr(settings.worker, "denoise_precision")
    warned = caplog.text
    assert "worker.denoise_precision is deprecated: use model.precision" in warned
    assert "TOMOCAST_MODEL__MEMORY_BYTES" in warned
    assert load_settings(None, {"model": {"precision": "int8"}}).model.precision == "int8"


def test_a_moved_key_set_twice_is_refused(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path, "[worker]\ndenoise_precision = 'fp32'\n[model]\nprecision = 'int8'\n"
    )
    with pytest.raises(ConfigError, match=r"both set: keep model\.precision"):
        load_settings(config)


def test_an_unknown_section_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOMOCAST_WROKER__DEVICE", "cpu")  # a typo: the setting would not apply
    with pytest.raises(ConfigError, match=r"TOMOCAST_WROKER__DEVICE.*'wroker'"):
        load_settings()
    monkeypatch.delenv("TOMOCAST_WROKER__DEVICE")
    monkeypatch.setenv("TOMOCAST_SOAK_SCANS", "3")  # not a setting: no section delimiter
    assert load_settings().worker.device == "auto"
