"""Per-pixel 3D Gaussians (Splatter Image, Szymanowicz et al. 2024): one Gaussian per pixel of a source view.

A *canonical Gaussian map* ``[B, 15, H, W]`` holds every Gaussian parameter as a channel bounded in ``[-1, 1]``,
so the same tensor is the output of the deterministic teacher and the "image" a diffusion model noises:

====  =========  ==========================================================================================
ch    name       decoded as
====  =========  ==========================================================================================
0     depth      distance along the pixel's unit ray: ``near + (c + 1) / 2 * (far - near)``
1:4   offset     3D offset in the world frame: ``offset_scale * c``
4     opacity    ``(c + 1) / 2``
5:8   log-scale  ``exp(log s_min + (c + 1) / 2 * (log s_max - log s_min))`` (world units)
8:12  rotation   quaternion wxyz, normalised (a zero quaternion decodes to the identity)
12:15 colour     RGB ``(c + 1) / 2``
====  =========  ==========================================================================================

The Gaussian of pixel ``(u, v)`` sits at ``camera centre + depth * unit ray through (u + 0.5, v + 0.5) + offset``.
Cameras are OpenGL camera-to-world matrices (the camera looks along -z, +y is up) as in the data layer; the
rasterizers (gsplat, our reference) take OpenCV world-to-camera view matrices, converted here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_splat_ext.models.splat_ext import SH_C0, camera_to_world_to_viewmat
from nerfstudio_splat_ext.render.backend import RenderBackend, get_rasterizer

GAUSSIAN_MAP_CHANNELS = 15
CHANNEL_SLICES: Dict[str, slice] = {
    "depth": slice(0, 1),
    "offset": slice(1, 4),
    "opacity": slice(4, 5),
    "scale": slice(5, 8),
    "rotation": slice(8, 12),
    "colour": slice(12, 15),
}


@dataclass
class GaussianMapConfig:
    """Decoding ranges of a canonical map. Defaults fit the generated objects (``splat-ext-objects``): cameras at
    radius 2.6 looking at objects inside the unit ball, so every surface point is 1.6..3.6 along its ray."""

    near: float = 1.0
    """Depth (distance along the unit ray) of channel value -1."""
    far: float = 4.2
    """Depth of channel value +1."""
    offset_scale: float = 0.25
    """World-frame offset of channel value +-1 per axis."""
    scale_min: float = 1e-3
    """Smallest Gaussian standard deviation (world units): sub-pixel at 128^2 (a pixel is ~0.019 at depth 2.6)."""
    scale_max: float = 0.3
    """Largest Gaussian standard deviation (world units)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.near < self.far:
            raise ValueError(f"GaussianMapConfig needs 0 < near < far, got near={self.near}, far={self.far}")
        if not 0.0 < self.scale_min < self.scale_max:
            raise ValueError(
                f"GaussianMapConfig needs 0 < scale_min < scale_max, got {self.scale_min}, {self.scale_max}"
            )
        if self.offset_scale < 0.0:
            raise ValueError(f"GaussianMapConfig.offset_scale must be >= 0, got {self.offset_scale}")


def _check_map(canonical: Tensor) -> None:
    if canonical.dim() != 4 or canonical.shape[1] != GAUSSIAN_MAP_CHANNELS:
        raise ValueError(
            f"a Gaussian map must be [B, {GAUSSIAN_MAP_CHANNELS}, H, W], got {tuple(canonical.shape)}"
        )


def activate_raw(raw: Tensor) -> Tensor:
    """Unbounded network output ``[B, 15, H, W]`` -> canonical map ``[B, 15, H, W]`` in ``[-1, 1]``.

    ``tanh`` on every channel (``tanh(x) = 2 sigmoid(2x) - 1``: the sigmoid activations of Splatter Image for depth,
    opacity and colour, expressed in the symmetric range the diffusion model works in). The quaternion channels are
    bounded too and only normalised at decoding, so the map stays a plain bounded image.
    """
    _check_map(raw)
    return torch.tanh(raw)


def canonical_to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1.0) * 0.5


