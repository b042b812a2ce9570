"""Rows of a reconstructed scan on the device: the angles as reconstructors take them, and the
window of reconstructed rows the denoiser still needs.

Used by the service's reconstruct loop (`service.reconstruct`) and its geometry preparer
(`service.prepare`), which must hand reconstructors the same angle tensor.
"""

from __future__ import annotations

import numpy as np
import torch


def theta_tensor(theta: np.ndarray) -> torch.Tensor:
    """A scan's angles as the reconstruct loop hands them to the reconstructor: float32 on the
    CPU, where reconstructors read them to key and build their geometry (one on the device
    would be copied back, with a wait, every batch). The geometry preparer hands over the same
    values, since reconstructors cache geometry by them."""
    return torch.as_tensor(theta, dtype=torch.float32, device="cpu")


class RowWindow:
    """The reconstructed rows [`first`, `stop`) of a scan, in a (capacity, H, W) buffer on the
    device: each batch is written after the rows still needed, and rows no denoise batch needs
    any more are dropped from the front by sliding the kept ones down.

    Threading and ownership: one thread's (the reconstruct loop's); on CUDA only its compute
    stream touches the buffer (allocation included), so reuse needs no events. Views of it
    change when the next batch is written: hand `clone`s, never views, to anything that reads
    them later (a copy stream, zero-copy sends, a queue).
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self.first = 0
        self.stop = 0

    def begin(self, capacity: int, height: int, width: int, device: torch.device) -> None:
        """Empty, at row 0 of a scan; the buffer is kept from the last scan when it fits."""
        shape = (capacity, height, width)
        if (
            self._buffer is None
            or tuple(self._buffer.shape) != shape
            or self._buffer.device != device
        ):
            self._buffer = None  # the old one goes back to the allocator first
            self._buffer = torch.empty(shape, dtype=torch.float32, device=device)
        self.first = self.stop = 0

    def drop_before(self, row: int) -> None:
        """Rows before `row` are no longer needed."""
        assert self._buffer is not None
        row = min(max(row, self.first), self.stop)
        kept = self.stop - row
        if row > self.first and kept:
            # source and destination may overlap: copy through a temporary (a few rows)
            self._buffer[:kept] = self._buffer[row - self.first : self.stop - self.first].clone()
        self.first = row

    def append(self, rows: torch.Tensor) -> torch.Tensor:
        """Write `rows` (n, H, W) after the last row held; returns the window's view of them."""
        assert self._buffer is not None
        start, count = self.stop - self.first, rows.shape[0]
        if start + count > self._buffer.shape[0]:
            raise ValueError(
                f"{start} rows held + {count} new exceed the window's "
                f"{self._buffer.shape[0]}: drop rows first"
            )
        view = self._buffer[start : start + count]
        view.copy_(rows)
        self.stop += count
        return view

    @property
    def capacity(self) -> int:
        """Rows the buffer holds (0 before the first scan)."""
        return 0 if self._buffer is None else int(self._buffer.shape[0])

    def held(self) -> torch.Tensor:
        """The rows [`first`, `stop`) held, as one (stop - first, H, W) view."""
        assert self._buffer is not None
        return self._buffer[: self.stop - self.first]
