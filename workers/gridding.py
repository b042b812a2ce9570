"""Filtered back-projection by gridding (a type-1 non-uniform FFT), in PyTorch, on any device.

Same geometry, units and filters as `workers.fbp.FBP`. Back-projecting the filtered projections
is a sum over angles and frequencies j of Q[j] exp(2 pi i j u / period), u each pixel's detector
position; by the Fourier-slice theorem that is a 2D inverse Fourier transform of the Q laid out
on polar lines. Each polar sample is spread onto a Cartesian grid 1.5x the slice with a
Kaiser-Bessel kernel, one 2D FFT brings the grid to the image, and dividing by the kernel's
transform undoes the spread (Beatty et al., IEEE TMI 24(6), 2005): O(angles N + N^2 log N) a
slice instead of the direct method's O(angles N^2).

Choices that make it the direct method's twin:
- the filtered projection is cut to the detector first, so a ray off it adds nothing (as in
  `FBP` and ASTRA);
- the frequencies run past Nyquist to 0.75 cycles a pixel, tapered by sinc^2, the transform of
  linear interpolation: that is `FBP`'s linear interpolation but for its spectral images beyond
  0.75. Slices come out 0.7% apart on phantoms, with the same noise and the same or lower error;
  stopping at Nyquist instead leaves them 2.3% apart and up to 4% worse against a phantom;
- the samples are 1/period apart, period being the smallest FFT length that holds every pixel's
  u with 10% to spare (as few samples as exactness allows), and symmetric in frequency, so real
  sinograms give real slices and two slices ride as the real and imaginary parts of one complex
  sinogram;
- the grid's checkerboard sign (see `SpreadingMatrix`) centres the image on the rotation axis,
  so the slice is a contiguous crop of the grid.

The spreading matrix (`workers.spreading`) depends on theta, center and cols only: it is built
once per geometry on the target device (by `prepare`, ahead of the data, when the service knows
the scan's geometry first) and applied with `embedding_bag`. On a GPU no step loops
in Python; on a CPU the sinogram stage goes a few MB of angles at a time to stay in cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.fbp_base import CachedGeometryFBP, circle_mask
from workers.filters import angle_weights, filter_response
from workers.spreading import SpreadingMatrix, kaiser_bessel_transform, kernel_beta

# Geometries one instance remembers: see GriddingFBP.matrix_bytes for what each one holds.
_GEOMETRY_CACHE_SIZE = 2
# Highest frequency gridded, cycles per detector pixel: past Nyquist (0.5), see the module doc.
_REACH = 0.75
# Spare room in the spectrum's period, as a fraction of cols (see _period).
_PERIOD_MARGIN = 0.1
# Bytes of FFT temporaries per step of the sinogram stage on a CPU (a few MB: cache-resident).
_CPU_STAGE_BYTES = 8 << 20


def fast_fft_length(n: int, even: bool = False) -> int:
    """The smallest n' >= n (even, with `even`) with no prime factor above 5: a fast FFT
    length."""
    step = 2 if even else 1
    size = n + n % 2 if even else n
    while True:
        rest = size
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += step


def _period(cols: int, low: float, high: float) -> int:
    """FFT length of the gridded spectrum for pixels at u in [low, high]: the detector's periodic
    images (+1 pixel of interpolation) stay clear of them, with 10% spare for the taper's tail."""
    return fast_fft_length(
        math.ceil(max(cols - low, high + 1, cols) + _PERIOD_MARGIN * cols), even=True
    )


@dataclass(frozen=True)
class _GriddingGeometry:
    spreading: SpreadingMatrix
    response: torch.Tensor  # (P//2 + 1,) float32 filter at the rfft frequencies of length P
    factor: torch.Tensor  # (A, 2J + 1, 1) complex64 a polar sample: weight, phase, sinc^2
    deapodize: torch.Tensor  # (N, N) float32: 1 / the kernel's transform, times the mask
    padded_size: int  # P, the filter's FFT length
    period: int  # the gridded spectrum's FFT length; frequencies j/period, |j| <= J
    crop: int  # first grid row and column of the slice