@dataclass
class PixelGaussians:
    """A batch of per-pixel Gaussians, ``N = H * W`` per item, all post-activation (world units)."""

    means: Tensor
    """[B, N, 3] world positions."""
    quats: Tensor
    """[B, N, 4] unit quaternions, wxyz."""
    scales: Tensor
    """[B, N, 3] standard deviations (> 0)."""
    opacities: Tensor
    """[B, N] in (0, 1)."""
    colors: Tensor
    """[B, N, 3] RGB in [0, 1]."""

    @property
    def batch_size(self) -> int:
        return int(self.means.shape[0])

    def num_gaussians(self) -> int:
        """Gaussians per batch item (N)."""
        return int(self.means.shape[1])

    def detach(self) -> "PixelGaussians":
        return PixelGaussians(*(t.detach() for t in (self.means, self.quats, self.scales, self.opacities, self.colors)))

    def to_ply_arrays(self, b: int = 0) -> Dict[str, np.ndarray]:
        """Item ``b`` in the Inria 3DGS ``.ply`` layout: name -> float32 [N], in the file's column order
        (x, y, z, nx, ny, nz, f_dc_0..2 (SH DC), opacity (logit), scale_0..2 (log), rot_0..3 (wxyz))."""
        if not -self.batch_size <= b < self.batch_size:
            raise IndexError(f"batch item {b} out of range for a batch of {self.batch_size}")
        means = self.means[b].detach().float().cpu()
        out: Dict[str, np.ndarray] = {}
        for i, axis in enumerate("xyz"):
            out[axis] = means[:, i].numpy()
        zeros = torch.zeros(means.shape[0])
        for axis in ("nx", "ny", "nz"):
            out[axis] = zeros.numpy()
        dc = (self.colors[b].detach().float().cpu() - 0.5) / SH_C0
        for i in range(3):
            out[f"f_dc_{i}"] = dc[:, i].numpy()
        eps = 1e-6
        out["opacity"] = torch.logit(self.opacities[b].detach().float().cpu().clamp(eps, 1 - eps)).numpy()
        log_scales = torch.log(self.scales[b].detach().float().cpu())
        for i in range(3):
            out[f"scale_{i}"] = log_scales[:, i].numpy()
        quats = self.quats[b].detach().float().cpu()
        for i in range(4):
            out[f"rot_{i}"] = quats[:, i].numpy()
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def pixel_rays(c2w: Tensor, intrinsics: Tensor, width: int, height: int) -> Tuple[Tensor, Tensor]:
    """Camera centres ``[B, 3]`` and unit world-frame ray directions ``[B, H*W, 3]`` through the pixel centres.

    c2w: [B, 4, 4] (or [B, 3, 4]) OpenGL camera-to-world; intrinsics: [B, 4] fx, fy, cx, cy in pixels.
    Pixels are in row-major order (index ``v * W + u``), the order of a flattened ``[H, W]`` map.
    """
    if c2w.dim() != 3 or c2w.shape[-2:] not in ((4, 4), (3, 4)):
        raise ValueError(f"c2w must be [B, 4, 4] or [B, 3, 4], got {tuple(c2w.shape)}")
    if intrinsics.dim() != 2 or intrinsics.shape[-1] != 4 or intrinsics.shape[0] != c2w.shape[0]:
        raise ValueError(f"intrinsics must be [B, 4] (fx, fy, cx, cy) matching c2w, got {tuple(intrinsics.shape)}")
    dev, dt = c2w.device, c2w.dtype
    v, u = torch.meshgrid(
        torch.arange(height, device=dev, dtype=dt) + 0.5,
        torch.arange(width, device=dev, dtype=dt) + 0.5,
        indexing="ij",
    )
    fx, fy, cx, cy = (intrinsics[:, i, None, None].to(dt) for i in range(4))
    # OpenGL camera frame: x right, y up, looking along -z; image v grows downwards.
    x = (u[None] - cx) / fx
    y = -(v[None] - cy) / fy
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1).reshape(c2w.shape[0], -1, 3)  # [B, HW, 3]
    dirs = torch.einsum("bij,bnj->bni", c2w[:, :3, :3], dirs_cam)
    return c2w[:, :3, 3], dirs / dirs.norm(dim=-1, keepdim=True)


IMAGE_CHANNELS = 3
RAY_CHANNELS = 6  # Plücker: direction and moment


def image_and_rays_channels(with_rays: bool = True) -> int:
    """How many channels :func:`image_and_rays` returns."""
    return IMAGE_CHANNELS + (RAY_CHANNELS if with_rays else 0)


