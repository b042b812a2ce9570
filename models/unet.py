"""The plain U-Net baseline of Li & Hu ("Deep learning based low-dose synchrotron radiation CT
reconstruction"), and the building blocks it shares with `models.resattunet`.

The paper's control network is Ronneberger et al.'s U-Net at half the original width: filters
32-64-128-256-512 instead of 64-...-1024, i.e. the same filters as ResAttUnet, so the comparison
isolates the residual-like blocks and the attention gates. Each box is two 3x3 convolutions with
batch norm and ReLU; 2x2 max-pools go down, 2x2 stride-2 transposed convolutions come up, and the
encoder box of the same level is concatenated (skip first) before each decoder box.

Tensors are (batch, depth, H, W) -> (batch, 1, H, W) like TomoGAN. Any H, W >= 1 work: pools round
up (`ceil_mode`) and each upsampled map is fitted to its skip (`fit_to`), so the pipeline's
multiple-of-8 padding (`workers.denoise`) is enough although there are four pools.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FILTERS = (32, 64, 128, 256, 512)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 'same' convolution, batch norm, ReLU (the conv has no bias: batch norm has one)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """The U-Net box: two conv_bn_relu."""
    return nn.Sequential(
        conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels)
    )


def down(image: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool rounding up, so odd sizes keep their last row and column."""
    return F.max_pool2d(image, 2, ceil_mode=True)


def fit_to(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`image` resampled (nearest) to the H, W of `reference`: the identity when the sizes match
    (H, W multiples of 2**pools) and otherwise drops one row/column of an upsampled odd size.

    A crop would do the same for odd sizes, but torch.export cannot keep a crop symbolic: it
    specialises on whether the crop is a no-op, so the exported program would take either
    multiples of 16 or the other sizes, not both. A resize to a given size has no such branch.
    """
    return F.interpolate(image, size=reference.shape[-2:], mode="nearest")


def validate_filters(filters: tuple[int, ...]) -> tuple[int, ...]:
    if len(filters) < 2 or any(f < 1 for f in filters):
        raise ValueError(f"filters={filters}: need at least two positive widths")
    return tuple(filters)


class UNet(nn.Module):
    """Plain U-Net: len(filters) levels, len(filters) - 1 pools.

    Parameters at depth d with the default filters: 7,762,177 + 288*d (the first conv has
    32*9*d weights and no bias). `tests/unit/models/test_models_unet.py` pins the count per part.

    Threading: a plain `nn.Module`, used by one thread at a time (training or export).
    """

    def __init__(self, depth: int = 1, filters: tuple[int, ...] = FILTERS) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}: need at least one input slice")
        filters = validate_filters(filters)
        self.depth = depth
        inputs = (depth, *filters[:-2])
        self.encoder = nn.ModuleList(
            double_conv(cin, cout) for cin, cout in zip(inputs, filters[:-1], strict=True)
        )
        self.bottleneck = double_conv(filters[-2], filters[-1])
        below = tuple(reversed(filters[1:]))
        skips = tuple(reversed(filters[:-1]))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(cin, cout, 2, stride=2)
            for cin, cout in zip(below, skips, strict=True)
        )
        self.decoder = nn.ModuleList(double_conv(2 * skip, skip) for skip in skips)
        self.head = nn.Conv2d(filters[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        h = x
        for box in self.encoder:
            h = box(h)
            skips.append(h)
            h = down(h)
        h = self.bottleneck(h)
        for up, box, skip in zip(self.upsample, self.decoder, reversed(skips), strict=True):
            h = box(torch.cat([skip, fit_to(up(h), skip)], dim=1))
        out: torch.Tensor = self.head(h)
        return out
