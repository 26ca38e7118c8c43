"""Analytic reference renderer: sphere tracing of an SDF scene in PyTorch.

Cameras follow the Blender / OpenGL convention used by nerfstudio's Blender data: a 4x4
camera-to-world matrix whose camera looks along its local ``-z`` with ``+y`` up, a pinhole with
horizontal field of view ``camera_angle_x`` and the principal point at the image centre. Pixel
``(i, j)`` covers ``[i, i+1] x [j, j+1]`` and its centre is at ``(i + 0.5, j + 0.5)``, as in
nerfstudio's ray generation.

Shading is Lambertian (fixed directional key light + weak fill light + ambient), hence view
independent. Alpha is the fraction of the ``s x s`` supersamples of a pixel that hit the surface.
The output is straight (not premultiplied) RGBA: the RGB of a pixel is the mean colour of its
hitting supersamples, and background pixels are RGB 0 with alpha 0, like Blender PNGs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_splat_ext.synth.scene import ProceduralScene


@dataclass
class RenderSettings:
    supersample: int = 2
    """Supersamples per pixel side (``s x s`` rays per pixel)."""
    max_steps: int = 128
    """Maximum number of sphere-tracing steps."""
    step_scale: float = 0.95
    """Under-relaxation of the steps (the smooth union is not an exact distance)."""
    hit_pixel_fraction: float = 0.05
    """A ray hits when the SDF drops below this fraction of the (sub)pixel footprint at depth t."""
    min_hit_eps: float = 1e-4
    """Lower bound of the hit threshold, in scene units."""
    normal_eps: float = 1e-3
    """Finite-difference step for normals."""
    light_dir: Tuple[float, float, float] = (0.45, -0.35, 0.82)
    """Direction towards the key light (world space, z up)."""
    light_intensity: float = 0.75
    fill_dir: Tuple[float, float, float] = (-0.5, 0.6, -0.45)
    """Direction towards the (weaker) fill light."""
    fill_intensity: float = 0.2
    ambient: float = 0.3
    chunk_size: int = 1 << 20
    """Rays traced at once (all rays of a view fit in one chunk for the default sizes)."""


def focal_from_angle(width: int, camera_angle_x: float) -> float:
    """Focal length in pixels, as the Blender dataparser computes it."""
    return 0.5 * width / math.tan(0.5 * camera_angle_x)


def camera_rays(
    c2w: Tensor,
    width: int,
    height: int,
    camera_angle_x: float,
    supersample: int = 1,
) -> Tuple[Tensor, Tensor]:
    """Ray origins and unit directions, shape ``(height, width, s*s, 3)``."""
    c2w = torch.as_tensor(c2w, dtype=torch.float32)
    s = int(supersample)
    focal = focal_from_angle(width, camera_angle_x)
    cx, cy = 0.5 * width, 0.5 * height
    sub = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    u = (torch.arange(width, dtype=torch.float32)[:, None] + sub[None, :]).reshape(-1)  # (W*s,)
    v = (torch.arange(height, dtype=torch.float32)[:, None] + sub[None, :]).reshape(-1)  # (H*s,)
    vv, uu = torch.meshgrid(v, u, indexing="ij")  # (H*s, W*s)
    dirs_cam = torch.stack([(uu - cx) / focal, -(vv - cy) / focal, -torch.ones_like(uu)], dim=-1)
    dirs = dirs_cam @ c2w[:3, :3].T
    dirs = dirs / torch.linalg.vector_norm(dirs, dim=-1, keepdim=True)
    # (H*s, W*s, 3) -> (H, s, W, s, 3) -> (H, W, s*s, 3)
    dirs = dirs.reshape(height, s, width, s, 3).permute(0, 2, 1, 3, 4).reshape(height, width, s * s, 3)
    origins = c2w[:3, 3].expand_as(dirs)
    return origins, dirs


def sphere_trace(
    scene: ProceduralScene,
    origins: Tensor,
    dirs: Tensor,
    settings: RenderSettings,
    hit_eps_per_t: float,
    bound_radius: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Sphere-trace rays ``(N, 3)``. Returns depths ``t`` (N,) and the hit mask (N,).

    Rays are first clipped to a bounding sphere of the object; rays still marching are compacted
    every step, so the cost is dominated by the rays near the object.
    """
    n = origins.shape[0]
    device = origins.device
    if bound_radius is None:
        bound_radius = scene.bounding_radius() + 1e-2
    t_out = torch.zeros(n, dtype=origins.dtype, device=device)
    hit_out = torch.zeros(n, dtype=torch.bool, device=device)

    # ray / bounding-sphere intersection
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - bound_radius**2
    disc = b * b - c
    inside = disc > 0
    sq = torch.sqrt(disc.clamp(min=0.0))
    t_near = (-b - sq).clamp(min=0.0)
    t_far = -b + sq
    inside = inside & (t_far > 0)

    idx = torch.nonzero(inside).squeeze(-1)
    o, d = origins[idx], dirs[idx]
    t, tf = t_near[idx], t_far[idx]
    for _ in range(settings.max_steps):
        if idx.numel() == 0:
            break
        dist = scene.sdf(o + t[:, None] * d)
        eps = torch.clamp(t * hit_eps_per_t, min=settings.min_hit_eps)
        hit = dist < eps
        if bool(hit.any()):
            t_out[idx[hit]] = t[hit]
            hit_out[idx[hit]] = True
        t = t + settings.step_scale * dist
        keep = (~hit) & (t < tf)
        idx, o, d, t, tf = idx[keep], o[keep], d[keep], t[keep], tf[keep]
    return t_out, hit_out


