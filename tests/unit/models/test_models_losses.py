"""Loss terms: the VGG19 feature extractor loads a torchvision-layout state dict from a local
file (and refuses anything else), the WGAN gradient penalty is what its formula says, and the
SSIM loss is 1 - scikit-image's SSIM with each patch's own data range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn

from models.training.losses import (
    GRADIENT_PENALTY_WEIGHT,
    VGG19Features,
    discriminator_loss,
    generator_adversarial_loss,
    gradient_penalty,
    perceptual_loss,
    ssim_loss,
)
from service.errors import ModelError

# torchvision's vgg19().features: conv layers at these indices.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


def test_layout_matches_torchvision_vgg19() -> None:
    vgg = VGG19Features()
    convs = [i for i, layer in enumerate(vgg.features) if isinstance(layer, nn.Conv2d)]
    assert tuple(convs) == TORCHVISION_CONV_INDICES
    assert len(vgg.features) == 37
    assert sum(p.numel() for p in vgg.parameters()) == 20_024_384  # torchvision's figure
    assert not any(p.requires_grad for p in vgg.parameters())


def test_loads_a_torchvision_state_dict_with_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = VGG19Features()
    state = {
        k: torch.randn_like(v) for k, v in source.state_dict().items() if k.startswith("features.")
    }
    state["classifier.0.weight"] = torch.zeros(4096, 25088 // 512)  # ignored
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    loaded = VGG19Features.from_file(path)
    torch.testing.assert_close(loaded.features[34].weight, state["features.34.weight"])


def test_refuses_missing_or_foreign_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"does not exist.*never downloaded"):
        VGG19Features.from_file(tmp_path / "none.pth")
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, partial)
    with pytest.raises(ModelError, match="lacks 31 feature tensor"):
        VGG19Features.from_file(partial)
    wrong = tmp_path / "wrong.pth"
    state = {k: torch.zeros(1) for k in VGG19Features().state_dict() if k.startswith("features")}
    torch.save(state, wrong)
    with pytest.raises(ModelError, match="shapes do not fit VGG19"):
        VGG19Features.from_file(wrong)


def test_perceptual_loss_is_zero_for_identical_images() -> None:
    vgg = VGG19Features()
    image = torch.rand(1, 1, 32, 32)
    assert float(perceptual_loss(vgg, image, image)) == 0.0


def test_gradient_penalty_of_a_linear_critic() -> None:
    # D(x) = sum(w * x) has gradient w everywhere: penalty = weight * (||w|| - 1)^2.
    critic = nn.Sequential(nn.Flatten(), nn.Linear(16, 1, bias=False))
    with torch.no_grad():
        critic[1].weight.fill_(0.5)  # ||w|| = 0.5 * 4 = 2
    real, fake = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    penalty = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(0))
    assert penalty.item() == pytest.approx(GRADIENT_PENALTY_WEIGHT * 1.0)
    scaled = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(0), scale=1024.0)
    assert scaled.item() == pytest.approx(penalty.item())


def test_adversarial_losses() -> None:
    real, fake = torch.tensor([[2.0], [4.0]]), torch.tensor([[1.0], [-1.0]])
    assert float(discriminator_loss("wgan-gp", real, fake)) == pytest.approx(-3.0)
    assert float(generator_adversarial_loss("wgan-gp", fake)) == pytest.approx(0.0)
    assert float(discriminator_loss("bce", real, fake)) > 0
    assert float(generator_adversarial_loss("bce", torch.full((2, 1), 20.0))) < 1e-6


def test_ssim_loss_is_one_minus_scikit_image_ssim_per_patch() -> None:
    rng = np.random.default_rng(3)
    targets = np.zeros((3, 1, 24, 24))
    targets[0, 0, 4:20, 6:18] = 1.0  # material at the volume's level
    targets[1, 0, 8:16, 8:16] = 0.4  # a fainter patch: its own, smaller range
    # patch 2 is air: the floor range keeps its noise from counting as lost structure
    outputs = targets + 0.05 * rng.standard_normal(targets.shape)
    expected = [
        1.0 - structural_similarity(t[0], o[0], data_range=max(float(t.max()), 0.1))
        for t, o in zip(targets, outputs, strict=True)
    ]
    output = torch.tensor(outputs, dtype=torch.float32, requires_grad=True)
    loss = ssim_loss(output, torch.tensor(targets, dtype=torch.float32))
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(np.mean(expected)), rel=1e-4)
    loss.backward()
    assert output.grad is not None and torch.isfinite(output.grad).all()
    assert float(output.grad.abs().sum()) > 0
    same = torch.tensor(targets, dtype=torch.float32)
    assert float(ssim_loss(same, same)) == pytest.approx(0.0, abs=1e-6)
