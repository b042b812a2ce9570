"""HTTP endpoint for operators: /metrics (Prometheus), /healthz (alive), /readyz (ready), and
the control endpoint `POST /scans/{scan_id}/center` (`service.live.CenterControl`).

/healthz answers 200 while the process can do its job (an orchestrator restarts it otherwise);
/readyz answers 200 only once the model is loaded, the sockets are bound and the device is warm,
and 503 with the reason before that and while stopping (a load balancer or the DAQ waits).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from service.errors import ConfigError

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


class Control(Protocol):
    """A control endpoint under the metrics port (`service.live.CenterControl`): a WSGI app
    for the paths it `handles`, called on the request threads."""

    def handles(self, path: str) -> bool: ...

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]: ...


def _always_alive() -> tuple[bool, str]:
    return True, "ok"


# Requests are served by a fixed pool of threads; connections beyond these (a scraper, a
# probe, a client that connects and never sends) are closed at once instead of each taking a
# thread, and a connection that sends nothing is closed after REQUEST_TIMEOUT_S.
HTTP_THREADS = 4
HTTP_PENDING = 16  # accepted connections waiting for a thread
REQUEST_TIMEOUT_S = 10.0


class _PooledServer(WSGIServer):
    """A WSGI server on a bounded thread pool: at most HTTP_THREADS requests run at once and
    HTTP_PENDING more wait; a connection beyond those is closed without an answer."""

    request_queue_size = 64  # the listen backlog: a burst of connections is accepted, not retried

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # before binding: a failed bind calls server_close
        self._pool = ThreadPoolExecutor(HTTP_THREADS, thread_name_prefix="health-request")
        self._slots = threading.BoundedSemaphore(HTTP_THREADS + HTTP_PENDING)
        self.refused = 0  # connections closed unanswered
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # socketserver's boundary: one broken connection, reported there
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # a connection that sends nothing does not hold its thread

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not events
        pass


class HealthServer:
    """Serves the three endpoints from a daemon thread, requests on a bounded pool of threads
    (`_PooledServer`).

    The port is bound at construction, so `port` is known (and a busy port reported) before
    `start()`. `ready` and `alive` are called on the request threads, once per request: they
    must be cheap and thread-safe, and return (ok, reason) where the reason is the body.
    `start`/`stop` are called from the owner's thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: Check,
        alive: Check = _always_alive,
        control: Control | None = None,
    ) -> None:
        self._metrics_app = make_wsgi_app(registry)
        self._control = control
        self._ready = ready
        self._alive = alive
        try:
            self._server = make_server(
                host, port, self._app, server_class=_PooledServer, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics.host={host} metrics.port={port}: cannot listen "
                f"({exc.strerror or exc}); choose another --metrics-port "
                "(0 picks a free one)"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # shutdown() waits for serve_forever to notice, so it would hang if never started.
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path in ("/healthz", "/readyz"):
            ok, why = (self._alive if path == "/healthz" else self._ready)()
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable", why + "\n")
        if self._control is not None and self._control.handles(path):
            return self._control(environ, start_response)
        return _text(start_response, "404 Not Found", "try /metrics, /healthz or /readyz\n")


def _text(start_response: Callable[..., Any], status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]
