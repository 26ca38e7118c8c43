"""Loss modules of splat-ext."""

from nerfstudio_splat_ext.losses.ssim import ssim, ssim_map

__all__ = ["ssim", "ssim_map"]
