"""Starting a training run from trained weights (`tomocast train --init FILE`): fine-tune the
shipped model, or any artifact or checkpoint, on new data, or add the adversarial term to a run
trained on pixel losses.

Only the generator's weights carry over: optimiser state, discriminator, step count and input
normalisation come from the new run (the new data set's own normalisation: the network adapts
to it in the first steps).
"""

from __future__ import annotations

from pathlib import Path

import torch

from service.errors import ModelError


def generator_weights(path: str | Path, arch: str, depth: int) -> dict[str, torch.Tensor]:
    """The generator state dict of the model artifact (`.pt`/`.pt2`) or training checkpoint at
    `path`, after checking it is the `arch` network with input depth `depth`. ModelError, naming
    the file and what differs, otherwise."""
    from models.artifact import load_artifact
    from models.training.train import TrainConfig, load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--init {path}: no such file")
    try:
        module, metadata = load_artifact(path, "cpu")
        found_arch: str = metadata.arch
        found_depth = metadata.depth
        weights = {name: value.detach().clone() for name, value in module.state_dict().items()}
    except ModelError as artifact_error:
        try:
            state = load_checkpoint(path)
        except ModelError:
            raise ModelError(
                f"--init {path} is neither a model artifact ({artifact_error}) nor a "
                "training checkpoint"
            ) from None
        config = TrainConfig(**state["config"])
        found_arch, found_depth, weights = config.arch, config.depth, state["generator"]
    if (found_arch, found_depth) != (arch, depth):
        raise ModelError(
            f"--init {path} holds {found_arch} with depth {found_depth}; this run "
            f"trains {arch} with depth {depth} (set --arch/--depth to match)"
        )
    return weights
