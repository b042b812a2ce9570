"""The per-geometry state of a reconstructor, built once per (theta, center, cols) and shared
between the thread that reconstructs and one that prepares the next scan's geometry ahead of it.

Both FBP methods keep what depends only on the geometry (the direct method's cos/sin terms, the
gridding method's spreading matrix: up to hundreds of MB and seconds to build) in a
`GeometryCache`. `prepare` on a reconstructor fills it from another thread while the scan's
projections arrive, so the scan's first batch finds its geometry ready.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np
import torch

V = TypeVar("V")
# builds a geometry from (theta as a float64 CPU tensor, center, cols)
Build = Callable[[torch.Tensor, float, int], V]


def geometry_key(theta: np.ndarray, center: float, cols: int) -> tuple[int, float, bytes]:
    """The cache key of (theta as float64, center, cols): equal angles give equal keys, so
    `prepare` and `reconstruct` must be handed the same angles (the worker rounds them to
    float32 for both)."""
    return cols, float(center), np.ascontiguousarray(theta, dtype=np.float64).tobytes()


def check_geometry(theta: torch.Tensor, center: float, cols: int) -> None:
    """ValueError naming the offender unless (theta, center, cols) is a geometry that can be
    built: finite angles and center, at least one column."""
    if cols < 1:
        raise ValueError(f"cols={cols}: a detector has at least one column")
    if not math.isfinite(center):
        raise ValueError(f"center={center} is not a finite number of pixels")
    if not bool(torch.isfinite(theta).all()):
        raise ValueError("theta holds non-finite angles")


class GeometryCache(Generic[V]):
    """A bounded LRU of built geometries that builds each key at most once at a time.

    Threading: any thread may call `get` and `prepare`; `for_reconstruct` is for the thread
    that reconstructs (it marks the geometry in use). A key is built by the first thread that
    needs it, outside the lock; a thread that needs a key being built waits for that build and
    never starts a second one. An entry is inserted only once its build has returned, so nobody
    sees a half-built geometry; a build that raises caches nothing, and the next caller builds
    afresh.

    Bound: `capacity` entries (>= 2), plus at most one being built per thread. Eviction is
    least recently used first, a `prepare` counting as a use, with one exception: the key
    most recently got with `use=True` (the geometry of the scan the reconstructing thread is
    on) is pinned until `release`, so preparing later scans' geometries never takes the one a
    scan in progress uses (its next batch would build it again). The owner releases the pin
    when the scan ends; until then one fewer prepared geometry fits.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError(
                f"capacity={capacity}: a geometry cache needs at least 2 entries "
                "(the one in use and one prepared)"
            )
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._building: dict[Hashable, threading.Event] = {}
        self._in_use: Hashable | None = None
        self._builds = 0

    @property
    def builds(self) -> int:
        """Geometries built so far (by any thread): what a reconstruct that found its geometry
        prepared did not add to."""
        return self._builds

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def for_reconstruct(
        self, theta: torch.Tensor, center: float, cols: int, build: Build[V], device: torch.device
    ) -> V:
        """The geometry for the owning thread's `reconstruct`: cached, being built by another
        thread (waited for), or built now; pinned until `release`. `theta` on the CPU costs
        no device synchronisation: the key is computed on the host."""
        theta64 = _host_angles(theta)
        value, _ = self.get(
            geometry_key(theta64.numpy(), center, cols),
            lambda: build(theta64, center, cols),
            use=True,
        )
        used_on_current_stream(value, device)
        return value

    def prepare(
        self, theta: torch.Tensor, center: float, cols: int, build: Build[V], device: torch.device
    ) -> bool:
        """Build the geometry `for_reconstruct` will want, from any thread; True if this call
        built it. Its device work is finished before other threads can see it."""
        check_geometry(theta, center, cols)
        if theta.numel() == 0:
            return False
        theta64 = _host_angles(theta)

        def finished() -> V:
            value = build(theta64, center, cols)
            finish_on_device(device)
            return value

        return self.get(geometry_key(theta64.numpy(), center, cols), finished, use=False)[1]

    def release(self) -> None:
        """The reconstructing thread is done with its geometry (its scan ended): unpin it, so
        it is evicted in its turn like any other."""
        with self._lock:
            self._in_use = None

    def get(self, key: Hashable, build: Callable[[], V], use: bool) -> tuple[V, bool]:
        """The entry for `key`, built by `build()` if nobody has (or is building it); and
        whether this call built it. `use`: the caller reconstructs with it now (pins it
        against eviction until `release` or another key is used)."""
        while True:
            with self._lock:
                if use:
                    self._in_use = key
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key], False
                pending = self._building.get(key)
                if pending is None:
                    done = self._building[key] = threading.Event()
                    break
            pending.wait()  # built by another thread: look again (it may have failed)
        try:
            value = build()
        except BaseException:
            with self._lock:
                del self._building[key]
            done.set()
            raise
        with self._lock:
            self._entries[key] = value
            self._builds += 1
            del self._building[key]
            self._evict()
        done.set()
        return value, True

    def _evict(self) -> None:
        """Drop least recently used entries beyond `capacity`, never the one in use."""
        for key in list(self._entries):
            if len(self._entries) <= self.capacity:
                return
            if key != self._in_use:
                del self._entries[key]


def _host_angles(theta: torch.Tensor) -> torch.Tensor:
    """(angles,) float64 on the CPU, as keys and builds take them: a copy from the device (and
    a wait for it) only when `theta` is there."""
    return theta.detach().reshape(-1).to("cpu", torch.float64)


def finish_on_device(device: torch.device) -> None:
    """Wait until the calling thread's queued work on `device` is done. A geometry built on one
    thread's CUDA stream and used on another's must be complete before it is shared."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def used_on_current_stream(value: object, device: torch.device) -> None:
    """On CUDA, tell the caching allocator that every tensor of the (dataclass) geometry `value`
    is used on the calling thread's current stream: if another thread evicts and frees it, its
    memory is not reused before that stream's queued work is done."""
    if device.type != "cuda":
        return
    stream = torch.cuda.current_stream(device)
    pending = [value]
    with torch.inference_mode():  # record_stream counts as an in-place op on inference tensors
        while pending:
            item = pending.pop()
            if isinstance(item, torch.Tensor):
                item.record_stream(stream)
            elif dataclasses.is_dataclass(item) and not isinstance(item, type):
                pending.extend(getattr(item, field.name) for field in dataclasses.fields(item))
