"""ResAttUnet of Li & Hu, "Deep learning based low-dose synchrotron radiation CT reconstruction":
a U-Net (filters 32-64-128-256-512) whose boxes are residual-like and whose skips pass through
additive attention gates.

- Residual-like box (the paper's Fig. 3): conv1 -> BN -> ReLU gives `a`; conv2 -> BN gives `b`;
  the box returns ReLU(a + b). The shortcut skips one conv only (conv2), so it needs no 1x1
  projection when the width changes, unlike a ResNet block whose shortcut skips both.
- Attention gate (Fig. 4): the skip x (left side of the U) and the gating signal g (the conv box
  below, upsampled) each go through a 1x1 conv to `inter` channels; their sum goes through ReLU
  and a 1x1 conv with one filter and a sigmoid, and the skip is multiplied by that map. Summing
  two 1x1 convs is a 1x1 conv of their concatenation, which is how the paper draws it; the gate
  is Oktay et al.'s additive attention. We gate the skip, not the upsampled decoder features:
  the gate's job is to pick which encoder detail reaches the decoder. `inter` is the skip's
  width, and g has the width of the box below, as the paper sets the gate's sizes.
- Down: 2x2 max-pool; up: 2x2 stride-2 transposed conv to the skip's width, then
  concat [gated skip, up] and a residual-like box. Head: 1x1 conv to one channel, linear.

Any H, W work (pools round up, upsampled maps are fitted to their skips; see `models.unet`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import FILTERS, down, fit_to, validate_filters


class ResidualBox(nn.Module):
    """conv-BN-ReLU (a), conv-BN (b), ReLU(a + b): the shortcut skips the second conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.first = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.second = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x)
        return F.relu(a + self.second(a))


class AttentionGate(nn.Module):
    """Additive attention: skip * sigmoid(psi(ReLU(theta(skip) + phi(gate)))), all 1x1 convs.

    `gate` comes from the coarser level (half the skip's size, rounded up); phi runs there and
    its output is upsampled (nearest) to the skip's size, which equals running phi on the
    upsampled gate at a quarter of the cost.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.theta = nn.Conv2d(skip_channels, inter_channels, 1)
        self.phi = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        coarse = fit_to(self.phi(gate), skip)
        weight = torch.sigmoid(self.psi(F.relu(self.theta(skip) + coarse)))
        return skip * weight


class ResAttUnet(nn.Module):
    """(batch, depth, H, W) -> (batch, 1, H, W); len(filters) levels, len(filters) - 1 pools.

    Parameters at depth d with the default filters: 8,024,741 + 288*d
    (`tests/unit/models/test_models_resattunet.py` pins the count per part).

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
            ResidualBox(cin, cout) for cin, cout in zip(inputs, filters[:-1], strict=True)
        )
        self.bottleneck = ResidualBox(filters[-2], filters[-1])
        below = tuple(reversed(filters[1:]))
        skips = tuple(reversed(filters[:-1]))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(cin, cout, 2, stride=2)
            for cin, cout in zip(below, skips, strict=True)
        )
        self.gates = nn.ModuleList(
            AttentionGate(skip, gate, skip) for skip, gate in zip(skips, below, strict=True)
        )
        self.decoder = nn.ModuleList(ResidualBox(2 * skip, skip) for skip in skips)
        self.head = nn.Conv2d(filters[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        h = x
        for box in self.encoder:
            h = box(h)
            skips.append(h)
            h = down(h)
        h = self.bottleneck(h)
        for up, gate, box, skip in zip(
            self.upsample, self.gates, self.decoder, reversed(skips), strict=True
        ):
            gated = gate(skip, h)
            h = box(torch.cat([gated, fit_to(up(h), skip)], dim=1))
        out: torch.Tensor = self.head(h)
        return out