def sdf_normals(scene: ProceduralScene, x: Tensor, eps: float) -> Tensor:
    """Unit normals by the tetrahedral finite-difference stencil of the SDF (4 evaluations)."""
    k = torch.tensor(
        [[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device
    )
    pts = (x[None, :, :] + eps * k[:, None, :]).reshape(-1, 3)
    f = scene.sdf(pts).reshape(4, -1)
    n = (f[:, :, None] * k[:, None, :]).sum(0)
    return n / torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp(min=1e-12)


def shade(scene: ProceduralScene, x: Tensor, settings: RenderSettings) -> Tensor:
    """View-independent Lambertian colour (N, 3) of surface points ``x`` (N, 3)."""
    normals = sdf_normals(scene, x, settings.normal_eps)
    key = torch.tensor(settings.light_dir, dtype=x.dtype, device=x.device)
    key = key / torch.linalg.vector_norm(key)
    fill = torch.tensor(settings.fill_dir, dtype=x.dtype, device=x.device)
    fill = fill / torch.linalg.vector_norm(fill)
    light = (
        settings.ambient
        + settings.light_intensity * (normals @ key).clamp(min=0.0)
        + settings.fill_intensity * (normals @ fill).clamp(min=0.0)
    )
    return (scene.albedo(x) * light[:, None]).clamp(0.0, 1.0)


@torch.no_grad()
def render_view(
    scene: ProceduralScene,
    c2w: Tensor,
    width: int,
    height: int,
    camera_angle_x: float,
    settings: Optional[RenderSettings] = None,
) -> Tensor:
    """Render one view. Returns a float32 ``(height, width, 4)`` straight-alpha RGBA image."""
    settings = settings or RenderSettings()
    s = max(1, int(settings.supersample))
    origins, dirs = camera_rays(c2w, width, height, camera_angle_x, s)
    origins = origins.reshape(-1, 3).contiguous()
    dirs = dirs.reshape(-1, 3).contiguous()
    focal = focal_from_angle(width, camera_angle_x)
    # angular size of a subpixel ~ 1 / (focal * s); hit threshold grows linearly with depth
    hit_eps_per_t = settings.hit_pixel_fraction / (focal * s)

    n = origins.shape[0]
    rgb = torch.zeros(n, 3, dtype=torch.float32)
    hit = torch.zeros(n, dtype=torch.bool)
    bound = scene.bounding_radius() + 1e-2
    for start in range(0, n, settings.chunk_size):
        sl = slice(start, min(n, start + settings.chunk_size))
        t, h = sphere_trace(scene, origins[sl], dirs[sl], settings, hit_eps_per_t, bound)
        hit[sl] = h
        hidx = torch.nonzero(h).squeeze(-1)
        if hidx.numel() > 0:
            pts = origins[sl][hidx] + t[hidx, None] * dirs[sl][hidx]
            rgb[start + hidx] = shade(scene, pts, settings)

    rgb = rgb.reshape(height, width, s * s, 3)
    hitf = hit.reshape(height, width, s * s).float()
    count = hitf.sum(-1)
    alpha = count / (s * s)
    color = rgb.sum(-2) / count.clamp(min=1.0)[..., None]  # straight colour of the covered part
    return torch.cat([color, alpha[..., None]], dim=-1)


def to_uint8(image: Tensor) -> np.ndarray:
    """Quantise a float RGBA image in [0, 1] to uint8 (RGB is zeroed where alpha quantises to 0)."""
    arr = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    arr[arr[..., 3] == 0] = 0
    return arr.cpu().numpy()
