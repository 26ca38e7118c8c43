"""Pure-PyTorch differentiable 3D Gaussian rasterizer (CPU path and GPU reference).

:func:`rasterization_reference` follows the maths and the keyword interface of
``gsplat.rendering.rasterization`` (gsplat 1.4.0, ``packed=False``, pinhole camera).
Everything is plain PyTorch, so it runs on any device and is differentiated by
autograd. It is the CPU training path of this project and the reference the CUDA
kernels are checked against (``benchmarks/check_render_parity.py``).

Pipeline (per camera batch, all cameras at once):

1. **Projection** (:func:`fully_fused_projection_reference`): ``Sigma = R S S^T R^T``,
   world to camera, EWA projection ``J Sigma_c J^T`` where the Jacobian uses the
   camera-space ``x/z`` and ``y/z`` clamped to the image extent widened by 30% of the
   half field of view on each side (gsplat's limits), ``eps2d`` added to the diagonal
   of the 2D covariance, conic = its inverse, radius ``ceil(3 sqrt(lambda_max))`` with
   ``lambda_max = b + sqrt(max(0.01, b^2 - det))``. A Gaussian is culled (radius 0)
   when its depth is outside ``[near_plane, far_plane]``, the blurred determinant is
   ``<= 0``, the radius is ``<= radius_clip`` or its ``mean +- radius`` box lies
   entirely outside the image.
2. **Colours**: post-activation colours ``[N, D]`` / ``[C, N, D]``, or SH coefficients
   evaluated along ``mean - camera centre`` and mapped by ``clamp_min(x + 0.5, 0)``.
3. **Tile membership**: a Gaussian is listed in every tile touched by its
   ``[mean - radius, mean + radius]`` box (gsplat's ``isect_tiles`` rounding:
   ``floor((m - r) / tile)`` inclusive to ``ceil((m + r) / tile)`` exclusive,
   clamped to the tile grid). A pixel only sees the Gaussians of its tile.
4. **Compositing**: pixel centres at ``(x + 0.5, y + 0.5)``,
   ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``, pairs with ``sigma < 0`` are skipped,
   ``alpha = min(0.999, o exp(-sigma))``, pairs with ``alpha < 1/255`` are skipped,
   front to back by depth; a pixel stops *before* the Gaussian that would bring its
   transmittance to ``<= 1e-4``. ``colour = sum_i T_i alpha_i c_i + T_final bg``,
   ``alpha = 1 - T_final``.

Implementation of the compositor (no dense pixel x Gaussian evaluation): the
(Gaussian, pixel) pairs of each Gaussian's tile box are enumerated in depth order
(the box is first intersected with the bounding box of the ellipse
``opacity exp(-sigma) = 1/255``, outside of which every pair fails the alpha test, so
this pruning changes nothing), alphas are evaluated without autograd to drop the
skipped pairs, the survivors are stably sorted by pixel id, the transmittance is an
exclusive segmented cumulative sum of ``log(1 - alpha)`` per pixel (float64), pairs
past the ``1e-4`` cut-off are dropped, and only the final pairs are re-evaluated
with autograd and accumulated with ``index_add``.

``tile_size`` is a real parameter. ``tile_size=16`` reproduces gsplat's tile lists
exactly (use it for parity with the CUDA kernels). ``tile_size=1`` applies the same
rule per pixel: each pixel then only sees the Gaussians whose ``mean +- radius``
pixel box contains it (per-pixel bounding-box membership, the CPU training setting).
The only difference to ``tile_size=16`` is the loss of the faint tails just outside
the 3-sigma box (alpha there is at most about ``opacity * exp(-4.5) ~ 0.011 *
opacity``). Thanks to the ellipse pruning below, both cost about the same on CPU
(20k Gaussians of radius 2-5 px, 100x100 px, forward + backward: ~70 ms on 2 cores).

Numerics: the projection runs in the input dtype (float32 on the training path, the
same precision as gsplat); transmittances are accumulated in float64. Against
gsplat's CUDA kernels (built with --use_fast_math) the images agree to ~1e-5 except
at rare pixels where a pair sits exactly on one of the hard thresholds
(alpha >= 1/255, T > 1e-4, ceil of the radius) and float32 rounding decides
differently; see ``benchmarks/check_render_parity.py``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "rasterization_reference",
    "fully_fused_projection_reference",
    "spherical_harmonics_reference",
    "isect_tile_bounds",
    "rasterize_to_pixels_reference",
]

# Real SH constants (Sloan, "Efficient Spherical Harmonic Evaluation", JCGT 2013),
# same basis ordering / signs as gsplat and the original 3DGS code.
_SH_C0 = 0.2820947917738781
_SH_C1 = 0.48860251190292

_ALPHA_MAX = 0.999
_ALPHA_MIN = 1.0 / 255.0
_T_MIN = 1e-4

# Upper bound on the number of (Gaussian, pixel) candidate pairs evaluated at once
# in the (no-grad) pre-pass; bounds memory for large GPU scenes.
_MAX_PAIRS_PER_CHUNK = 1 << 25
# Candidate pairs per band of pixel rows in `_candidate_pairs`: bounds the pairs held before the transmittance cut-off.
_MAX_PAIRS_PER_BAND = 1 << 26


# --------------------------------------------------------------------------- #
# Projection
# --------------------------------------------------------------------------- #
def _quats_to_rotmats(quats: Tensor) -> Tensor:
    """[..., 4] wxyz (unnormalised) -> [..., 3, 3] rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    r00 = 1.0 - 2.0 * (y * y + z * z)
    r01 = 2.0 * (x * y - w * z)
    r02 = 2.0 * (x * z + w * y)
    r10 = 2.0 * (x * y + w * z)
    r11 = 1.0 - 2.0 * (x * x + z * z)
    r12 = 2.0 * (y * z - w * x)
    r20 = 2.0 * (x * z - w * y)
    r21 = 2.0 * (y * z + w * x)
    r22 = 1.0 - 2.0 * (x * x + y * y)
    rows = torch.stack([r00, r01, r02, r10, r11, r12, r20, r21, r22], dim=-1)
    return rows.reshape(quats.shape[:-1] + (3, 3))


