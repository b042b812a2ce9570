"""ZeroMQ CURVE encryption and authentication for the ingest and publisher sockets.

With `security.server_secret_key` set, both service sockets are CURVE servers and only clients
whose public key file is in `security.allowed_clients` complete the handshake: an unknown client
can neither push projections nor subscribe to slices. Keys are ZeroMQ certificate files made by
`tomocast keys generate DIR --name NAME` (NAME.key public, NAME.key_secret secret).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from service.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs: its own key pair and the server's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, client_secret_file: Path, server_public_file: Path) -> ClientKeys:
        public, secret = _load(client_secret_file, need_secret=True)
        server_public, _ = _load(server_public_file, need_secret=False)
        return cls(public, secret, server_public)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.curve_serverkey = self.server_public


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes

    @classmethod
    def from_file(cls, secret_file: Path) -> ServerKeys:
        public, secret = _load(secret_file, need_secret=True)
        return cls(public, secret)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        socket.curve_server = True
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def start_authenticator(context: zmq.Context[Any], allowed_clients: Path) -> ThreadAuthenticator:
    """Accept CURVE clients whose public key file is in `allowed_clients`, nobody else."""
    if not allowed_clients.is_dir():
        raise ConfigError(
            f"security.allowed_clients={allowed_clients} is not a directory of "
            "client public key files"
        )
    keys = sorted(allowed_clients.glob("*.key"))
    if not keys:
        log.warning(
            "security.allowed_clients=%s holds no *.key file: no client can connect",
            allowed_clients,
        )
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("service.security.zap"))
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(allowed_clients))
    log.info("CURVE on: %d allowed client key(s) in %s", len(keys), allowed_clients)
    return authenticator


def generate_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, give it to peers) and NAME.key_secret (keep it private)."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (directory / f"{name}{suffix}").exists():
            raise ConfigError(f"{directory / (name + suffix)} exists: refusing to overwrite a key")
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key file {path}: {exc}") from None
    if need_secret and not secret:
        raise ConfigError(f"{path} holds no secret key: use the .key_secret file")
    return public, secret or b""


def add_commands(
    command: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser],
) -> None:
    """`tomocast keys generate DIR --name NAME`."""
    keys = command("keys", cmd_keys, "CURVE key pairs for the ingest and publisher sockets")
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("directory", type=Path)
    keys.add_argument(
        "--name", default="server", help="key name: 'server' for the service, any name per client"
    )


def cmd_keys(args: argparse.Namespace) -> int:
    public, secret = generate_keys(args.directory, args.name)
    sys.stdout.write(f"public key: {public}\nsecret key: {secret} (keep it private)\n")
    return 0