def image_and_rays(source_rgb: Tensor, c2w: Tensor, intrinsics: Tensor, with_rays: bool = True) -> Tensor:
    """The networks' view of a source image: [B, 3 (+6), H, W], the image source_rgb [B, H, W, 3] in [0, 1] (on
    the background) mapped to the maps' symmetric range [-1, 1], then (``with_rays``) the Plücker coordinates (unit
    direction d, moment o x d; world frame) of the pixel rays of cameras c2w [B, 4, 4] (OpenGL) with intrinsics
    [B, 4]. The teacher's and the denoiser's input both: a denoiser started from the teacher must read exactly it."""
    if source_rgb.dim() != 4 or source_rgb.shape[-1] != IMAGE_CHANNELS:
        raise ValueError(f"source_rgb must be [B, H, W, 3] composited on the background, got {tuple(source_rgb.shape)}")
    b, h, w, _ = source_rgb.shape
    image = source_rgb.permute(0, 3, 1, 2) * 2.0 - 1.0
    if not with_rays:
        return image
    origin, dirs = pixel_rays(c2w.to(image.dtype), intrinsics.to(image.dtype), w, h)  # [B, 3], [B, HW, 3]
    moment = torch.linalg.cross(origin[:, None, :].expand_as(dirs), dirs, dim=-1)
    rays = torch.cat([dirs, moment], dim=-1).transpose(1, 2).reshape(b, RAY_CHANNELS, h, w)
    return torch.cat([image, rays], dim=1)


def decode_gaussian_map(
    canonical: Tensor, c2w: Tensor, intrinsics: Tensor, cfg: GaussianMapConfig = GaussianMapConfig()
) -> PixelGaussians:
    """Canonical map ``[B, 15, H, W]`` seen from cameras ``c2w [B, 4, 4]`` (OpenGL) with ``intrinsics [B, 4]``
    -> :class:`PixelGaussians` with ``N = H * W`` (row-major pixel order)."""
    _check_map(canonical)
    b, _, h, w = canonical.shape
    if c2w.shape[0] != b:
        raise ValueError(f"{b} maps but {c2w.shape[0]} cameras")
    flat = canonical.flatten(2).transpose(1, 2)  # [B, HW, 15]

    def ch(name: str) -> Tensor:
        return flat[..., CHANNEL_SLICES[name]]

    centres, dirs = pixel_rays(c2w.to(flat.dtype), intrinsics.to(flat.dtype), w, h)
    depth = cfg.near + canonical_to_unit(ch("depth")) * (cfg.far - cfg.near)  # [B, HW, 1]
    means = centres[:, None, :] + depth * dirs + cfg.offset_scale * ch("offset")
    opacities = canonical_to_unit(ch("opacity"))[..., 0]
    log_lo, log_hi = math.log(cfg.scale_min), math.log(cfg.scale_max)
    scales = torch.exp(log_lo + canonical_to_unit(ch("scale")) * (log_hi - log_lo))
    q = ch("rotation")
    norm = q.norm(dim=-1, keepdim=True)
    identity = torch.zeros_like(q)
    identity[..., 0] = 1.0
    # A (near-)zero quaternion has no direction: decode it as the identity rather than dividing by ~0.
    quats = torch.where(norm > 1e-6, q / norm.clamp_min(1e-6), identity)
    colors = canonical_to_unit(ch("colour"))
    return PixelGaussians(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors)


def intrinsics_to_K(intrinsics: Tensor) -> Tensor:
    """[..., 4] fx, fy, cx, cy -> [..., 3, 3] pinhole matrices."""
    K = torch.zeros(intrinsics.shape[:-1] + (3, 3), device=intrinsics.device, dtype=intrinsics.dtype)
    K[..., 0, 0] = intrinsics[..., 0]
    K[..., 1, 1] = intrinsics[..., 1]
    K[..., 0, 2] = intrinsics[..., 2]
    K[..., 1, 2] = intrinsics[..., 3]
    K[..., 2, 2] = 1.0
    return K


