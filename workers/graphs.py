"""CUDA graphs of a network, one per input shape: the launch overhead of its ~30 kernels, paid
once per shape instead of once per batch.

The pipeline keeps its batch shape fixed within a scan (every batch but a scan's last has
`batch_rows` slices of the same size), so a handful of shapes covers a run. A graph replays into
the same output buffer each time, so `run` hands back a tensor that the next `run` overwrites:
the caller must consume (copy or transform) it first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # what torch.cuda.graph_pool_handle returns

log = logging.getLogger(__name__)

# A scan's batches come in up to three shapes (the first, short by the denoiser's halo; the
# full ones; the last): room for two scan geometries and some slack. The graphs share one memory
# pool, so each one beyond the first holds only its input and output buffers.
MAX_GRAPHS = 8


class GraphCache:
    """Captures `network` per input shape on first use, replays it after.

    Threading: owned by the engine's thread. Captured on the caller's device, on a side stream
    (as CUDA requires), after one eager run that lets cuDNN pick its algorithms (autotuning
    inside a capture is not allowed). All graphs capture into one memory pool: they replay one
    after another on one stream and each keeps its own input and output alive, so their
    activations may share memory (a pool per graph would keep every graph's peak activations:
    ~30 GB for one fp16 TomoGAN graph of 16 x 2048^2). A failed capture turns graphs off for
    good (logged as an error; the caller's stream is restored, the partial graph's memory freed)
    and the call runs eagerly, which raises if it really does not fit. Running out of memory
    during a capture counts as a failed capture: TorchScript reports it as a plain RuntimeError.
    """

    def __init__(
        self, network: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = MAX_GRAPHS
    ) -> None:
        self._network = network
        self._max_graphs = max_graphs
        self._graphs: OrderedDict[
            tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]
        ] = OrderedDict()
        self._pool: _POOL_HANDLE | None = None
        self.disabled = False

    @property
    def shapes(self) -> int:
        """Graphs held now."""
        return len(self._graphs)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self._network(x)
        key = (*x.shape, *x.stride(), x.dtype.itemsize)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            if entry is None:
                self.disabled = True
                self._graphs.clear()
                return self._network(x)
            self._graphs[key] = entry
            if len(self._graphs) > self._max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(
        self, x: torch.Tensor
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None:
        static_in = torch.empty_like(x)
        static_in.copy_(x)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self._network(static_in)  # cuDNN autotuning and lazy init happen outside capture
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph ends the capture before it restores the stream: when ending raises,
        # the caller would be left on the capture stream, out of order with its other work.
        caller = torch.cuda.current_stream(x.device)
        try:
            # thread_local: the ingest thread keeps normalising on the GPU during the capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_out = self._network(static_in)
        except RuntimeError as exc:  # an op that cannot be captured, or no memory: no graphs
            torch.cuda.set_stream(caller)
            del graph
            torch.cuda.empty_cache()
            log.error(
                "CUDA graph capture failed for input %s; the network runs eagerly from now on: %s",
                tuple(x.shape),
                str(exc).splitlines()[0],
            )
            return None
        return graph, static_in, static_out
