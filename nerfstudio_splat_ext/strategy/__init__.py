"""Density control of 3D Gaussians: 3DGS adaptive density control (clone / split / prune / opacity reset) and its
render-loss contribution variant."""

from .adc import ADCStrategy
from .contribution import ContributionStrategy
from .ops import duplicate, num_gaussians, quat_to_rotmat, remove, reset_opacity, split

__all__ = [
    "ADCStrategy",
    "ContributionStrategy",
    "duplicate",
    "split",
    "remove",
    "reset_opacity",
    "quat_to_rotmat",
    "num_gaussians",
]
