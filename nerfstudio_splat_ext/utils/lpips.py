"""LPIPS that is built on first use and skipped when its network weights cannot be loaded (offline machines)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch


class LazyLPIPS:
    """Constructs torchmetrics' LPIPS (AlexNet) on the first call.

    torchmetrics downloads the AlexNet weights at construction, which fails without internet. Then `__call__`
    returns None and `skipped_reason` says why, once; PSNR/SSIM evaluation continues.
    It is deliberately not an nn.Module attribute, so checkpoints never contain LPIPS weights.
    """

    def __init__(self) -> None:
        self._metric = None
        self.skipped_reason: Optional[str] = None

    def _build(self, device: torch.device) -> None:
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self._metric = LearnedPerceptualImagePatchSimilarity(normalize=True).to(device)
        except Exception as err:  # network errors, missing torchvision weights, ...
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.skipped_reason = f"LPIPS skipped: its AlexNet weights could not be loaded ({first_line[:160]})"
            warnings.warn(self.skipped_reason, stacklevel=2)

    @property
    def available(self) -> Optional[bool]:
        """None before the first call, then whether LPIPS could be built."""
        if self._metric is None and self.skipped_reason is None:
            return None
        return self._metric is not None

    def __call__(self, img1: torch.Tensor, img2: torch.Tensor) -> Optional[float]:
        """img1, img2: [B, 3, H, W] in [0, 1]. Returns LPIPS, or None when it is unavailable."""
        if self._metric is None and self.skipped_reason is None:
            self._build(img1.device)
        if self._metric is None:
            return None
        self._metric = self._metric.to(img1.device)
        with torch.no_grad():
            return float(self._metric(img1.clamp(0, 1), img2.clamp(0, 1)))


def build_lpips_network() -> torch.nn.Module:
    """torchmetrics' LPIPS network (AlexNet features + learned linear heads), frozen; its forward
    ``(img1, img2, normalize=True)`` on [N, 3, H, W] images in [0, 1] is differentiable w.r.t. the images.
    Raises when the AlexNet weights cannot be loaded (no internet and no cached copy)."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    net = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).net
    net.requires_grad_(False)
    return net.eval()
