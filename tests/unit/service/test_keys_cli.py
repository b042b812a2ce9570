"""`tomocast keys generate`: a usable CURVE key pair, private secret, no silent overwrite."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from service.cli import main
from service.security import ClientKeys, ServerKeys


def test_generate_writes_a_loadable_pair_and_keeps_the_secret_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", str(tmp_path), "--name", "daq-01"]) == 0
    assert "daq-01.key_secret" in capsys.readouterr().out
    secret = tmp_path / "daq-01.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    server = ServerKeys.from_file(secret)
    client = ClientKeys.from_files(secret, tmp_path / "daq-01.key")
    assert len(server.public) == 40 and client.server_public == server.public


def test_generate_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate", str(tmp_path)]) == 0
    before = (tmp_path / "server.key_secret").read_bytes()
    assert main(["keys", "generate", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "server.key_secret").read_bytes() == before
