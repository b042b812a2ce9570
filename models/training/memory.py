"""Peak memory of a block of work: CUDA's allocator peak on a GPU, the process's resident set
above its starting level on the CPU (sampled, since the CPU allocator keeps no peak)."""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path
from types import TracebackType

import torch

_STATM = Path("/proc/self/statm")
SAMPLE_SECONDS = 0.005


def resident_bytes() -> int:
    """This process's resident set now (Linux), else its lifetime peak (ru_maxrss)."""
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager; `peak_bytes` after exit, `what` says what was measured.

    Threading: on the CPU it runs one sampling thread for the duration of the block.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.what = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.what = "torch.cuda.max_memory_allocated above the start"
        else:
            self._start = resident_bytes()
            self.what = (
                f"process resident set above the start, sampled every {SAMPLE_SECONDS * 1e3:g} ms"
            )
            self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak_bytes = max(self.peak_bytes, resident_bytes() - self._start)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, resident_bytes() - self._start)
