"""Helpers shared by test modules: polling with a deadline, a function on a thread, the real
gridding FBP with its geometry builds held at a gate, and the cuDNN flags baked into a trace."""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import torch

from service.events import ScanEnded
from workers.gridding import GriddingFBP


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)  # a polling interval with a deadline, not synchronisation


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run `target` on a thread; its result (or exception) lands in the list."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(target())
        except Exception as exc:  # handed to the test to assert on
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


class GatedGridding(GriddingFBP):
    """The real gridding FBP on the CPU, its geometry builds recorded by centre (`built`) and,
    while `gate` is clear, held there: all of them, or only those at a centre in `held`."""

    def __init__(self, held: Container[float] | None = None) -> None:
        super().__init__("cpu")
        self.gate = threading.Event()
        self.gate.set()
        self.held = held
        self.built: list[float] = []

    def _build(self, theta64: torch.Tensor, center: float, cols: int) -> Any:
        self.built.append(center)
        if self.held is None or center in self.held:
            assert self.gate.wait(60)
        return super()._build(theta64, center, cols)


def cudnn_flags(path: Path) -> set[tuple[str, ...]]:
    """The (benchmark, deterministic, cudnn_enabled, allow_tf32) constants a trace baked into
    each convolution of the TorchScript file at `path`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        graph = str(torch.jit.load(str(path)).inlined_graph)
    constants = dict(re.findall(r"%([\w.]+) : bool = prim::Constant\[value=(\d)\]", graph))
    found = set()
    for line in graph.splitlines():
        if "aten::_convolution(" in line:
            names = re.findall(r"%([\w.]+)", line.split("aten::_convolution(")[1])
            found.add(tuple(constants.get(name, "?") for name in names[-4:]))
    return found


def tally(message: Any, slices: set[tuple[str, int]], events: dict[str, ScanEnded]) -> None:
    """File a published message (`service.client.Published`): a slice's (scan_id, index) into
    `slices`, a scan's ending event into `events` by scan_id (`ScanStarted` is skipped)."""
    assert message is not None, "the service went quiet before finishing"
    if message.topic == "slice":
        slices.add((message.header["scan_id"], message.header["index"]))
    elif isinstance(event := message.event(), ScanEnded):
        events[event.scan_id] = event


# `tomocast serve` on free loopback ports, on the CPU: what the end-to-end tests start
SERVE_LOOPBACK = (
    "serve",
    "--ingest",
    "tcp://127.0.0.1:*",
    "--publish",
    "tcp://127.0.0.1:*",
    "--metrics-port",
    "0",
    "--device",
    "cpu",
)
