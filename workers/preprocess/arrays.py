"""numpy or torch in, the same kind out: the preprocessing steps compute on torch tensors (on
the tensor's device) and hand numpy callers numpy back."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

# A step's data: a numpy array (computed on the CPU) or a tensor (computed on its device).
Array = TypeVar("Array", np.ndarray, torch.Tensor)


def as_float_tensor(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`data` as a floating tensor on its device: float64 stays float64, anything else
    (integers, float16, bfloat16) becomes float32. Never shares memory with `data` when a
    step would write into it: steps that work in place copy first."""
    tensor = torch.as_tensor(data) if isinstance(data, np.ndarray) else data
    if tensor.dtype == torch.float64:
        return tensor
    return tensor.to(torch.float32)


def restore(result: torch.Tensor, like: Array) -> Array:
    """`result` as the kind of `like`: a numpy array (from the CPU) or the tensor itself."""
    if isinstance(like, np.ndarray):
        return result.detach().cpu().numpy()
    return result


def sinogram_batch(sinograms: torch.Tensor, name: str = "sinograms") -> torch.Tensor:
    """(angles, cols) or (batch, angles, cols) -> (batch, angles, cols) view; ValueError else."""
    if sinograms.ndim == 2:
        return sinograms[None]
    if sinograms.ndim != 3:
        raise ValueError(
            f"{name} must be (angles, cols) or (batch, angles, cols), got {tuple(sinograms.shape)}"
        )
    return sinograms


def chunk_elements(device: torch.device, on_cpu: int) -> int:
    """How many elements a step works on at a time on `device`: `on_cpu` on the CPU (so that
    a chunk's passes stay in its caches), everything at once on an accelerator (where a chunk
    is a kernel launch, or a sync, more and caches are not the point)."""
    return on_cpu if device.type == "cpu" else 1 << 62