def render_pixel_gaussians(
    g: PixelGaussians,
    c2w: Tensor,
    intrinsics: Tensor,
    width: int,
    height: int,
    background: Tensor,
    backend: RenderBackend = "auto",
    near_plane: float = 0.01,
    reference_tile_size: int = 1,
    one_call: Optional[bool] = None,
) -> Tuple[Tensor, Tensor]:
    """Renders each item's Gaussians from its ``V`` cameras. Differentiable.

    c2w: [B, V, 4, 4] OpenGL camera-to-world; intrinsics: [B, V, 4]; background: [3].
    Returns ``(rgb [B, V, H, W, 3], alpha [B, V, H, W, 1])``; rgb is composited on ``background``.
    ``reference_tile_size`` is used by the CPU reference only (1: per-pixel bounding boxes, the cheap CPU setting;
    16 reproduces gsplat's tile lists). ``one_call``: render the whole batch with one rasterizer call (see
    :func:`_render_batch_in_one_call`) instead of one call per item; the images are the same. None: with gsplat
    only (on the CPU the reference's cost grows with the batch's total Gaussians per camera).
    """
    if c2w.dim() != 4 or intrinsics.dim() != 3 or c2w.shape[:2] != intrinsics.shape[:2]:
        raise ValueError(
            f"c2w must be [B, V, 4, 4] and intrinsics [B, V, 4], got {tuple(c2w.shape)} and {tuple(intrinsics.shape)}"
        )
    if c2w.shape[0] != g.batch_size:
        raise ValueError(f"{g.batch_size} Gaussian sets but cameras for {c2w.shape[0]}")
    device = g.means.device
    name, rasterize = get_rasterizer(backend, device)
    extra = {"tile_size": reference_tile_size} if name == "reference" else {}
    n_views = c2w.shape[1]
    dt = g.means.dtype
    bg = background.to(device=device, dtype=dt).reshape(1, 3)
    c2w, intrinsics = c2w.to(device=device, dtype=dt), intrinsics.to(device=device, dtype=dt)
    if one_call is None:
        one_call = name == "gsplat"
    if one_call and g.batch_size > 1:
        # gsplat's packed layout keeps only the (camera, Gaussian) pairs that survive culling
        extra["packed"] = name == "gsplat"
        return _render_batch_in_one_call(rasterize, g, c2w, intrinsics, width, height, bg, near_plane, extra)
    rgbs, alphas = [], []
    for b in range(g.batch_size):
        # gsplat 1.4's rasterization takes one scene ([N, ...]) and many cameras, so loop over the batch.
        rgb, alpha, _ = rasterize(
            means=g.means[b],
            quats=g.quats[b],
            scales=g.scales[b],
            opacities=g.opacities[b],
            colors=g.colors[b],
            viewmats=camera_to_world_to_viewmat(c2w[b]),
            Ks=intrinsics_to_K(intrinsics[b]),
            width=int(width),
            height=int(height),
            near_plane=near_plane,
            backgrounds=bg.expand(n_views, 3),
            packed=False,
            render_mode="RGB",
            **extra,
        )
        rgbs.append(rgb)
        alphas.append(alpha)
    return torch.stack(rgbs), torch.stack(alphas)


def _render_batch_in_one_call(
    rasterize, g: PixelGaussians, c2w: Tensor, intrinsics: Tensor, width: int, height: int, bg: Tensor,
    near_plane: float, extra: Dict,
) -> Tuple[Tensor, Tensor]:
    """All B items' Gaussians seen by all B x V cameras in one rasterizer call: one launch sequence instead of B.

    Item b and its cameras are moved by ``b * spacing`` along x. Every camera's own Gaussians lie within ``reach``
    of it; the far plane sits just beyond, and the spacing puts every other item's Gaussians more than 20 far planes
    plus their 3-sigma extent away: each is either beyond the far plane or more than 87 degrees off the view axis,
    its footprint off the image. So each camera sees exactly its own item, as in the per-item loop. The move costs
    about 1e-4 world units of float32 precision for a batch of 8 (a pixel is ~0.02 at the generated data's scale).
    """
    b, v = c2w.shape[:2]
    centres = c2w[..., :3, 3]  # [B, V, 3]
    with torch.no_grad():  # one host sync per call (one .tolist()), for the float planes gsplat takes
        reach, extent, footprint = torch.stack([
            (g.means[:, None] - centres[:, :, None]).norm(dim=-1).amax(),
            torch.maximum(g.means.abs().amax(), centres.abs().amax()),
            3.0 * g.scales.amax(),
        ]).tolist()
    far = 1.01 * reach + 1e-3
    spacing = 20.0 * far + 2.0 * extent + footprint + 1.0
    offset = torch.zeros(b, 3, device=g.means.device, dtype=g.means.dtype)
    offset[:, 0] = torch.arange(b, device=g.means.device, dtype=g.means.dtype) * spacing
    moved = c2w.clone()
    moved[..., :3, 3] = centres + offset[:, None]
    rgb, alpha, _ = rasterize(
        means=(g.means + offset[:, None]).reshape(-1, 3),
        quats=g.quats.reshape(-1, 4),
        scales=g.scales.reshape(-1, 3),
        opacities=g.opacities.reshape(-1),
        colors=g.colors.reshape(-1, 3),
        viewmats=camera_to_world_to_viewmat(moved.reshape(b * v, 4, 4)),
        Ks=intrinsics_to_K(intrinsics.reshape(b * v, 4)),
        width=int(width),
        height=int(height),
        near_plane=near_plane,
        far_plane=far,
        backgrounds=bg.expand(b * v, 3),
        render_mode="RGB",
        **extra,
    )
    return rgb.reshape(b, v, height, width, 3), alpha.reshape(b, v, height, width, 1)
