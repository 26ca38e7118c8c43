"""Adaptive density control of 3D Gaussians (clone / split / prune / opacity reset)."""

from .adc import ADCStrategy
from .ops import duplicate, num_gaussians, quat_to_rotmat, remove, reset_opacity, split

__all__ = [
    "ADCStrategy",
    "duplicate",
    "split",
    "remove",
    "reset_opacity",
    "quat_to_rotmat",
    "num_gaussians",
]
