"""TomoGAN: the generator and discriminator of Liu et al., "TomoGAN: low-dose synchrotron x-ray
tomography with generative adversarial networks" (arXiv 1902.07582), as in the authors' public
code (github.com/lzhengchun/TomoGAN, `tf2/models.py`: `unet` and `tomogan_disc`).

Tensors are channels-first, PyTorch style: the generator maps (batch, depth, H, W) -> (batch, 1,
H, W), where the `depth` channels are adjacent reconstructed slices and the output is the denoised
centre one. H and W must be multiples of 8 (three 2x2 max-pools); `workers.denoise` pads to that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Channel widths of the published network; changing them changes the parameter count that
# tests/unit/models/test_tomogan.py pins (694,897 at depth 1).
STEM_CHANNELS = 8
ENCODER_CHANNELS = (32, 64, 128)
DECODER_CHANNELS = (64, 32, 32)
HEAD_CHANNELS = 16
DOWNSAMPLING = 2 ** len(ENCODER_CHANNELS)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 'same' convolutions, each followed by ReLU (the paper's U-Net box)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class TomoGANGenerator(nn.Module):
    """The TomoGAN generator: a three-level U-Net with a 1x1 channel-mixing stem.

    Wiring (parameter counts at depth 1, total 694,897; each extra input slice adds the 8
    weights of the stem's 1x1 convolution, so depth d has 694,889 + 8*d):

    - stem: 1x1 conv depth->8, ReLU                                      8d + 8 = 16
    - encoder box 1: 3x3 8->32, 3x3 32->32 (skip s1, full resolution)             11,584
    - max-pool 2; box 2: 3x3 32->64, 3x3 64->64 (skip s2, 1/2)                    55,424
    - max-pool 2; box 3: 3x3 64->128, 3x3 128->128 (skip s3, 1/4)                221,440
    - max-pool 2; bottleneck: one 3x3 128->128 (1/8)                             147,584
    - decoder 1: bilinear x2, concat [s3, up] = 256 ch, 3x3 256->64, 3x3 64->64  184,448
    - decoder 2: bilinear x2, concat [s2, up] = 128 ch, 3x3 128->32, 3x3 32->32   46,144
    - decoder 3: bilinear x2, concat [s1, up] = 64 ch, 3x3 64->32, 3x3 32->32     27,712
    - head: 1x1 32->16, ReLU; 1x1 16->1, linear                                      545

    The skips are the outputs of the encoder boxes (before pooling), concatenated skip-first as
    in the public code; the stem output is not a skip. Every 3x3 conv is 'same' padded and
    followed by ReLU. Bilinear upsampling uses half-pixel centres (`align_corners=False`), which
    is what TF 2 Keras' `UpSampling2D(interpolation="bilinear")` computes (TF 1's did not).

    Threading: a plain `nn.Module`; an instance is used by one thread at a time (training or
    export). The service never runs it eagerly: it runs the TorchScript artifact.
    """

    def __init__(self, depth: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}: need at least one input slice")
        self.depth = depth
        self.stem = nn.Sequential(nn.Conv2d(depth, STEM_CHANNELS, 1), nn.ReLU(inplace=True))
        encoder_inputs = (STEM_CHANNELS, *ENCODER_CHANNELS[:-1])
        self.encoder = nn.ModuleList(
            _conv_block(cin, cout)
            for cin, cout in zip(encoder_inputs, ENCODER_CHANNELS, strict=True)
        )
        deepest = ENCODER_CHANNELS[-1]
        self.bottleneck = nn.Sequential(nn.Conv2d(deepest, deepest, 3, padding=1), nn.ReLU(True))
        decoder_inputs = (deepest, *DECODER_CHANNELS[:-1])
        skips = tuple(reversed(ENCODER_CHANNELS))
        self.decoder = nn.ModuleList(
            _conv_block(skip + below, cout)
            for skip, below, cout in zip(skips, decoder_inputs, DECODER_CHANNELS, strict=True)
        )
        self.head = nn.Sequential(
            nn.Conv2d(DECODER_CHANNELS[-1], HEAD_CHANNELS, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(HEAD_CHANNELS, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A Python check on sizes would be frozen into a trace (and warn), so only eager
        # callers get the friendly message; traced callers get PyTorch's size-mismatch error.
        height, width = x.shape[-2:]
        if not torch.jit.is_tracing() and (height % DOWNSAMPLING or width % DOWNSAMPLING):
            raise ValueError(
                f"input H, W = {height}, {width} must be multiples of {DOWNSAMPLING}: pad first"
            )
        skips: list[torch.Tensor] = []
        h = self.stem(x)
        for box in self.encoder:
            h = box(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottleneck(h)
        for box, skip in zip(self.decoder, reversed(skips), strict=True):
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            h = box(torch.cat([skip, h], dim=1))
        out: torch.Tensor = self.head(h)
        return out


class TomoGANDiscriminator(nn.Module):
    """The TomoGAN discriminator: six 3x3 convs (64, 64/2, 128, 128/2, 128, 4/2), then dense 64
    and dense 1 (a logit: train with `BCEWithLogitsLoss`).

    The dense layer sees the flattened 4 x (patch/8) x (patch/8) map, so the network is tied to
    one square `patch_size` (the public code trains on 256-pixel patches: 673,477 parameters).
    Activations are LeakyReLU with `negative_slope` (0.2 by default); the public code uses plain
    ReLU there, which `negative_slope=0.0` reproduces exactly. Strided convs pad 1 px on every
    side; TF's 'same' pads only bottom/right for even sizes, so ported Keras weights see a
    half-pixel-shifted grid (same shapes and parameter count).

    Threading: a plain `nn.Module`, used by one training thread; never part of an artifact.
    """

    def __init__(self, patch_size: int = 256, negative_slope: float = 0.2) -> None:
        super().__init__()
        if patch_size < DOWNSAMPLING or patch_size % DOWNSAMPLING:
            raise ValueError(f"patch_size={patch_size} must be a positive multiple of 8")
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        in_channels = 1
        for out_channels, stride in ((64, 1), (64, 2), (128, 1), (128, 2), (128, 1), (4, 2)):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                nn.LeakyReLU(negative_slope, inplace=True),
            ]
            in_channels = out_channels
        side = patch_size // DOWNSAMPLING
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * side * side, 64),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.Linear(64, 1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(batch, 1, patch, patch) -> (batch, 1) real-vs-denoised logits."""
        logits: torch.Tensor = self.classifier(self.features(image))
        return logits


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars in `module` (what the paper's parameter counts count)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
