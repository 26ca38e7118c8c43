"""Loss modules of splat-ext."""

from nerfstudio_splat_ext.losses.fused_ssim import fused_ssim
from nerfstudio_splat_ext.losses.ssim import ssim, ssim_map

__all__ = ["fused_ssim", "ssim", "ssim_map"]
