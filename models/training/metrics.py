"""Image quality against a reference: PSNR, SSIM and detail SNR, in torch, batched.

SSIM follows scikit-image's `structural_similarity` defaults exactly (7x7 uniform window, K1 =
0.01, K2 = 0.03, sample covariance, mean over the pixels whose window lies inside the image), so
figures here and ones computed with scikit-image agree; tests/unit/models/test_models_metrics.py
checks that. `data_range` is the reference's value range (for a foam phantom: its attenuation `mu`).

Whole-slice PSNR and SSIM hardly see low-contrast structure: on the `cells` family (contrast
3-5 % of the range) a slice with every cell erased scores higher than any method. `detail_snr`
looks at the fine structure alone: the reference's and the image's high-pass parts (each minus
its Gaussian blur, sigma DETAIL_SIGMA px) compared inside the sample (the reference's support,
eroded by 2 sigma so the sample's outer edge does not count), as the energy of the reference's
detail over the energy of the error in it, in dB. 0 dB is what erasing the detail scores; an
image that keeps it scores above, noise or invented structure below.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DETAIL_SIGMA = 3.0  # px: structure finer than about 2.5 sigma counts as detail
SUPPORT_FRACTION = 1e-3  # reference values above this share of its maximum are the sample


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


def ssim(
    image: torch.Tensor, reference: torch.Tensor, data_range: float | torch.Tensor
) -> torch.Tensor:
    """(B,) mean structural similarity per image (scikit-image's defaults); `data_range` one
    number, or one per image ((B,) tensor). Differentiable (a training loss uses it)."""
    x, y = _as_batch(image), _as_batch(reference)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"images of {tuple(x.shape[-2:])} are smaller than the {SSIM_WINDOW}-px SSIM window"
        )
    n = SSIM_WINDOW**2
    covariance = n / (n - 1)
    if isinstance(data_range, torch.Tensor):
        data_range = data_range.to(x).reshape(-1, 1, 1, 1)

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


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) blurred by a Gaussian of `sigma` px, truncated at 4 sigma, mirrored at the
    edges (scipy.ndimage.gaussian_filter's mode="mirror")."""
    radius = int(4 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def detail_snr(
    image: torch.Tensor, reference: torch.Tensor, sigma: float = DETAIL_SIGMA
) -> torch.Tensor:
    """(B,) detail SNR in dB (module docstring); NaN for an image whose reference has no
    interior or no detail."""
    x, y = _as_batch(image), _as_batch(reference)
    detail_x, detail_y = x - gaussian_blur(x, sigma), y - gaussian_blur(y, sigma)
    peak = y.abs().amax(dim=(1, 2, 3), keepdim=True)
    outside = (y.abs() <= SUPPORT_FRACTION * peak).to(y.dtype)
    margin = int(np.ceil(2 * sigma))
    grown = F.max_pool2d(outside, 2 * margin + 1, stride=1, padding=margin)
    interior = 1.0 - grown
    signal = (detail_y.square() * interior).sum(dim=(1, 2, 3))
    error = ((detail_x - detail_y).square() * interior).sum(dim=(1, 2, 3))
    snr = 10 * torch.log10(signal / error.clamp_min(1e-300))
    return torch.where(signal > 0, snr, torch.full_like(snr, float("nan")))
