"""The 3DGS photometric loss: L = (1 - lambda) L1 + lambda (1 - SSIM), lambda = 0.2."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

import torch
from nerfstudio.configs.base_config import InstantiateConfig

from nerfstudio_splat_ext.losses.fused_ssim import fused_ssim
from nerfstudio_splat_ext.losses.graphed import GraphedLoss
from nerfstudio_splat_ext.losses.ssim import ssim


@dataclass
class PhotometricLossConfig(InstantiateConfig):
    """Configuration of the image reconstruction loss."""

    _target: Type = field(default_factory=lambda: PhotometricLoss)
    ssim_lambda: float = 0.2
    """Weight of the D-SSIM term (the paper's 0.2)."""
    ssim_window: int = 11
    ssim_sigma: float = 1.5
    fused_ssim: bool = True
    """Compute SSIM with the fused CUDA kernels where they apply (else the PyTorch reference); False always
    uses the reference."""
    cuda_graph: bool = True
    """While training on a GPU, replay the loss and its gradient from one CUDA graph per image size
    (losses/graphed.py: the step is bound by kernel launches); the eager loss otherwise."""


class PhotometricLoss(torch.nn.Module):
    def __init__(self, config: PhotometricLossConfig) -> None:
        super().__init__()
        self.config = config
        self.graphed = GraphedLoss(self.eager_forward) if config.cuda_graph else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: [H, W, 3] or [B, H, W, 3] in [0, 1]."""
        if self.graphed is not None:
            return self.graphed(pred, target)
        return self.eager_forward(pred, target)

    def eager_forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.dim() == 3:
            pred, target = pred[None], target[None]
        l1 = torch.abs(pred - target).mean()
        lam = self.config.ssim_lambda
        if lam == 0.0:
            return l1
        ssim_fn = fused_ssim if self.config.fused_ssim else ssim
        d_ssim = 1.0 - ssim_fn(
            pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2), self.config.ssim_window, self.config.ssim_sigma
        )
        return torch.lerp(l1, d_ssim, lam)  # (1 - lam) l1 + lam d_ssim in one launch (the step is launch-bound)
