"""One pipeline stage on its own thread: the lifecycle every stage shares, written once.

    start()         the thread begins `_run`
    stop()          asks it to end: a sentinel on its input (`_signal_stop`), never a wait
    join(timeout)   whether it has ended within `timeout` s (True if it never started)
    alive           whether the thread runs (the service's /healthz reads it)

and the one guarded boundary where an unexpected exception becomes one log line and
`tomocast_errors_total{stage}`: `guarded` around each unit of work (a message, a scan, an
archive item), so a bad one costs that unit and the stage goes on, and around `_run` itself, so
a stage that dies says so once before `alive` turns false. Expected failures stay typed and are
handled where they happen (a `ProtocolError` is a rejected message, not an error).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from service.metrics import Metrics

log = logging.getLogger(__name__)


class StageThread:
    """Base of ingest, prepare, reconstruct (`worker`), publish and archive.

    `stage` names the thread and the errors counter's label. `start`, `stop` and `join` are
    called from the owner's thread; `guarded` and `_run` run on the stage's.
    """

    def __init__(self, stage: str, metrics: Metrics) -> None:
        self.stage = stage
        self.metrics = metrics
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name=stage, daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the stage to end once what it must finish is done; returns at once."""
        self._stopping.set()
        self._signal_stop()

    def join(self, timeout: float | None = None) -> bool:
        """Whether the thread has ended (or was never started) within `timeout` s."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def guarded(
        self, what: str, work: Callable[..., object], *args: Any, traceback: bool = True
    ) -> bool:
        """Run one unit of work, `work(*args)`; False when it raised (logged with `what`,
        counted)."""
        try:
            work(*args)
        except Exception as exc:  # the one place: an unexpected error costs one unit of work
            self.error(what, exc, traceback=traceback)
            return False
        return True

    def error(self, what: str, exc: BaseException, *, traceback: bool = True) -> None:
        """One log line and `tomocast_errors_total{stage}` for an error that cost `what`."""
        log.error(
            "%s failed in the %s stage: %s: %s",
            what,
            self.stage,
            type(exc).__name__,
            exc,
            exc_info=exc if traceback else None,
        )
        self.metrics.errors.labels(self.stage).inc()

    def _signal_stop(self) -> None:
        """Wake the thread so it sees `stopping` (put a sentinel on its input). Default:
        nothing, for a stage whose end of stream comes from upstream or that polls."""

    def _run(self) -> None:
        raise NotImplementedError

    def _main(self) -> None:
        self.guarded(f"the {self.stage} thread", self._run)