class GriddingFBP(CachedGeometryFBP[_GriddingGeometry]):
    """Filtered back-projection by gridding, satisfying
    `workers.protocols.PreparableReconstructor`.

    Threading: an instance is owned by one worker thread, which calls `reconstruct` and alone
    touches the work buffers; `prepare` may be called from any other thread at the same time
    (it only fills the geometry cache, `geometries`, which is thread-safe). The cache holds the
    spreading matrices of two (theta, center, cols) (`matrix_bytes` each; building one takes
    seconds on a CPU core and about twice the matrix's memory while it runs: docs/benchmarks.md,
    "Figures behind design choices"), plus one being built per thread. The
    least recently used (reconstructed or prepared) goes first, never the one the scan in
    progress uses: that stays pinned until the owner calls `release` at the scan's end. So while
    a scan runs, one prepared geometry fits beside its own: `prepare` the next scan's while its
    projections arrive, and its first batch does not wait for the build (another scan's
    prepared before then evicts it, and that first batch builds it again). Uses torch's
    intra-op threads. `width` (grid cells) and `oversampling` trade speed for accuracy: within
    1e-3 of the slice's peak of the exact sum by default, 5e-5 at 6 and 2.0
    (tests/unit/workers/test_gridding.py). `max_work_bytes` bounds the grids of one chunk of slices;
    None takes `workers.fbp.default_work_bytes` for the device: 256 MiB on a CPU (two slices a
    chunk at 2048 columns), 1/8 of the device's memory up to 8 GiB on CUDA.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        filter_name: str = "ramp",
        circle_mask: bool = False,
        width: int = 5,
        oversampling: float = 1.5,
        max_work_bytes: int | None = None,
    ) -> None:
        super().__init__(device, filter_name, circle_mask, max_work_bytes, _GEOMETRY_CACHE_SIZE)
        if not 2 <= width <= 12:
            raise ValueError(f"width={width}: choose a kernel width of 2 to 12 grid cells")
        if not 1.2 <= oversampling <= 4:
            raise ValueError(f"oversampling={oversampling}: choose 1.2 to 4")
        self.width, self.oversampling = width, oversampling
        self._buffers: dict[str, tuple[object, torch.Tensor]] = {}

    def grid_size(self, cols: int) -> int:
        """Side of the oversampled grid: even, FFT-friendly, and room for the slice."""
        return max(fast_fft_length(math.ceil(self.oversampling * cols), even=True), cols + 2)

    def matrix_bytes(self, angles: int, cols: int) -> int:
        """Size of an (angles, cols) spreading matrix, axis mid-detector: an int32 index and a
        float32 weight per tap, width^2 taps a polar sample, an int32 offset a grid point."""
        reach = (cols - 1) / math.sqrt(2)
        period = _period(cols, (cols - 1) / 2 - reach, (cols - 1) / 2 + reach)
        taps = angles * (2 * int(_REACH * period) + 1) * self.width**2
        return 8 * taps + 4 * self.grid_size(cols) ** 2

    def deapodization(self, cols: int, beta: float) -> torch.Tensor:
        """(cols, cols) float64: what undoes the spreading kernel's taper on the image (times
        the circle mask with `circle_mask`), for a grid of `grid_size(cols)`."""
        device, grid = self._device, self.grid_size(cols)
        pixel = torch.arange(cols, dtype=torch.float64, device=device) - cols // 2
        transform = kaiser_bessel_transform(pixel / grid, self.width, beta)
        deapodize = 1 / (transform[:, None] * transform[None, :])
        if self.circle_mask:
            deapodize = deapodize * circle_mask(cols, device)
        return deapodize

    def _build(self, theta64: torch.Tensor, center: float, cols: int) -> _GriddingGeometry:
        device, grid, half = self._device, self.grid_size(cols), cols // 2
        weights = torch.as_tensor(angle_weights(theta64.numpy()), device=device)[:, None]
        cos, sin = torch.cos(theta64.to(device))[:, None], torch.sin(theta64.to(device))[:, None]
        reach = (cols - 1) / 2 * float((cos.abs() + sin.abs()).max())  # farthest pixel's |u|
        period = _period(cols, center - 0.5 - reach, center - 0.5 + reach)
        most = int(_REACH * period)
        freq = torch.arange(-most, most + 1, dtype=torch.float64, device=device)
        shift = (center - 0.5) + (half - (cols - 1) / 2) * (cos - sin)  # u at the crop origin
        phase = torch.polar(torch.ones_like(shift * freq), 2 * math.pi * freq / period * shift)
        factor = weights * torch.sinc(freq / period) ** 2 / period * phase
        radius = freq * grid / period
        beta = kernel_beta(self.width, self.oversampling)
        spreading = SpreadingMatrix.build(
            (-radius * sin).flatten(), (radius * cos).flatten(), grid, self.width, beta
        )
        deapodize = self.deapodization(cols, beta)
        size, response = filter_response(self.filter_name, cols, device)
        return _GriddingGeometry(
            spreading,
            response,
            factor[..., None].to(torch.complex64),
            deapodize.float(),
            size,
            period,
            grid // 2 - half,
        )

    def _buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, cols: int = 0
    ) -> torch.Tensor:
        """A work buffer kept across calls, one per name: fresh multi-MB tensors are fresh pages
        from the OS each time. Padded ones are born zero and only their first `cols` are ever
        written, which keeps their tails zero: `cols` is part of what they are.

        On CUDA a buffer belongs to the pool of the stream that made it (the service's warm-up
        runs on the main thread's default stream, the worker on its compute stream), so each
        hand-out records the caller's current stream on it: when a buffer is replaced and
        freed, the allocator then waits for every stream that used it before reusing its
        memory. Recording costs no synchronisation."""
        tag = (shape, dtype, cols)
        kept = self._buffers.get(name)
        if kept is None or kept[0] != tag:
            kept = self._buffers[name] = (tag, torch.zeros(shape, dtype=dtype, device=self._device))
        buffer = kept[1]
        if buffer.is_cuda:
            with torch.inference_mode():  # record_stream counts as in-place on inference tensors
                buffer.record_stream(torch.cuda.current_stream(self._device))
        return buffer

    def _table(self, sinograms: torch.Tensor, geometry: _GriddingGeometry) -> torch.Tensor:
        """(B, A, C) line integrals, B even -> (A * (2J + 1), B) float32 rows: each polar
        sample's value for the B / 2 complex sinograms that pack slices 2k and 2k + 1."""
        batch, angles, cols = sinograms.shape
        pairs, size, period = batch // 2, geometry.padded_size, geometry.period
        most = (geometry.factor.shape[1] - 1) // 2  # the table's frequencies: -most .. most
        table = self._buffer("table", (angles, 2 * most + 1, pairs), torch.complex64)
        # on a CPU, a few MB of angles at a time: the FFTs' temporaries then stay in cache
        step = (
            angles
            if self._device.type != "cpu"
            else min(angles, max(1, _CPU_STAGE_BYTES // (12 * batch * size)))
        )
        for a0 in range(0, angles, step):
            a1 = min(angles, a0 + step)
            padded = self._buffer("padded", (batch, step, size), torch.float32, cols)[:, : a1 - a0]
            padded[..., :cols] = sinograms[:, a0:a1]
            spectrum = torch.fft.rfft(padded, dim=-1)
            spectrum *= geometry.response
            filtered = torch.fft.irfft(spectrum, n=size, dim=-1)
            # cut to the detector (a ray off it adds nothing), two slices to a complex sinogram
            packed = self._buffer("packed", (pairs, step, period), torch.complex64, cols)[
                :, : a1 - a0
            ]
            torch.complex(
                filtered[0::2, :, :cols], filtered[1::2, :, :cols], out=packed[..., :cols]
            )
            spectrum = torch.fft.fft(packed, dim=-1).permute(1, 2, 0)  # (angles, period, pairs)
            factor, part = geometry.factor[a0:a1], table[a0:a1]
            torch.mul(spectrum[:, period - most :], factor[:, :most], out=part[:, :most])
            torch.mul(spectrum[:, : most + 1], factor[:, most:], out=part[:, most:])
        return torch.view_as_real(table).view(-1, 2 * pairs)

    def _pairs(
        self, sinograms: torch.Tensor, geometry: _GriddingGeometry, out: torch.Tensor
    ) -> None:
        """(B, A, C) line integrals, B even -> `out` (B, C, C): slices 2k and 2k + 1 are the
        real and imaginary parts of one complex back-projection."""
        batch, cols, grid = sinograms.shape[0], sinograms.shape[2], geometry.spreading.grid
        spread = geometry.spreading.spread(self._table(sinograms, geometry))
        image = torch.view_as_complex(spread.view(grid, grid, batch // 2, 2))
        # one 2D transform over the first two dims: torch hands MKL/cuFFT the strides as they
        # are, where two 1D passes would each copy the grid to make their dim the last
        transformed = self._buffer("image", tuple(image.shape), torch.complex64)
        torch.fft.ifft2(image, dim=(0, 1), norm="forward", out=transformed)
        crop = slice(geometry.crop, geometry.crop + cols)
        image = torch.view_as_real(transformed[crop, crop]).permute(2, 3, 0, 1)
        torch.mul(image, geometry.deapodize, out=out.view(batch // 2, 2, cols, cols))

    def _reconstruct(self, sinograms: torch.Tensor, geometry: _GriddingGeometry) -> torch.Tensor:
        batch, angles, cols = sinograms.shape
        # a pair's grid is 8 bytes a cell, and its transform as much again
        step = 2 * max(1, self.max_work_bytes // (16 * geometry.spreading.grid**2))
        slices = torch.empty(
            (batch + batch % 2, cols, cols), dtype=torch.float32, device=self._device
        )
        for b0 in range(0, batch, step):
            chunk = sinograms[b0 : b0 + step]
            if len(chunk) % 2:  # the odd slice out pairs with zeros
                chunk = torch.cat((chunk, chunk.new_zeros((1, angles, cols))))
            self._pairs(chunk, geometry, slices[b0 : b0 + len(chunk)])
        return slices[:batch]
