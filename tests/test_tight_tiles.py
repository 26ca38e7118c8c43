"""Opacity-aware tile bounds (render/tight_tiles.py): the same image and gradients with fewer tile pairs.

The compositor here is the dense brute-force one of test_render_reference.py (every pixel of every listed tile
evaluated), so a bound that cut off a single pixel where some Gaussian passes the alpha test would change the
image. The GPU function itself (gsplat's kernels with these bounds) is compared with gsplat.rasterization in
benchmarks/check_render_parity.py --tight-tiles.
"""

from __future__ import annotations

import torch
from test_render_reference import _seed, brute_composite, random_scene

from nerfstudio_splat_ext.render.reference import fully_fused_projection_reference, isect_tile_bounds
from nerfstudio_splat_ext.render.tight_tiles import opacity_aware_radii

TILE = 4  # small tiles: the bounds decide membership at a fine grain, so a bound one pixel short shows


def _projected_scene():
    s = random_scene(N=80, C=2, W=48, H=40, dtype=torch.float64, scale_range=(0.05, 0.4))
    # opacities across the whole range, the faint ones below the 1/255 cut included
    s["opacities"] = torch.cat([torch.tensor([0.9995, 0.002, 0.0039, 0.004]), torch.rand(76) ** 3]).double()
    radii, means2d, depths, conics, _ = fully_fused_projection_reference(
        s["means"], s["quats"], s["scales"], s["viewmats"], s["Ks"], s["width"], s["height"]
    )
    means2d.requires_grad_(True)
    conics.requires_grad_(True)
    colors = s["colors"].expand(2, -1, -1).clone().requires_grad_(True)
    opacities = s["opacities"].expand(2, -1).clone().requires_grad_(True)
    return s, radii, means2d, depths, conics, colors, opacities


def _render(scene, radii):
    s, _, means2d, depths, conics, colors, opacities = scene
    img, alpha = brute_composite(means2d, conics, colors, opacities, radii, depths, s["width"], s["height"], TILE)
    weights = torch.linspace(0.1, 1.0, img.numel(), dtype=img.dtype).reshape(img.shape)
    loss = (img * weights).sum() + alpha.sum()
    grads = torch.autograd.grad(loss, (means2d, conics, colors, opacities))
    return img.detach(), alpha.detach(), grads


def _tile_pairs(scene, radii) -> int:
    s, _, means2d = scene[:3]
    tw, th = -(-s["width"] // TILE), -(-s["height"] // TILE)
    lo, hi = isect_tile_bounds(means2d, radii, TILE, tw, th)
    return int((hi - lo).clamp_min(0).prod(dim=-1).sum())


def test_tight_bounds_render_the_same_image_and_gradients_with_fewer_tile_pairs():
    _seed()
    scene = _projected_scene()
    radii, conics, opacities = scene[1], scene[4], scene[6]
    tight = opacity_aware_radii(radii, conics.detach(), opacities.detach())
    assert tight.dtype == radii.dtype and bool((tight <= radii).all())
    # a Gaussian at or below the cut never renders, so it is listed nowhere
    assert int(tight[:, 1:3].abs().sum()) == 0 and bool((tight[:, 3] > 0).all() == (radii[:, 3] > 0).all())

    img, alpha, grads = _render(scene, radii)
    img_t, alpha_t, grads_t = _render(scene, tight)
    torch.testing.assert_close(img_t, img, rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha_t, alpha, rtol=0, atol=1e-12)
    for g_t, g in zip(grads_t, grads):
        torch.testing.assert_close(g_t, g, rtol=1e-10, atol=1e-12)
    assert _tile_pairs(scene, tight) < 0.8 * _tile_pairs(scene, radii)


def test_a_bound_one_pixel_shorter_loses_pixels():
    """The bound is tight up to its rounding: one pixel less drops pixels that pass the alpha test (so the
    equality above is not a consequence of generous bounds)."""
    _seed()
    scene = _projected_scene()
    radii, conics, opacities = scene[1], scene[4], scene[6]
    tight = opacity_aware_radii(radii, conics.detach(), opacities.detach())
    shorter = torch.where(tight < radii, (tight - 1).clamp_min(0), tight)
    img, _, _ = _render(scene, radii)
    img_s, _, _ = _render(scene, shorter)
    assert float((img_s - img).abs().max()) > 1e-6
