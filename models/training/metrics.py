"""Image quality against a reference: PSNR and SSIM, in torch, batched.

SSIM follows scikit-image's `structural_similarity` defaults exactly (7x7 uniform window, K1 =
0.01, K2 = 0.03, sample covariance, mean over the pixels whose window lies inside the image), so
figures here and ones computed with scikit-image agree; tests/unit/models/test_models_metrics.py
checks that. `data_range` is the reference's value range (for a foam phantom: its attenuation `mu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    """(H, W), (B, H, W) or (B, 1, H, W) -> (B, 1, H, W) float64 (SSIM's sums need it)."""
    if image.ndim == 2:
        image = image[None]
    if image.ndim == 3:
        image = image[:, None]
    if image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"expected (H, W), (B, H, W) or (B, 1, H, W), got {tuple(image.shape)}")
    return image.to(torch.float64)


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE) per image."""
    x, y = _as_batch(image), _as_batch(reference)
    mse = (x - y).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-30))


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float) -> torch.Tensor:
    """(B,) mean structural similarity per image (scikit-image's defaults)."""
    x, y = _as_batch(image), _as_batch(reference)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"images of {tuple(x.shape[-2:])} are smaller than the {SSIM_WINDOW}-px SSIM window"
        )
    n = SSIM_WINDOW**2
    covariance = n / (n - 1)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, SSIM_WINDOW, stride=1)

    ux, uy = mean(x), mean(y)
    vx = covariance * (mean(x * x) - ux * ux)
    vy = covariance * (mean(y * y) - uy * uy)
    vxy = covariance * (mean(x * y) - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    numerator = (2 * ux * uy + c1) * (2 * vxy + c2)
    denominator = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return (numerator / denominator).mean(dim=(1, 2, 3))
