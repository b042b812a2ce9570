"""The web viewer's HTTP side: the page, its static files, a WebSocket per browser, a status.

`create_app` builds the Starlette app; its lifespan starts and stops the hub thread. `run_web`
serves it in the foreground (`tomocast view --web`); `WebViewer` serves it from a background
thread (tests, tools).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.clients.web.broadcast import Broadcaster, ClientQueue
from service.clients.web.frames import dumps
from service.clients.web.hub import SliceHub
from service.errors import ConfigError
from service.security import ClientKeys

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class WebSettings:
    """What `tomocast view --web` is told; plain data."""

    connect: str = "tcp://127.0.0.1:5556"  # the service's publisher
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port
    max_size: int = 1024  # slices are binned to at most this many pixels a side for display
    cache_mb: int = 1024  # the current scan is kept for the slider within this budget
    # Live slices waiting per browser before the oldest are dropped: 32 MiB is about a quarter
    # second of a 1 Gb/s link, and a burst of 16 slices of 1024 x 512 px.
    client_queue_bytes: int = 32 << 20
    curve: ClientKeys | None = None  # when the service's publisher requires CURVE
    previews: bool = False  # also show topic `preview` while scans arrive (`--previews`)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is not a TCP port (0..65535)")
        if self.max_size < 16 or self.cache_mb < 1 or self.client_queue_bytes < 1:
            raise ConfigError(
                f"max_size={self.max_size} must be >= 16, cache_mb="
                f"{self.cache_mb} >= 1 and client_queue_bytes="
                f"{self.client_queue_bytes} >= 1"
            )


def create_app(settings: WebSettings) -> Starlette:
    broadcaster = Broadcaster(settings.connect, settings.client_queue_bytes)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub = SliceHub(
            settings.connect,
            broadcaster,
            asyncio.get_running_loop(),
            max_size=settings.max_size,
            cache_bytes=settings.cache_mb << 20,
            curve=settings.curve,
            previews=settings.previews,
        )
        hub.start()
        try:
            yield
        finally:
            await asyncio.to_thread(hub.stop)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def status(request: Request) -> Response:
        return JSONResponse(json.loads(dumps(broadcaster.status())))

    async def browser(websocket: WebSocket) -> None:
        await websocket.accept()
        client = broadcaster.connect()
        sender = asyncio.create_task(_send(websocket, client))
        try:
            while True:
                text = await websocket.receive_text()
                try:
                    request = json.loads(text)
                except ValueError:
                    log.debug("browser %d sent non-JSON %r: ignored", client.id, text[:80])
                    continue
                if isinstance(request, dict):
                    broadcaster.handle(client, request)
        except WebSocketDisconnect:
            pass
        finally:
            broadcaster.disconnect(client)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/status", status),
            WebSocketRoute("/ws", browser),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )


async def _send(websocket: WebSocket, client: ClientQueue) -> None:
    """Drain one browser's queue; after a drop, tell the browser how many it has lost."""
    reported = 0
    while True:
        message = await client.get()
        if isinstance(message, bytes):
            await websocket.send_bytes(message)
        else:
            await websocket.send_text(message)
        if client.dropped != reported:
            reported = client.dropped
            await websocket.send_text(
                dumps({"kind": "stats", "dropped": reported, "sent": client.sent})
            )


def _server(settings: WebSettings) -> tuple[uvicorn.Server, socket.socket]:
    """A uvicorn server and its listening socket, bound now so that port 0 resolves and
    connections made before the loop runs wait in the backlog."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}): "
            "choose another --port or --host"
        ) from None
    sock.listen(128)
    # Slices are float32 noise to deflate: compression costs CPU and saves little (docs/viewer.md).
    config = uvicorn.Config(
        create_app(settings),
        log_level="warning",
        lifespan="on",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
    )
    return uvicorn.Server(config), sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"


def run_web(args: argparse.Namespace) -> int:
    """`tomocast view --web`: serve until ^C."""
    if args.out is not None or args.png is not None:
        raise ConfigError(
            "--web does not write files: run a second `tomocast view --out ...` beside it"
        )
    from service.cli import client_keys

    settings = WebSettings(
        connect=args.connect,
        host=args.host,
        port=args.port,
        max_size=args.max_size,
        curve=client_keys(args),
        previews=bool(getattr(args, "previews", False)),
    )
    server, sock = _server(settings)
    sys.stderr.write(f"web viewer on {_url(sock)} (publisher {settings.connect})\n")
    server.run(sockets=[sock])
    return 0


class WebViewer:
    """The web viewer served from a background thread. `start()` and `stop()` from the owning
    thread; `url` is valid after `start()`."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        server, sock = _server(self.settings)
        self.url = _url(sock)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="web-viewer", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join()

    def __enter__(self) -> WebViewer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
