"""TomoGAN's loss terms: pixel MSE, adversarial (WGAN-GP or BCE), perceptual (VGG19 features).

The generator's loss is the weighted sum lambda_adv * adv + lambda_mse * mse + lambda_perc * perc
(the talk's l^G), plus lambda_ssim * (1 - SSIM) where asked (structural similarity as a loss,
after H. Zhao, O. Gallo, I. Frosio, J. Kautz, "Loss Functions for Image Restoration with Neural
Networks", IEEE TCI 3(1), 2017: it weighs local structure and contrast, which pixel MSE averages
away on low-contrast samples). The discriminator trains either as a Wasserstein critic with
gradient penalty (Gulrajani et al.; the talk's L(theta_D)) or, as the public TF 2 code does, with
binary cross entropy on logits.

The perceptual term compares VGG19 features of target and output. torchvision is not a
dependency, so `VGG19Features` defines the convolutional part of VGG19 itself, with the layer
indices of torchvision's `vgg19().features` so that its state dict (keys `features.N.weight`)
loads as is. Weights are never downloaded: without a local file the term is off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.training.metrics import ssim
from service.errors import ModelError

AdversarialKind = Literal["wgan-gp", "bce"]
# The SSIM loss's data range per patch: its target's peak, at least this (normalised units,
# where a training volume's material sits near 1), so a patch of air does not make every
# fluctuation count as structure.
SSIM_LOSS_MIN_RANGE = 0.1
GRADIENT_PENALTY_WEIGHT = 10.0
# VGG19 configuration "E": channels per conv, "M" a 2x2 max-pool.
VGG19_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
)
# ImageNet statistics the VGG weights were trained with (RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG19Features(nn.Module):
    """VGG19's `features` (16 convs with ReLU, 5 max-pools), torchvision's indices.

    Input: (batch, 1, H, W) images scaled to about [0, 1]; the grey channel is repeated to RGB
    and ImageNet-normalised here. Output: the whole feature stack (TomoGAN's Keras VGG19 with
    include_top=False, i.e. after block5_pool). Frozen: its parameters need no gradients.

    Threading: a plain frozen `nn.Module`, used by the training thread.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG19_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(item, int)
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image.expand(-1, 3, -1, -1)
        features: torch.Tensor = self.features((rgb - self.mean) / self.std)
        return features

    @classmethod
    def from_file(cls, path: str | Path) -> VGG19Features:
        """Load a local state dict: torchvision's `vgg19` one (keys `features.N.*`; the
        classifier keys are ignored) or one saved from this class."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(
                f"--vgg-weights {path} does not exist (weights are never "
                "downloaded: give a local torchvision vgg19 state dict)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ModelError(f"--vgg-weights {path} is not a torch state dict ({exc})") from exc
        if not isinstance(state, dict):
            raise ModelError(
                f"--vgg-weights {path} holds a {type(state).__name__}, not a state dict"
            )
        model = cls()
        wanted = {key for key in model.state_dict() if key.startswith("features.")}
        features = {key: value for key, value in state.items() if key in wanted}
        missing = sorted(wanted - set(features))
        if missing:
            raise ModelError(
                f"--vgg-weights {path} is not a VGG19 state dict: it lacks "
                f"{len(missing)} feature tensor(s), e.g. {missing[0]}"
            )
        try:
            model.load_state_dict(features, strict=False)
        except RuntimeError as exc:
            raise ModelError(
                f"--vgg-weights {path}: tensor shapes do not fit VGG19 "
                f"({str(exc).splitlines()[-1].strip()})"
            ) from exc
        return model


def perceptual_loss(vgg: VGG19Features, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of VGG19 features of output and target."""
    with torch.no_grad():
        wanted = vgg(target)
    return F.mse_loss(vgg(output), wanted)


def generator_adversarial_loss(kind: AdversarialKind, fake_logits: torch.Tensor) -> torch.Tensor:
    """What the generator minimises: -D(G(x)) (WGAN) or BCE against 'real' (BCE)."""
    if kind == "wgan-gp":
        return -fake_logits.float().mean()
    return F.binary_cross_entropy_with_logits(
        fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32)
    )


def discriminator_loss(
    kind: AdversarialKind, real_logits: torch.Tensor, fake_logits: torch.Tensor
) -> torch.Tensor:
    """The critic's loss without the gradient penalty (added by `gradient_penalty`)."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "wgan-gp":
        return fake.mean() - real.mean()
    return F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def gradient_penalty(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """lambda_D * mean((||grad D(mix)||_2 - 1)^2) on random mixes of real and fake images.

    `scale` is the GradScaler's current scale (1 without one): the critic's output is scaled
    before differentiating so fp16 gradients do not underflow, and the gradients unscaled after
    (the pattern of PyTorch's AMP notes for gradient penalties).
    """
    alpha = torch.rand((real.shape[0], 1, 1, 1), generator=generator, device="cpu").to(real)
    mix = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = discriminator(mix).float()
    (grads,) = torch.autograd.grad(scores.sum() * scale, mix, create_graph=True)
    grads = grads.float() / scale
    norm = grads.flatten(1).norm(2, dim=1)
    penalty: torch.Tensor = GRADIENT_PENALTY_WEIGHT * (norm - 1).square().mean()
    return penalty


def ssim_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - the mean SSIM of (B, 1, H, W) `output` against `target` (scikit-image's definition,
    `models.training.metrics.ssim`), each patch's data range its target's peak (at least
    SSIM_LOSS_MIN_RANGE); 0 for identical patches. A float32 scalar with gradients."""
    peak = target.detach().flatten(1).amax(dim=1).clamp_min(SSIM_LOSS_MIN_RANGE)
    return (1 - ssim(output, target, peak).mean()).float()
