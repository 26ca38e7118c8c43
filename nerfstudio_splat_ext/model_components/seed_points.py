"""Initial Gaussians for photographs without SfM points: points on the training rays that the other views agree on.

Random points in the scene box (Kerbl et al.'s initialisation for the synthetic scenes) suit an object that sits in
the box with a known background. A real capture has no such box: nerfstudio centres and scales the camera
positions, not the subject, so most of the box is seen by no camera while the room around the subject lies outside
it. Here every point lies on a training pixel's ray (depths tested log-spaced between `near` and `far`)
and takes that pixel's colour; each ray keeps the depth where the other cameras that see it see the most similar
colour (a plane sweep per ray: on a textured surface the views agree, in empty space they mostly do not). No feature
matching; one pass over the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


@dataclass
class SeedStats:
    rays: int
    depths_per_ray: int
    confident_fraction: float
    """Fraction of rays whose best depth agrees with at least half of the views that see it."""


def _project(points: torch.Tensor, c2w: torch.Tensor, Ks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel coordinates u, v [C,P] and depth z [C,P] of world points [P,3] in nerfstudio cameras (OpenGL axes:
    x right, y up, looking down -z; c2w [C,3,4], Ks [C,3,3] in pixels)."""
    rot, origin = c2w[:, :3, :3], c2w[:, :3, 3]
    local = torch.einsum("cji,cpj->cpi", rot, points[None] - origin[:, None])  # R^T (p - o)
    z = -local[..., 2]
    safe_z = z.clamp_min(1e-8)
    u = Ks[:, 0:1, 0] * local[..., 0] / safe_z + Ks[:, 0:1, 2]
    v = -Ks[:, 1:2, 1] * local[..., 1] / safe_z + Ks[:, 1:2, 2]
    return u, v, z


def view_consistent_seed_points(
    c2w: torch.Tensor,
    Ks: torch.Tensor,
    images: Sequence[torch.Tensor],
    num_points: int,
    near: float,
    far: float,
    *,
    depths_per_ray: int = 32,
    min_views: int = 3,
    colour_tolerance: float = 0.1,
    chunk: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, SeedStats]:
    """`num_points` positions [N,3] and RGB colours [N,3] in [0,1], one per random training pixel.

    c2w [C,3,4] and Ks [C,3,3]: the cameras; images: C images [H_c,W_c,3+] (uint8 or float in [0,1]) that match
    them. Each pixel's ray is tested at `depths_per_ray` stratified log-spaced depths in [near, far]; a depth scores
    the mean over the other views that see it of exp(-(d / colour_tolerance)^2), d the largest per-channel
    difference between the ray's colour and the view's pixel there; depths seen by fewer than `min_views` cameras
    (the source included) score nothing. The ray's point is its best-scoring depth (a random one among ties, as in
    textureless regions). Runs on the device of `c2w`, `chunk` sample points at a time (default: 64k on a CPU; on a
    GPU 2^26 / cameras, as each chunk's loop over the cameras waits on the device)."""
    if num_points <= 0:
        raise ValueError("num_points must be positive")
    if not 0 < near < far:
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    device = c2w.device
    c2w, Ks = c2w.float(), Ks.float().to(device)
    n_cams = c2w.shape[0]
    if chunk is None:  # about 1.5 GB of projections per chunk on a GPU
        chunk = max(1 << 16, (1 << 26) // n_cams) if device.type == "cuda" else 1 << 16
    rgb = [
        (img[..., :3].to(device).float() / 255.0 if img.dtype == torch.uint8 else img[..., :3].to(device).float())
        for img in images
    ]
    if len(rgb) != n_cams:
        raise ValueError(f"{len(rgb)} images for {n_cams} cameras")
    sizes = torch.tensor([[img.shape[1], img.shape[0]] for img in rgb], dtype=torch.float32, device=device)  # W, H

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    # One ray per point: a random pixel of a random view.
    src = torch.randint(0, n_cams, (num_points,), generator=generator).to(device)
    px, py = rand(num_points) * sizes[src, 0], rand(num_points) * sizes[src, 1]
    K = Ks[src]
    ray_local = torch.stack([(px - K[:, 0, 2]) / K[:, 0, 0], -(py - K[:, 1, 2]) / K[:, 1, 1], -torch.ones_like(px)], -1)
    ray_dirs = torch.einsum("pij,pj->pi", c2w[src, :3, :3], ray_local)  # scaled so that the camera depth is 1
    colours = torch.empty(num_points, 3, device=device)
    for cam in range(n_cams):
        sel = (src == cam).nonzero().squeeze(1)
        colours[sel] = rgb[cam][py[sel].long(), px[sel].long()]

    # Stratified log-spaced depths per ray.
    steps = (torch.arange(depths_per_ray, device=device) + rand(num_points, depths_per_ray)) / depths_per_ray
    depths = near * (far / near) ** steps  # [N,D]

    best_score = torch.empty(num_points, device=device)
    best_depth = torch.empty(num_points, device=device)
    rays_per_chunk = max(1, chunk // depths_per_ray)
    for start in range(0, num_points, rays_per_chunk):
        rays = slice(start, min(start + rays_per_chunk, num_points))
        n_rays = rays.stop - rays.start
        points = c2w[src[rays], :3, 3][:, None] + depths[rays, :, None] * ray_dirs[rays, None]  # [R,D,3]
        u, v, z = _project(points.reshape(-1, 3), c2w, Ks)  # [C,R*D]
        inside = (z > near) & (u >= 0) & (v >= 0) & (u < sizes[:, 0:1]) & (v < sizes[:, 1:2])
        source_of_point = src[rays].repeat_interleave(depths_per_ray)
        inside[source_of_point, torch.arange(n_rays * depths_per_ray, device=device)] = False
        ray_colour = colours[rays].repeat_interleave(depths_per_ray, dim=0)
        seen = inside.sum(0).float()
        agree = torch.zeros(n_rays * depths_per_ray, device=device)
        for cam in range(n_cams):
            vis = inside[cam].nonzero().squeeze(1)
            if vis.numel() == 0:
                continue
            there = rgb[cam][v[cam, vis].long(), u[cam, vis].long()]
            diff = (there - ray_colour[vis]).abs().amax(-1)
            agree[vis] += torch.exp(-((diff / colour_tolerance) ** 2))
        score = torch.where(seen >= min_views - 1, agree / seen.clamp_min(1), torch.full_like(seen, -1.0))
        score = score.view(n_rays, depths_per_ray)
        # Ties (textureless regions, or depths no other view sees) are broken at random.
        pick = (score + 1e-4 * rand(n_rays, depths_per_ray)).argmax(1)
        best_score[rays] = score.gather(1, pick[:, None]).squeeze(1)
        best_depth[rays] = depths[rays].gather(1, pick[:, None]).squeeze(1)

    means = c2w[src, :3, 3] + best_depth[:, None] * ray_dirs
    stats = SeedStats(
        rays=num_points,
        depths_per_ray=depths_per_ray,
        confident_fraction=float((best_score >= 0.5).float().mean()),
    )
    return means, colours, stats