def _covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """Sigma = R S S^T R^T, [N, 3, 3]."""
    M = _quats_to_rotmats(quats) * scales[..., None, :]  # R @ diag(s)
    return M @ M.transpose(-1, -2)


def fully_fused_projection_reference(
    means: Tensor,  # [N, 3]
    quats: Optional[Tensor],  # [N, 4]
    scales: Optional[Tensor],  # [N, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
    covars: Optional[Tensor] = None,  # [N, 3, 3] instead of quats / scales
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """EWA projection of 3D Gaussians, same maths as gsplat's fused projection kernel.

    Returns ``(radii [C,N] int32, means2d [C,N,2], depths [C,N], conics [C,N,3],
    compensations [C,N] or None)``. Entries of culled Gaussians (``radii == 0``) are
    zero in ``means2d`` / ``depths`` / ``conics`` / ``compensations`` and carry no
    gradient. ``conics`` holds the upper triangle ``(a, b, c)`` of the inverse 2D
    covariance. The skew entry ``K[0, 1]`` is ignored, as in gsplat's kernel.
    """
    if covars is None:
        covars = _covariances(quats, scales)  # [N, 3, 3]
    R = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C, N, 3]
    covars_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)  # [C, N, 3, 3]

    x, y, z = means_c.unbind(-1)  # [C, N]
    fx = Ks[:, 0, 0, None]
    fy = Ks[:, 1, 1, None]
    cx = Ks[:, 0, 2, None]
    cy = Ks[:, 1, 2, None]

    # Depth culling first: later maths divides by z, keep it finite for culled ones.
    depth_ok = (z >= near_plane) & (z <= far_plane)
    z_safe = torch.where(depth_ok & (z != 0), z, torch.ones_like(z))
    rz = 1.0 / z_safe
    rz2 = rz * rz

    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    # clamp() passes the gradient on the closed interval, like gsplat's backward.
    tx = z_safe * torch.clamp(x * rz, min=-lim_x_neg, max=lim_x_pos)
    ty = z_safe * torch.clamp(y * rz, min=-lim_y_neg, max=lim_y_pos)

    zero = torch.zeros_like(z)
    J = torch.stack(
        [fx * rz, zero, -fx * tx * rz2, zero, fy * rz, -fy * ty * rz2], dim=-1
    ).reshape(z.shape + (2, 3))
    cov2d = J @ covars_c @ J.transpose(-1, -2)  # [C, N, 2, 2]
    u = fx * x * rz + cx
    v = fy * y * rz + cy

    c00 = cov2d[..., 0, 0]
    c01 = cov2d[..., 0, 1]
    c11 = cov2d[..., 1, 1]
    det_orig = c00 * c11 - c01 * c01
    a_blur = c00 + eps2d
    c_blur = c11 + eps2d
    det = a_blur * c_blur - c01 * c01

    compensations = None
    if calc_compensations:
        ratio = det_orig / torch.where(det > 0, det, torch.ones_like(det))
        pos = ratio > 0
        compensations = torch.where(
            pos, torch.sqrt(torch.where(pos, ratio, torch.ones_like(ratio))), zero
        )

    with torch.no_grad():
        b_half = 0.5 * (a_blur + c_blur)
        v1 = b_half + torch.sqrt(torch.clamp(b_half * b_half - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(torch.clamp(v1, min=0.0)))
        radius = torch.nan_to_num(radius, nan=0.0, posinf=0.0, neginf=0.0)
        valid = depth_ok & (det > 0) & (radius > radius_clip)
        valid &= (u + radius > 0) & (u - radius < width)
        valid &= (v + radius > 0) & (v - radius < height)
        radii = torch.where(valid, radius, torch.zeros_like(radius)).to(torch.int32)

    det_safe = torch.where(valid, det, torch.ones_like(det))
    inv_det = 1.0 / det_safe
    conics = torch.stack([c_blur * inv_det, -c01 * inv_det, a_blur * inv_det], dim=-1)

    means2d = torch.where(valid[..., None], torch.stack([u, v], dim=-1), 0.0)
    conics = torch.where(valid[..., None], conics, 0.0)
    depths = torch.where(valid, z, 0.0)
    if compensations is not None:
        compensations = torch.where(valid, compensations, 0.0)
    return radii, means2d, depths, conics, compensations


# --------------------------------------------------------------------------- #
# Spherical harmonics
# --------------------------------------------------------------------------- #
def _sh_bases(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis values at unit directions, [..., (degree+1)^2]."""
    out = [torch.full_like(dirs[..., 0], _SH_C0)]
    if degree >= 1:
        x, y, z = dirs.unbind(-1)
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        z2 = z * z
        c1 = x * x - y * y
        s1 = 2.0 * x * y
        t_b = -1.092548430592079 * z
        sh6 = 0.9461746957575601 * z2 - 0.3153915652525201
        out += [0.5462742152960395 * s1, t_b * y, sh6, t_b * x, 0.5462742152960395 * c1]
    if degree >= 3:
        c2 = x * c1 - y * s1
        s2 = x * s1 + y * c1
        t_c = -2.285228997322329 * z2 + 0.4570457994644658
        t_b3 = 1.445305721320277 * z
        sh12 = z * (1.865881662950577 * z2 - 1.119528997770346)
        out += [
            -0.5900435899266435 * s2,
            t_b3 * s1,
            t_c * y,
            sh12,
            t_c * x,
            t_b3 * c1,
            -0.5900435899266435 * c2,
        ]
    if degree >= 4:
        c3 = x * c2 - y * s2
        s3 = x * s2 + y * c2
        t_d = z * (-4.683325804901025 * z2 + 2.007139630671868)
        t_c4 = 3.31161143515146 * z2 - 0.47308734787878
        t_b4 = -1.770130769779931 * z
        sh20 = 1.984313483298443 * z * sh12 - 1.006230589874905 * sh6
        out += [
            0.6258357354491763 * s3,
            t_b4 * s2,
            t_c4 * s1,
            t_d * y,
            sh20,
            t_d * x,
            t_c4 * c1,
            t_b4 * c2,
            0.6258357354491763 * c3,
        ]
    return torch.stack(out, dim=-1)


def spherical_harmonics_reference(
    degree: int,
    dirs: Tensor,  # [..., 3], need not be normalised
    coeffs: Tensor,  # [..., K, 3], K >= (degree + 1)^2
    masks: Optional[Tensor] = None,  # [...] bool; False -> colour 0
) -> Tensor:
    """Evaluate SH colours (before gsplat's ``+ 0.5`` / clamp), [..., 3]."""
    if not 0 <= degree <= 4:
        raise ValueError(f"sh_degree must be in [0, 4], got {degree}")
    n_bases = (degree + 1) ** 2
    if coeffs.shape[-2] < n_bases:
        raise ValueError(f"need at least {n_bases} SH coefficients, got {coeffs.shape[-2]}")
    dirs = F.normalize(dirs, p=2, dim=-1)
    bases = _sh_bases(degree, dirs)  # [..., n_bases]
    colors = (bases[..., None] * coeffs[..., :n_bases, :]).sum(dim=-2)
    if masks is not None:
        colors = torch.where(masks[..., None], colors, 0.0)
    return colors


# --------------------------------------------------------------------------- #
# Tile intersection
# --------------------------------------------------------------------------- #
@torch.no_grad()
def isect_tile_bounds(
    means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int
) -> Tuple[Tensor, Tensor]:
    """Tile range of each Gaussian, gsplat ``isect_tiles`` rounding.

    Returns ``(tile_min [..., 2], tile_max [..., 2])`` int64 (x, y); ``tile_min`` is
    inclusive, ``tile_max`` exclusive, both clamped to the tile grid. Gaussians with
    ``radii <= 0`` get an empty range.
    """
    r = radii.to(means2d.dtype)
    tile_r = (r / float(tile_size))[..., None]
    tile_xy = means2d.detach() / float(tile_size)
    lo = torch.floor(tile_xy - tile_r)
    hi = torch.ceil(tile_xy + tile_r)
    lim = torch.tensor([tile_width, tile_height], device=means2d.device, dtype=lo.dtype)
    zero = torch.zeros((), device=means2d.device, dtype=lo.dtype)
    lo = torch.minimum(torch.maximum(lo, zero), lim).to(torch.int64)
    hi = torch.minimum(torch.maximum(hi, zero), lim).to(torch.int64)
    empty = (radii <= 0)[..., None]
    hi = torch.where(empty, lo, hi)
    return lo, hi


# --------------------------------------------------------------------------- #
# Compositing
# --------------------------------------------------------------------------- #
def _segment_starts(keys: Tensor) -> Tensor:
    """For a sorted key array, the index of the first element of each element's run."""
    n = keys.shape[0]
    idx = torch.arange(n, device=keys.device)
    is_start = torch.ones(n, dtype=torch.bool, device=keys.device)
    if n > 1:
        is_start[1:] = keys[1:] != keys[:-1]
    starts = torch.where(is_start, idx, torch.zeros_like(idx))
    return torch.cummax(starts, dim=0).values


def _exclusive_segment_cumsum(values: Tensor, starts: Tensor) -> Tensor:
    """Exclusive cumulative sum restarting at every segment start (autograd-friendly).

    ``values`` should be float64: the global cumsum is subtracted at segment starts.
    """
    excl = torch.cumsum(values, dim=0) - values
    return excl - excl.index_select(0, starts)


def _pair_sigma_alpha(
    xy: Tensor, conic: Tensor, opac: Tensor, pix_x: Tensor, pix_y: Tensor
) -> Tuple[Tensor, Tensor]:
    dx = xy[:, 0] - (pix_x.to(xy.dtype) + 0.5)
    dy = xy[:, 1] - (pix_y.to(xy.dtype) + 0.5)
    sigma = 0.5 * (conic[:, 0] * dx * dx + conic[:, 2] * dy * dy) + conic[:, 1] * dx * dy
    alpha = torch.clamp(opac * torch.exp(-sigma), max=_ALPHA_MAX)
    return sigma, alpha


@torch.no_grad()
def _candidate_pairs(
    means2d: Tensor,  # [C*N, 2] detached
    conics: Tensor,  # [C*N, 3] detached
    opacities: Tensor,  # [C*N] detached
    radii: Tensor,  # [C*N]
    depths: Tensor,  # [C*N]
    n_per_cam: int,
    width: int,
    height: int,
    tile_size: int,
) -> Tuple[Tensor, Tensor]:
    """Enumerate the (Gaussian, pixel) pairs that are composited, sorted by (pixel, depth).

    Returns ``(gauss_ids, pix_ids)`` (flat ids in ``[0, C*N)`` and global pixel ids
    ``camera * H * W + y * W + x``) of the pairs with ``sigma >= 0``,
    ``alpha >= 1/255`` that come before their pixel's ``T <= 1e-4`` cut-off.
    """
    device = means2d.device
    tile_w = math.ceil(width / float(tile_size))
    tile_h = math.ceil(height / float(tile_size))
    valid_ids = torch.nonzero(radii > 0, as_tuple=False).squeeze(1)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    if valid_ids.numel() == 0:
        return empty, empty

    # Front to back; ties keep the (camera, gaussian) index order like gsplat's
    # stable radix sort.
    order = torch.sort(depths[valid_ids], stable=True).indices
    gids = valid_ids[order]

    xy = means2d[gids]
    lo, hi = isect_tile_bounds(xy, radii[gids], tile_size, tile_w, tile_h)
    x0 = lo[:, 0] * tile_size
    y0 = lo[:, 1] * tile_size
    x1 = torch.clamp(hi[:, 0] * tile_size, max=width)
    y1 = torch.clamp(hi[:, 1] * tile_size, max=height)

    # Pure pruning (does not change the result): outside the ellipse
    # o exp(-sigma) = 1/255 every pair fails the alpha >= 1/255 test, so the pixel
    # range is intersected with the ellipse's bounding box (with a safety slack for
    # float rounding in sigma). Much fewer candidates, above all for large tiles.
    q = conics[gids].to(torch.float64)
    det_q = q[:, 0] * q[:, 2] - q[:, 1] * q[:, 1]
    s_max = torch.log(255.0 * opacities[gids].to(torch.float64))
    s_max = torch.nan_to_num(s_max, nan=-1.0, posinf=1e3, neginf=-1.0)
    s_max = s_max + 0.05 + 0.01 * s_max.abs()
    ok = (det_q > 0) & torch.isfinite(det_q)
    safe_det = torch.where(ok, det_q, torch.ones_like(det_q))
    ex = torch.sqrt(torch.clamp(2.0 * s_max * q[:, 2] / safe_det, min=0.0)) * 1.001 + 0.01
    ey = torch.sqrt(torch.clamp(2.0 * s_max * q[:, 0] / safe_det, min=0.0)) * 1.001 + 0.01
    mx = xy[:, 0].to(torch.float64)
    my = xy[:, 1].to(torch.float64)
    big = float(max(width, height) + 1)
    ex_lo = torch.ceil(mx - ex - 0.5).clamp(-big, big).to(torch.int64)
    ex_hi = torch.floor(mx + ex - 0.5).clamp(-big, big).to(torch.int64) + 1
    ey_lo = torch.ceil(my - ey - 0.5).clamp(-big, big).to(torch.int64)
    ey_hi = torch.floor(my + ey - 0.5).clamp(-big, big).to(torch.int64) + 1
    x0 = torch.where(ok, torch.maximum(x0, ex_lo), x0)
    x1 = torch.where(ok, torch.minimum(x1, ex_hi), x1)
    y0 = torch.where(ok, torch.maximum(y0, ey_lo), y0)
    y1 = torch.where(ok, torch.minimum(y1, ey_hi), y1)
    bw = torch.clamp(x1 - x0, min=0)
    cam = torch.div(gids, n_per_cam, rounding_mode="floor")
    # Rows counted over all cameras (camera * H + y): global pixel ids grow with them, so pixel bands processed in
    # order give pairs already sorted by pixel.
    row0, row1 = cam * height + y0, cam * height + torch.clamp(y1, min=y0)
    bw1 = torch.clamp(bw, min=1)
    flt_tab = torch.cat([xy, conics[gids], opacities[gids, None]], dim=1)

    # Bands of rows bound the memory: every candidate pair of a band is held until the band's transmittance cut-off
    # (Gaussians near a camera cover much of the image, and the pairs behind them are only dropped by that cut-off).
    total = int((bw * (row1 - row0)).sum().item())
    n_rows = (means2d.shape[0] // n_per_cam) * height
    band_rows = max(1, math.ceil(n_rows / max(1, math.ceil(total / _MAX_PAIRS_PER_BAND))))
    bands = [
        _band_pairs(gids, flt_tab, x0, bw, bw1, row0, row1, r0, r0 + band_rows, width, height)
        for r0 in range(0, n_rows, band_rows)
    ]
    return torch.cat([g for g, _ in bands]), torch.cat([p for _, p in bands])


def _band_pairs(
    gids: Tensor,
    flt_tab: Tensor,
    x0: Tensor,
    bw: Tensor,
    bw1: Tensor,
    row0: Tensor,
    row1: Tensor,
    band_start: int,
    band_stop: int,
    width: int,
    height: int,
) -> Tuple[Tensor, Tensor]:
    """The composited pairs of the global rows [band_start, band_stop), sorted by (pixel, depth): each Gaussian's
    pixel box (columns [x0, x0 + bw), global rows [row0, row1)) clipped to the band, the sigma / alpha tests, then
    the transmittance cut-off."""
    device = gids.device
    empty = torch.empty(0, dtype=torch.int64, device=device)
    r0 = torch.clamp(row0, min=band_start)
    counts = bw * torch.clamp(torch.clamp(row1, max=band_stop) - r0, min=0)
    base = r0 * width + x0  # global id of the clipped box's first pixel

    # Chunk over Gaussians (still in depth order) to bound the candidates held at once.
    cum = torch.cumsum(counts, dim=0)
    total = int(cum[-1].item())  # gids is never empty here: _candidate_pairs returns early without visible Gaussians
    if total == 0:  # no Gaussian covers a row of this band
        return empty, empty
    bounds = [0]
    if total > _MAX_PAIRS_PER_CHUNK:
        cuts = torch.arange(_MAX_PAIRS_PER_CHUNK, total, _MAX_PAIRS_PER_CHUNK, device=device)
        bounds += torch.searchsorted(cum, cuts, right=True).tolist()
    bounds.append(gids.numel())

    out_g, out_p, out_om = [], [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        cnt = counts[s:e]
        n_pairs = int(cnt.sum().item())
        if n_pairs == 0:
            continue
        local_g = torch.repeat_interleave(torch.arange(s, e, device=device), cnt)
        first = torch.cumsum(cnt, dim=0) - cnt  # first pair of each Gaussian in chunk
        k = torch.arange(n_pairs, device=device) - first.index_select(0, local_g - s)
        w_pair = bw1.index_select(0, local_g)
        ly = torch.div(k, w_pair, rounding_mode="floor")
        lx = k - ly * w_pair
        pix = base.index_select(0, local_g) + ly * width + lx
        in_img = torch.remainder(pix, height * width)
        py = torch.div(in_img, width, rounding_mode="floor")
        px = in_img - py * width
        f = flt_tab.index_select(0, local_g)  # [M, 6]
        sigma, alpha = _pair_sigma_alpha(f[:, 0:2], f[:, 2:5], f[:, 5], px, py)
        keep = torch.nonzero((sigma >= 0) & (alpha >= _ALPHA_MIN)).squeeze(1)
        out_g.append(gids.index_select(0, local_g.index_select(0, keep)))
        out_p.append(pix.index_select(0, keep))
        out_om.append((1.0 - alpha).index_select(0, keep))
    if not out_g:
        return empty, empty
    g = torch.cat(out_g)
    p = torch.cat(out_p)
    om = torch.cat(out_om)

    # Stable sort by pixel keeps the depth order inside each pixel.
    p, perm = torch.sort(p, stable=True)
    g = g.index_select(0, perm)
    om = om.index_select(0, perm)

    # Transmittance cut-off: keep a pair while T after it stays > 1e-4. The
    # inclusive log-transmittance is non-increasing in a pixel, so this is a prefix.
    log_om = torch.log(om.to(torch.float64))
    starts = _segment_starts(p)
    incl = _exclusive_segment_cumsum(log_om, starts) + log_om
    keep = torch.nonzero(torch.exp(incl) > _T_MIN).squeeze(1)
    return g.index_select(0, keep), p.index_select(0, keep)


def rasterize_to_pixels_reference(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    colors: Tensor,  # [C, N, D]
    opacities: Tensor,  # [C, N]
    radii: Tensor,  # [C, N]
    depths: Tensor,  # [C, N] (only the order is used)
    width: int,
    height: int,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,  # [C, D]
    absgrad: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Sparse front-to-back alpha compositing, gsplat ``rasterize_to_pixels`` maths.

    Returns ``(render_colors [C,H,W,D], render_alphas [C,H,W,1])``. With
    ``absgrad=True`` a backward hook stores ``means2d.absgrad`` [C, N, 2]: the sum
    over (pixel, Gaussian) pairs of ``|dL/d mean2d|`` (per component), like gsplat.
    """
    C, N = means2d.shape[:2]
    D = colors.shape[-1]
    dtype = means2d.dtype
    device = means2d.device
    n_pix = C * height * width

    flat_xy = means2d.reshape(C * N, 2)
    flat_conic = conics.reshape(C * N, 3)
    flat_opac = opacities.reshape(C * N)
    flat_col = colors.reshape(C * N, D)

    g, p = _candidate_pairs(
        flat_xy.detach(),
        flat_conic.detach(),
        flat_opac.detach(),
        radii.reshape(C * N),
        depths.detach().reshape(C * N),
        N,
        width,
        height,
        tile_size,
    )

    # Differentiable evaluation on the surviving pairs only.
    xy = flat_xy.index_select(0, g)
    if absgrad and xy.requires_grad:
        def _hook(grad: Tensor, _g=g, _target=means2d) -> None:
            acc = torch.zeros((C * N, 2), dtype=grad.dtype, device=grad.device)
            acc.index_add_(0, _g, grad.abs())
            _target.absgrad = acc.reshape(C, N, 2)

        xy.register_hook(_hook)
    pix_in_img = torch.remainder(p, height * width)
    px = torch.remainder(pix_in_img, width)
    py = torch.div(pix_in_img, width, rounding_mode="floor")
    _, alpha = _pair_sigma_alpha(
        xy, flat_conic.index_select(0, g), flat_opac.index_select(0, g), px, py
    )
    log_om = torch.log((1.0 - alpha).to(torch.float64))
    starts = _segment_starts(p)
    T = torch.exp(_exclusive_segment_cumsum(log_om, starts)).to(dtype)
    weights = alpha * T  # [M]

    acc_col = torch.zeros((n_pix, D), dtype=colors.dtype, device=device)
    acc_col = acc_col.index_add(0, p, weights[:, None] * flat_col.index_select(0, g))
    log_T_final = torch.zeros(n_pix, dtype=torch.float64, device=device).index_add(0, p, log_om)
    T_final = torch.exp(log_T_final).to(dtype)[:, None]  # [C*H*W, 1]

    render_colors = acc_col.reshape(C, height, width, D)
    T_img = T_final.reshape(C, height, width, 1)
    if backgrounds is not None:
        render_colors = render_colors + T_img * backgrounds[:, None, None, :]
    render_alphas = 1.0 - T_img
    return render_colors, render_alphas


# --------------------------------------------------------------------------- #
# Full pipeline
# --------------------------------------------------------------------------- #
def rasterization_reference(
    means: Tensor,  # [N, 3]
    quats: Optional[Tensor],  # [N, 4]
    scales: Optional[Tensor],  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [(C,) N, D] or [(C,) N, K, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,  # [C, D]
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
    absgrad: bool = False,
    **unused,
) -> Tuple[Tensor, Tensor, Dict]:
    """Pure-PyTorch drop-in for ``gsplat.rasterization`` (``packed=False``, pinhole).

    Same arguments / outputs as gsplat 1.4.0 for the supported subset:
    ``render_colors [C,H,W,D']``, ``render_alphas [C,H,W,1]`` and ``meta`` with
    ``means2d`` (retain its grad for densification; ``absgrad=True`` adds
    ``meta["means2d"].absgrad`` after backward), ``radii`` (int32), ``depths``,
    ``conics``, ``opacities`` ([C, N]), ``width``, ``height``, ``tile_size``,
    ``tile_width``, ``tile_height``, ``n_cameras``, ``gaussian_ids=None``,
    ``camera_ids=None``.

    ``tile_size=16`` reproduces gsplat's per-tile Gaussian lists exactly (GPU parity).
    ``tile_size=1`` gives per-pixel bounding-box membership: a pixel sees a Gaussian
    only inside its ``mean +- radius`` box. It differs from tile 16 only by the faint
    tails just outside the 3-sigma box (alpha <= ~0.011 * opacity there); CPU
    training uses it. Pairs are enumerated sparsely (never pixels x Gaussians), so
    the cost scales with the number of (pixel, Gaussian) overlaps.

    ``rasterize_mode="antialiased"`` multiplies opacities by
    ``sqrt(max(0, det(cov2d) / det(cov2d + eps2d I)))`` as gsplat does. ``covars``
    ([N, 3, 3]) may be passed as a keyword instead of ``quats`` / ``scales``.
    Unsupported: ``packed=True``, ``distributed=True``, non-pinhole cameras.
    """
    if packed:
        raise NotImplementedError(
            "rasterization_reference only implements packed=False (identical images; "
            "only the meta layout differs)"
        )
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"unknown rasterize_mode {rasterize_mode!r}")
    if render_mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"unknown render_mode {render_mode!r}")
    camera_model = unused.pop("camera_model", "pinhole")
    if camera_model != "pinhole":
        raise NotImplementedError(f"camera_model={camera_model!r}: only 'pinhole' is implemented")
    if unused.pop("distributed", False):
        raise NotImplementedError("distributed rendering is not supported by the reference")
    covars = unused.pop("covars", None)
    # sparse_grad / channel_chunk only change gsplat's memory layout / chunking.
    unused.pop("sparse_grad", None)
    unused.pop("channel_chunk", None)
    if unused:
        raise TypeError(f"unexpected arguments: {sorted(unused)}")
    if tile_size < 1:
        raise ValueError("tile_size must be >= 1")

    N = means.shape[0]
    C = viewmats.shape[0]
    assert means.shape == (N, 3), means.shape
    if covars is None:
        assert quats is not None and quats.shape == (N, 4), None if quats is None else quats.shape
        assert scales is not None and scales.shape == (N, 3), None if scales is None else scales.shape
    else:
        assert covars.shape == (N, 3, 3), covars.shape
    assert opacities.shape == (N,), opacities.shape
    assert viewmats.shape == (C, 4, 4), viewmats.shape
    assert Ks.shape == (C, 3, 3), Ks.shape

    radii, means2d, depths, conics, compensations = fully_fused_projection_reference(
        means,
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
        calc_compensations=(rasterize_mode == "antialiased"),
        covars=covars,
    )
    opacities_cn = opacities[None, :].expand(C, N)
    if compensations is not None:
        opacities_cn = opacities_cn * compensations

    if sh_degree is None:
        assert (colors.dim() == 2 and colors.shape[0] == N) or (
            colors.dim() == 3 and colors.shape[:2] == (C, N)
        ), colors.shape
        colors_cn = colors.expand(C, -1, -1) if colors.dim() == 2 else colors
    else:
        assert (colors.dim() == 3 and colors.shape[0] == N and colors.shape[2] == 3) or (
            colors.dim() == 4 and colors.shape[:2] == (C, N) and colors.shape[3] == 3
        ), colors.shape
        cam_centres = torch.inverse(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means[None, :, :] - cam_centres[:, None, :]  # [C, N, 3]
        shs = colors.expand(C, -1, -1, -1) if colors.dim() == 3 else colors
        colors_cn = spherical_harmonics_reference(sh_degree, dirs, shs, masks=radii > 0)
        colors_cn = torch.clamp_min(colors_cn + 0.5, 0.0)

    if render_mode in ("RGB+D", "RGB+ED"):
        colors_cn = torch.cat([colors_cn, depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        colors_cn = depths[..., None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(C, 1)
    if backgrounds is not None:
        assert backgrounds.shape == (C, colors_cn.shape[-1]), backgrounds.shape

    render_colors, render_alphas = rasterize_to_pixels_reference(
        means2d,
        conics,
        colors_cn,
        opacities_cn,
        radii,
        depths,
        width,
        height,
        tile_size=tile_size,
        backgrounds=backgrounds,
        absgrad=absgrad,
    )
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)],
            dim=-1,
        )

    meta = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities_cn,
        "tile_width": math.ceil(width / float(tile_size)),
        "tile_height": math.ceil(height / float(tile_size)),
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": C,
    }
    return render_colors, render_alphas, meta
