"""Flat-field correction of raw detector frames into line integrals, on the frames' device.

Line integrals are -log((frame - dark) / (flat - dark)) (Beer-Lambert). A ratio that is not a
usable transmission (<= 0 from noise or a dead pixel, NaN or infinite where flat == dark) is
clipped into [TRANSMISSION_FLOOR, 1 / TRANSMISSION_FLOOR] and counted, so one bad pixel never puts
an infinity or NaN into a reconstruction, where the ramp filter would spread it across the slice.
"""

from __future__ import annotations

import torch

from workers.preprocess.arrays import chunk_elements

# 1e-6 is below any transmission a detector can measure (a 16-bit one resolves 1 / 65535 = 1.5e-5),
# so clipping only touches pixels that carry no information; -log(1e-6) = 13.8 marks them as
# opaque with a finite value that float32 and the ramp filter handle without overflow.
TRANSMISSION_FLOOR = 1e-6
# Frames converted to float64 at a time when averaging (bounds the temporary to ~this many frames).
_AVERAGE_CHUNK = 16
# Pixels normalised at a time (`normalize`).
_CHUNK_ELEMENTS = 1 << 17


def flat_field(
    frames: torch.Tensor, dark: torch.Tensor, flat: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(count, rows, cols) raw frames of any numeric dtype -> float32 transmission
    (frame - dark) / (flat - dark), unclipped: the input of the steps that work before -log
    (zingers, phase retrieval). `dark`, `flat` and `out` as in `normalize`."""
    out = _checked_out(frames, dark, flat, out)
    dark, inverse_range = _dark_and_inverse_range(dark, flat, out.device)
    return _flat_field(frames, dark, inverse_range, out)


def _checked_out(
    frames: torch.Tensor, dark: torch.Tensor, flat: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """`out`, or a new float32 buffer for `frames`, once the shapes are checked."""
    if frames.ndim != 3 or frames.shape[1:] != dark.shape or dark.shape != flat.shape:
        raise ValueError(
            f"frames {tuple(frames.shape)} must be (count, rows, cols) with dark "
            f"{tuple(dark.shape)} and flat {tuple(flat.shape)} of shape (rows, cols)"
        )
    if out is None:
        return torch.empty(frames.shape, dtype=torch.float32, device=frames.device)
    if out.shape != frames.shape or out.dtype != torch.float32:
        raise ValueError(
            f"out must be float32 {tuple(frames.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    return out


def _dark_and_inverse_range(
    dark: torch.Tensor, flat: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    dark = dark.to(device, torch.float32)
    return dark, torch.reciprocal(flat.to(device, torch.float32) - dark)


def _flat_field(
    frames: torch.Tensor, dark: torch.Tensor, inverse_range: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    out.copy_(frames)  # copy_ converts any integer dtype, unlike arithmetic on uint16/uint32
    return out.sub_(dark).mul_(inverse_range)


def minus_log(transmission: torch.Tensor) -> tuple[torch.Tensor, int]:
    """float32 transmission -> line integrals -log(transmission), in place (the same tensor
    is returned), and the count of values clipped first (see the module docstring); counting
    syncs the device."""
    # NaN compares false, so `not >= floor` catches it with the non-positive ratios
    too_low = ~(transmission >= TRANSMISSION_FLOOR)
    too_high = transmission > 1.0 / TRANSMISSION_FLOOR
    clipped = int((too_low | too_high).sum().item())
    if clipped:
        transmission.masked_fill_(too_low, TRANSMISSION_FLOOR)
        transmission.masked_fill_(too_high, 1.0 / TRANSMISSION_FLOOR)
    return transmission.log_().neg_(), clipped


def normalize(
    frames: torch.Tensor, dark: torch.Tensor, flat: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """(count, rows, cols) raw frames of any numeric dtype -> float32 line integrals, clipped count:
    `flat_field` then `minus_log`.

    `dark` and `flat` are (rows, cols) float32 on the frames' device. `out`, when given, is a
    float32 (count, rows, cols) buffer on that device that receives the result (and is returned),
    so a caller can reuse one buffer per chunk. The count is the number of pixels whose
    transmission was replaced by the clip (see the module docstring); counting syncs the device.
    """
    out = _checked_out(frames, dark, flat, out)
    dark, inverse_range = _dark_and_inverse_range(dark, flat, out.device)
    clipped = 0
    # a few frames at a time, so that the passes of both steps work in the CPU's caches
    elements = chunk_elements(out.device, _CHUNK_ELEMENTS)
    step = max(1, elements // max(1, frames[0].numel())) if len(frames) else 1
    for f0 in range(0, frames.shape[0], step):
        part = _flat_field(frames[f0 : f0 + step], dark, inverse_range, out[f0 : f0 + step])
        clipped += minus_log(part)[1]
    return out, clipped


def average_frames(frames: torch.Tensor) -> torch.Tensor:
    """(count, rows, cols) frames of any numeric dtype -> (rows, cols) float32 mean.

    Summed in float64 a few frames at a time: a float32 running sum of many 16-bit frames loses
    the low bits the mean is supposed to recover.
    """
    if frames.ndim != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (count >= 1, rows, cols), got {tuple(frames.shape)}")
    total = torch.zeros(frames.shape[1:], dtype=torch.float64, device=frames.device)
    for start in range(0, frames.shape[0], _AVERAGE_CHUNK):
        total += frames[start : start + _AVERAGE_CHUNK].to(torch.float64).sum(dim=0)
    return (total / frames.shape[0]).to(torch.float32)
