"""CUDA graphs of a network (workers.graphs.GraphCache): replays equal eager runs, a replay's
output is the caller's to copy, and a failed capture leaves the caller's stream and the results
as they would be eagerly. All need CUDA (skipped without it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.graphs import GraphCache

pytestmark = pytest.mark.gpu


class Capturable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * 2.0 + 1.0)


class HostSync(nn.Module):
    """Reads a value on the host mid-network: not capturable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.abs().max())


def test_replays_equal_eager_and_shapes_are_cached() -> None:
    network = Capturable().cuda()
    cache = GraphCache(network, max_graphs=2)
    for shape in ((2, 3, 16, 16), (1, 3, 8, 24), (2, 3, 16, 16), (4, 3, 8, 8)):
        x = torch.randn(shape, device="cuda")
        torch.testing.assert_close(cache.run(x).clone(), network(x), rtol=0, atol=0)
    assert cache.shapes == 2 and not cache.disabled  # bounded, least recently used dropped


def test_a_failed_capture_restores_the_stream_and_runs_eagerly() -> None:
    network = HostSync().cuda()
    cache = GraphCache(network)
    caller = torch.cuda.Stream()
    with torch.cuda.stream(caller):
        x = torch.randn(2, 3, 8, 8, device="cuda")
        out = cache.run(x)
        assert torch.cuda.current_stream() == caller
    assert cache.disabled and cache.shapes == 0
    torch.testing.assert_close(out, network(x), rtol=0, atol=0)
    torch.testing.assert_close(cache.run(x), network(x), rtol=0, atol=0)  # eager from now on
