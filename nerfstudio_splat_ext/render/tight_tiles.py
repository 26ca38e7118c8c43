"""gsplat rasterization with tile lists bounded by where each Gaussian can still pass the alpha test.

gsplat 1.4 lists a projected Gaussian in every tile its square of half-side ``ceil(3 sigma_max)`` touches. Its
rasterizer then skips each pixel where ``alpha = opacity * exp(-sigma) < 1/255``, with
``sigma = 0.5 d^T Sigma^-1 d``. A Gaussian of opacity ``o`` stays above that level only inside the ellipse
``d^T Sigma^-1 d <= 2 ln(255 o)``, whose bounding box has half-sides ``sqrt(2 ln(255 o) Sigma_xx)`` and
``sqrt(2 ln(255 o) Sigma_yy)``. For ``o < e^4.5 / 255`` (about 0.35) that box is smaller than the 3-sigma square,
and a Gaussian with ``o <= 1/255`` never renders at all. Listing each Gaussian only in the tiles of that box drops
(tile, Gaussian) pairs that every pixel would have skipped: the image and the gradients stay the same, and the
sort, the forward pass and the backward pass have fewer pairs to walk.

``rasterization_tight_tiles`` takes gsplat.rasterization's arguments (unpacked, colours given, not SH) and returns
what it returns. ``meta["radii"]`` keeps gsplat's 3-sigma radii, which the densification strategies read (visible
counts, screen-size pruning); ``meta["tile_radii"]`` holds the radii used for the tile lists.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0  # gsplat's rasterizer skips a pixel below this alpha


def opacity_aware_radii(radii: Tensor, conics: Tensor, opacities: Tensor) -> Tensor:
    """Half-side in pixels of the square that holds every pixel where a Gaussian's alpha can reach 1/255.

    radii [C,N] int32 (gsplat's, 0 = culled), conics [C,N,3] (the inverse 2D covariance a, b, c as gsplat stores
    it), opacities [C,N] (as the rasterizer receives them). Returns int32 [C,N], never above ``radii``; 0 for
    Gaussians that cannot pass the alpha test anywhere.
    """
    a, b, c = conics.unbind(-1)
    det = (a * c - b * b).clamp_min(1e-20)
    # Sigma = inv([[a, b], [b, c]]): Sigma_xx = c / det, Sigma_yy = a / det; one radius per Gaussian (gsplat 1.4's
    # tile test is a square), so the larger half-side.
    extent_sq = torch.maximum(a, c) / det
    level = 2.0 * torch.log((opacities * 255.0).clamp_min(1.0))
    tight = torch.ceil(torch.sqrt(level * extent_sq))
    three_sigma = radii.to(tight.dtype)
    # where(), not minimum(): a NaN or infinite bound falls back to gsplat's radius instead of an invalid cast.
    bounded = torch.where(tight < three_sigma, tight, three_sigma).to(radii.dtype)
    return bounded * (opacities > ALPHA_MIN)


def rasterization_tight_tiles(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: str = "RGB",
    absgrad: bool = False,
    rasterize_mode: str = "classic",
) -> Tuple[Tensor, Tensor, Dict]:
    """gsplat.rasterization (pinhole, unpacked, post-activation colours [N,D] or [C,N,D], render modes RGB and
    RGB+ED) with opacity-aware tile lists. See the module docstring."""
    from gsplat.cuda._wrapper import fully_fused_projection, isect_offset_encode, isect_tiles, rasterize_to_pixels

    if packed or sh_degree is not None:
        raise ValueError("rasterization_tight_tiles renders unpacked, with colours given (sh_degree=None)")
    if render_mode not in ("RGB", "RGB+ED"):
        raise ValueError(f"rasterization_tight_tiles renders 'RGB' or 'RGB+ED', not {render_mode!r}")
    n_cams = viewmats.shape[0]
    radii, means2d, depths, conics, compensations = fully_fused_projection(
        means,
        None,
        quats,
        scales,
        viewmats,
        Ks,
        width,
        height,
        eps2d=eps2d,
        near_plane=near_plane,
        far_plane=far_plane,
        radius_clip=radius_clip,
        packed=False,
        calc_compensations=(rasterize_mode == "antialiased"),
    )
    opacities = opacities.repeat(n_cams, 1)
    if compensations is not None:
        opacities = opacities * compensations
    if colors.dim() == 2:
        colors = colors.expand(n_cams, -1, -1)
    if render_mode == "RGB+ED":
        colors = torch.cat((colors, depths[..., None]), dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(n_cams, 1)], dim=-1)

    with torch.no_grad():
        tile_radii = opacity_aware_radii(radii, conics, opacities)
    tile_width = math.ceil(width / float(tile_size))
    tile_height = math.ceil(height / float(tile_size))
    tiles_per_gauss, isect_ids, flatten_ids = isect_tiles(
        means2d, tile_radii, depths, tile_size, tile_width, tile_height, packed=False, n_cameras=n_cams
    )
    isect_offsets = isect_offset_encode(isect_ids, n_cams, tile_width, tile_height)
    render_colors, render_alphas = rasterize_to_pixels(
        means2d,
        conics,
        colors,
        opacities,
        width,
        height,
        tile_size,
        isect_offsets,
        flatten_ids,
        backgrounds=backgrounds,
        packed=False,
        absgrad=absgrad,
    )
    if render_mode == "RGB+ED":
        expected_depth = render_colors[..., -1:] / render_alphas.clamp(min=1e-10)
        render_colors = torch.cat([render_colors[..., :-1], expected_depth], dim=-1)
    meta = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "tile_radii": tile_radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities,
        "tile_width": tile_width,
        "tile_height": tile_height,
        "tiles_per_gauss": tiles_per_gauss,
        "isect_ids": isect_ids,
        "flatten_ids": flatten_ids,
        "isect_offsets": isect_offsets,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": n_cams,
    }
    return render_colors, render_alphas, meta
