"""Structural similarity (Wang et al. 2004) with the 3DGS paper's window: 11x11 Gaussian, sigma 1.5.

This is the pure-PyTorch reference. It is also the CPU training path, so it uses two 1-D depthwise
convolutions per statistic (separable window) instead of one 11x11 convolution.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

# Constants for images in [0, 1] (data range 1): C1 = (0.01 L)^2, C2 = (0.03 L)^2.
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


@lru_cache(maxsize=8)
def _gaussian_taps(window_size: int, sigma: float, dtype: torch.dtype, device_str: str) -> torch.Tensor:
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2.0
    taps = torch.exp(-(coords**2) / (2.0 * sigma**2))
    taps = taps / taps.sum()
    return taps.to(dtype=dtype, device=torch.device(device_str))


def _blur(x: torch.Tensor, taps: torch.Tensor, padding: int) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with zero padding `padding` on each side."""
    channels = x.shape[1]
    k = taps.numel()
    horizontal = taps.view(1, 1, 1, k).expand(channels, 1, 1, k)
    vertical = taps.view(1, 1, k, 1).expand(channels, 1, k, 1)
    x = F.conv2d(x, horizontal, padding=(0, padding), groups=channels)
    return F.conv2d(x, vertical, padding=(padding, 0), groups=channels)


def ssim_map(
    img1: torch.Tensor,
    img2: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    padding: Literal["same", "valid"] = "same",
) -> torch.Tensor:
    """Per-pixel SSIM of two [B, C, H, W] images in [0, 1].

    padding="same" zero-pads like the 3DGS reference loss (map has the input size);
    padding="valid" only keeps windows fully inside the image (as pytorch-msssim does).
    """
    if img1.shape != img2.shape or img1.dim() != 4:
        raise ValueError(f"ssim expects two [B, C, H, W] tensors of equal shape, got {tuple(img1.shape)} and {tuple(img2.shape)}")
    taps = _gaussian_taps(window_size, float(sigma), img1.dtype, str(img1.device))
    pad = window_size // 2 if padding == "same" else 0
    # One batched blur for all five statistics keeps the number of kernel launches small.
    stacked = torch.cat([img1, img2, img1 * img1, img2 * img2, img1 * img2], dim=1)
    blurred = _blur(stacked, taps, pad)
    mu1, mu2, e11, e22, e12 = torch.chunk(blurred, 5, dim=1)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = e11 - mu1_sq
    sigma2_sq = e22 - mu2_sq
    sigma12 = e12 - mu12
    numerator = (2.0 * mu12 + SSIM_C1) * (2.0 * sigma12 + SSIM_C2)
    denominator = (mu1_sq + mu2_sq + SSIM_C1) * (sigma1_sq + sigma2_sq + SSIM_C2)
    return numerator / denominator


def ssim(
    img1: torch.Tensor,
    img2: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    padding: Literal["same", "valid"] = "same",
) -> torch.Tensor:
    """Mean SSIM over batch, channels and pixels (a scalar)."""
    return ssim_map(img1, img2, window_size, sigma, padding).mean()
