"""Keeping NaN and infinity out of what the service hands on: counted, replaced, never hidden.

A NaN or infinity in one line integral becomes whole slices of NaN after the ramp filter, and a
reduced-precision denoiser (int8, fp16) can turn NaN into finite, plausible pixels that nobody
downstream could tell from real ones. So values are checked twice: line integrals as they are
stored (values beyond `LINE_INTEGRAL_MAX` cannot come from a detector and are clamped to it),
and every reconstructed and denoised batch on its device before it leaves the reconstruct loop,
before a denoiser ever reads it. The policy is the same everywhere: a non-finite value is
replaced by 0 and counted.
"""

from __future__ import annotations

import torch

# |line integral| above this is no measurement: -log of the smallest transmission a detector
# resolves is ~14 (workers.preprocess clips raw data there); 1e4 leaves room for any scaling a
# DAQ applies to normalised data while FBP sums of it stay far from float32's 3.4e38.
LINE_INTEGRAL_MAX = 1e4


def bound_line_integrals_(values: torch.Tensor) -> tuple[int, int]:
    """Replace non-finite values of float `values` by 0 and clamp the rest into
    +-LINE_INTEGRAL_MAX, in place. Returns (non-finite, clamped) pixel counts; syncs the device
    once."""
    non_finite = ~torch.isfinite(values)
    beyond = values.abs() > LINE_INTEGRAL_MAX  # false for NaN
    counts = torch.stack((non_finite.sum(), (beyond & ~non_finite).sum())).tolist()
    if counts[0]:
        values.masked_fill_(non_finite, 0.0)
    if counts[1]:
        values.clamp_(-LINE_INTEGRAL_MAX, LINE_INTEGRAL_MAX)
    return int(counts[0]), int(counts[1])


def zero_non_finite_(values: torch.Tensor) -> torch.Tensor:
    """Replace NaN and +-inf in `values` by 0, in place; returns the count as a 0-d tensor on
    `values`' device, so the caller can add counts up without synchronising it."""
    count = (~torch.isfinite(values)).sum()
    torch.nan_to_num_(values, nan=0.0, posinf=0.0, neginf=0.0)
    return count
