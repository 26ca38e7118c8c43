"""Choice of rasterizer: gsplat's CUDA kernels on GPU tensors, our pure-PyTorch reference on CPU.

Both take the same keyword arguments (gsplat.rasterization's, packed=False) and return
(render_colors [C,H,W,D], render_alphas [C,H,W,1], meta). Spherical harmonics likewise: gsplat's kernel or our
reference, both `(degree, dirs [...,3], coeffs [...,K,3]) -> [...,3]`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Literal, Tuple

import torch

RenderBackend = Literal["auto", "gsplat", "reference"]


def resolve_backend(backend: RenderBackend, device: torch.device) -> Literal["gsplat", "reference"]:
    if backend == "auto":
        return "gsplat" if device.type == "cuda" else "reference"
    if backend == "gsplat" and device.type != "cuda":
        raise ValueError(
            "render_backend='gsplat' needs CUDA tensors (gsplat's rasterizer is CUDA-only); "
            "use render_backend='reference' or 'auto' on CPU"
        )
    return backend


def get_rasterizer(backend: RenderBackend, device: torch.device, tight_tiles: bool = False) -> Tuple[str, Callable]:
    """Returns (name, function) of the rasterizer to use for tensors on `device`. `tight_tiles`: on gsplat, tile
    lists bounded by each Gaussian's alpha cut-off (render/tight_tiles.py); the reference already bounds its pixel
    pairs that way."""
    return _rasterizer_for(backend, torch.device(device).type, tight_tiles)


@lru_cache(maxsize=None)
def _rasterizer_for(backend: RenderBackend, device_type: str, tight_tiles: bool) -> Tuple[str, Callable]:
    # Called on every training step: resolve the backend and import its module once.
    name = resolve_backend(backend, torch.device(device_type))
    if name == "gsplat":
        if tight_tiles:
            from nerfstudio_splat_ext.render.tight_tiles import rasterization_tight_tiles

            return name, rasterization_tight_tiles
        from gsplat.rendering import rasterization

        return name, rasterization
    from nerfstudio_splat_ext.render.reference import rasterization_reference

    return name, rasterization_reference


@lru_cache(maxsize=None)
def get_spherical_harmonics(backend_name: str) -> Callable:
    """SH evaluation of a resolved backend name ('gsplat' or 'reference'), imported once."""
    if backend_name == "gsplat":
        from gsplat.cuda._wrapper import spherical_harmonics

        return spherical_harmonics
    from nerfstudio_splat_ext.render.reference import spherical_harmonics_reference

    return spherical_harmonics_reference
