"""Render loss contribution of each Gaussian (after DeG): the first-order change of the loss when it is removed.

With gsplat's front-to-back compositing a pixel ``p`` is ``C_p = sum_i T_i a_i c_i + T_end bg``. Removing Gaussian
``j`` (and keeping the rest of the pixel's list) rescales everything behind it by ``1 / (1 - a_j)``::

    dC_{j,p} = -T_j a_j c_j + a_j / (1 - a_j) * S_{j,p},    S_{j,p} = sum_{i>j} T_i a_i c_i + T_end bg
                                                                    = C_p - sum_{i<=j} T_i a_i c_i

This is the exact colour change of removing ``j`` as long as the ``T <= 1e-4`` cut-off of the pixel does not move.
Given ``G_p = dL/dC_p`` the outputs, summed over pixels and cameras, are

* ``delta_loss[j] = sum_p <G_p, dC_{j,p}>``: first-order ``L(without j) - L``; negative means removing ``j`` helps,
* ``pixel_count[j]``: number of pixels where ``j`` was composited (passed ``sigma >= 0``, ``alpha >= 1/255`` and
  came before the transmittance cut-off),
* ``weight_sum[j] = sum_p T_j a_j``: its total blending weight.

Compositing follows gsplat 1.4.0's ``rasterize_to_pixels`` exactly (see ``render/reference.py``): pixel centres at
``(x + 0.5, y + 0.5)``, ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``, ``alpha = min(0.999, o exp(-sigma))``, pairs with
``sigma < 0`` or ``alpha < 1/255`` skipped, a pixel stops before the Gaussian that brings ``T`` to ``<= 1e-4``, and
each pixel sees the list of its tile (``isect_offsets`` / ``flatten_ids`` from gsplat's ``isect_tiles`` /
``isect_offset_encode``, unpacked layout: ``flatten_ids`` index the flattened ``[C * N]`` Gaussians).

:func:`render_loss_contribution` runs the CUDA kernel (``csrc/contribution.cu``) on CUDA tensors and
:func:`render_loss_contribution_reference` (pure PyTorch, same signature) otherwise. Nothing is differentiated.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_splat_ext.render.reference import (
    _exclusive_segment_cumsum,
    _segment_starts,
    isect_tile_bounds,
)

__all__ = [
    "render_loss_contribution",
    "render_loss_contribution_reference",
    "isect_lists_reference",
    "load_contribution_extension",
]

_ALPHA_MAX = 0.999
_ALPHA_MIN = 1.0 / 255.0
_T_MIN = 1e-4

# Channel counts the kernel is instantiated for; other counts are split into these (the outputs are linear in the
# channels, so chunks just add up).
_KERNEL_CHANNELS = (32, 16, 8, 4, 3, 2, 1)

_EXT_NAME = "contribution"
# One extension for the density-control kernels (one JIT build): the contribution pass and the per-view
# statistics of cuda/view_stats.py.
_EXT_SOURCES = ("contribution.cpp", "contribution.cu", "view_stats.cu")

ContributionOutputs = Tuple[Tensor, Tensor, Tensor]


# --------------------------------------------------------------------------- #
# Argument normalisation (shared by both paths)
# --------------------------------------------------------------------------- #
def _normalise_inputs(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    colors: Tensor,
    backgrounds: Optional[Tensor],
    grad_colors: Tensor,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    image_width: int,
    image_height: int,
    tile_size: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
    """Detach, broadcast the per-Gaussian inputs to ``[C, N, ...]`` and check shapes.

    Accepted: ``opacities`` [C, N], [C, N, 1] or [N]; ``colors`` [C, N, D] or [N, D]; ``backgrounds`` None, [D] or
    [C, D]; ``grad_colors`` [C, H, W, D] or [H, W, D] when C == 1. Packed layouts (``means2d`` [nnz, 2]) are not.
    """
    if means2d.dim() != 3 or means2d.shape[-1] != 2:
        raise ValueError(f"means2d must be [C, N, 2] (packed=False layout), got {tuple(means2d.shape)}")
    C, N = means2d.shape[:2]
    means2d = means2d.detach()
    conics = conics.detach()
    if conics.shape != (C, N, 3):
        raise ValueError(f"conics must be [C, N, 3] = {(C, N, 3)}, got {tuple(conics.shape)}")
    opacities = opacities.detach()
    if opacities.dim() == 3 and opacities.shape[-1] == 1:
        opacities = opacities[..., 0]
    if opacities.dim() == 1:
        opacities = opacities[None].expand(C, N)
    if opacities.shape != (C, N):
        raise ValueError(f"opacities must be [C, N] or [N], got {tuple(opacities.shape)}")
    colors = colors.detach()
    if colors.dim() == 2:
        colors = colors[None].expand(C, -1, -1)
    if colors.dim() != 3 or colors.shape[:2] != (C, N):
        raise ValueError(f"colors must be [C, N, D] or [N, D], got {tuple(colors.shape)}")
    D = colors.shape[-1]
    grad_colors = grad_colors.detach()
    if grad_colors.dim() == 3:
        grad_colors = grad_colors[None]
    if grad_colors.shape != (C, image_height, image_width, D):
        raise ValueError(
            f"grad_colors must be [C, H, W, D] = {(C, image_height, image_width, D)}, got {tuple(grad_colors.shape)}"
        )
    if backgrounds is not None:
        backgrounds = backgrounds.detach()
        if backgrounds.dim() == 1:
            backgrounds = backgrounds[None].expand(C, -1)
        if backgrounds.shape != (C, D):
            raise ValueError(f"backgrounds must be [C, D] or [D], got {tuple(backgrounds.shape)}")
    tile_w = math.ceil(image_width / tile_size)
    tile_h = math.ceil(image_height / tile_size)
    if isect_offsets.shape != (C, tile_h, tile_w):
        raise ValueError(f"isect_offsets must be [C, tile_h, tile_w] = {(C, tile_h, tile_w)}, got {tuple(isect_offsets.shape)}")
    if flatten_ids.dim() != 1:
        raise ValueError(f"flatten_ids must be 1-D, got {tuple(flatten_ids.shape)}")
    return means2d, conics, opacities, colors, backgrounds, grad_colors, isect_offsets, flatten_ids


# --------------------------------------------------------------------------- #
# Tile lists on any device (gsplat isect_tiles + isect_offset_encode, packed=False)
# --------------------------------------------------------------------------- #
@torch.no_grad()
def isect_lists_reference(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N]
    depths: Tensor,  # [C, N]
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> Tuple[Tensor, Tensor]:
    """``(isect_offsets [C, tile_height, tile_width] int32, flatten_ids [M] int32)`` as gsplat 1.4.0 builds them.

    gsplat sorts the intersections by the key ``camera | tile | float bits of depth`` with a stable radix sort over
    entries generated in flat-index order, so each tile lists its Gaussians front to back with ties in flat-index
    order. Depths of listed Gaussians are positive (near-plane culling), where float order equals bit order.
    """
    C, N = means2d.shape[:2]
    device = means2d.device
    lo, hi = isect_tile_bounds(means2d, radii, tile_size, tile_width, tile_height)  # [C, N, 2] each
    span = (hi - lo).reshape(C * N, 2)
    counts = span[:, 0] * span[:, 1]
    flat = torch.arange(C * N, device=device)
    ids = torch.repeat_interleave(flat, counts)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(ids.numel(), device=device) - first[ids]  # rank inside the Gaussian's tile box
    w = span[ids, 0].clamp(min=1)
    lo_flat = lo.reshape(C * N, 2)
    tx = lo_flat[ids, 0] + k % w
    ty = lo_flat[ids, 1] + torch.div(k, w, rounding_mode="floor")
    cam = torch.div(ids, N, rounding_mode="floor")
    tile_key = (cam * tile_height + ty) * tile_width + tx
    # Lexicographic (tile, depth, flat id): stable sorts from the least significant key.
    order = torch.sort(depths.reshape(-1)[ids], stable=True).indices
    order = order[torch.sort(tile_key[order], stable=True).indices]
    n_tiles = C * tile_height * tile_width
    per_tile = torch.bincount(tile_key, minlength=n_tiles)
    offsets = (torch.cumsum(per_tile, 0) - per_tile).reshape(C, tile_height, tile_width)
    return offsets.to(torch.int32), ids[order].to(torch.int32)


# --------------------------------------------------------------------------- #
# Reference (pure PyTorch)
# --------------------------------------------------------------------------- #
@torch.no_grad()
def render_loss_contribution_reference(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    colors: Tensor,
    backgrounds: Optional[Tensor],
    grad_colors: Tensor,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    image_width: int,
    image_height: int,
    tile_size: int,
    max_pairs_per_chunk: Optional[int] = None,
) -> ContributionOutputs:
    """Pure-PyTorch :func:`render_loss_contribution` (any device).

    Vectorised over (tile-list entry, pixel of the tile) pairs, generated pixel-major inside each tile so that a
    pixel's pairs are contiguous and in list (depth) order; tiles are processed in chunks of at most
    ``max_pairs_per_chunk`` candidate pairs. ``sigma`` / ``alpha`` are evaluated in the input dtype (float32 like
    gsplat, or float64), transmittances and the colour sums in float64.
    """
    means2d, conics, opacities, colors, backgrounds, grad_colors, isect_offsets, flatten_ids = _normalise_inputs(
        means2d, conics, opacities, colors, backgrounds, grad_colors, isect_offsets, flatten_ids,
        image_width, image_height, tile_size,
    )
    C, N = means2d.shape[:2]
    D = colors.shape[-1]
    H, W = image_height, image_width
    device = means2d.device
    dtype = means2d.dtype
    if max_pairs_per_chunk is None:
        max_pairs_per_chunk = (1 << 24) if device.type == "cuda" else (1 << 21)

    flat_xy = means2d.reshape(C * N, 2)
    flat_conic = conics.reshape(C * N, 3).to(dtype)
    flat_opac = opacities.reshape(C * N).to(dtype)
    flat_col = colors.reshape(C * N, D).to(torch.float64)
    flat_grad = grad_colors.reshape(C * H * W, D).to(torch.float64)
    bg = (
        backgrounds.to(torch.float64)
        if backgrounds is not None
        else torch.zeros((C, D), dtype=torch.float64, device=device)
    )
    fids = flatten_ids.to(torch.int64)

    delta_loss = torch.zeros(N, dtype=torch.float64, device=device)
    pixel_count = torch.zeros(N, dtype=torch.int64, device=device)
    weight_sum = torch.zeros(N, dtype=torch.float64, device=device)

    tile_h, tile_w = isect_offsets.shape[1:]
    n_tiles = C * tile_h * tile_w
    starts = isect_offsets.reshape(-1).to(torch.int64)
    ends = torch.cat([starts[1:], torch.tensor([fids.numel()], device=device)])
    per_tile = ends - starts
    P = tile_size * tile_size
    pairs = per_tile * P
    cum = torch.cumsum(pairs, 0)
    total = int(cum[-1].item()) if n_tiles else 0
    bounds = [0]
    if total > max_pairs_per_chunk:
        cuts = torch.arange(max_pairs_per_chunk, total, max_pairs_per_chunk, device=device)
        bounds += torch.searchsorted(cum, cuts, right=True).tolist()
    bounds.append(n_tiles)

    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        if t1 <= t0:
            continue
        cnt = pairs[t0:t1]
        n_pairs = int(cnt.sum().item())
        if n_pairs == 0:
            continue
        tile = torch.repeat_interleave(torch.arange(t0, t1, device=device), cnt)
        r = torch.arange(n_pairs, device=device) - (torch.cumsum(cnt, 0) - cnt)[tile - t0]
        n_t = per_tile[tile]
        q = torch.div(r, n_t, rounding_mode="floor")  # pixel inside the tile (pixel-major order)
        entry = starts[tile] + (r - q * n_t)  # tile-list entry, front to back
        cam = torch.div(tile, tile_h * tile_w, rounding_mode="floor")
        in_cam = tile - cam * (tile_h * tile_w)
        ty = torch.div(in_cam, tile_w, rounding_mode="floor")
        px = (in_cam - ty * tile_w) * tile_size + q % tile_size
        py = ty * tile_size + torch.div(q, tile_size, rounding_mode="floor")
        g = fids[entry]
        xy = flat_xy[g]
        cn = flat_conic[g]
        dx = xy[:, 0] - (px.to(dtype) + 0.5)
        dy = xy[:, 1] - (py.to(dtype) + 0.5)
        sigma = 0.5 * (cn[:, 0] * dx * dx + cn[:, 2] * dy * dy) + cn[:, 1] * dx * dy
        alpha = torch.clamp(flat_opac[g] * torch.exp(-sigma), max=_ALPHA_MAX)
        keep = (px < W) & (py < H) & (sigma >= 0) & (alpha >= _ALPHA_MIN)
        keep = torch.nonzero(keep).squeeze(1)
        if keep.numel() == 0:
            continue
        g = g[keep]
        alpha = alpha[keep].to(torch.float64)
        pix = (cam[keep] * H + py[keep]) * W + px[keep]

        # Transmittance cut-off: a pixel keeps its pairs while T after them stays > 1e-4 (a prefix of its list).
        log_om = torch.log1p(-alpha)
        seg_start = _segment_starts(pix)
        incl = _exclusive_segment_cumsum(log_om, seg_start) + log_om
        keep = torch.nonzero(torch.exp(incl) > _T_MIN).squeeze(1)
        g, pix, alpha, log_om = g[keep], pix[keep], alpha[keep], log_om[keep]
        seg_start = _segment_starts(pix)
        T = torch.exp(_exclusive_segment_cumsum(log_om, seg_start))
        w = T * alpha
        wc = w[:, None] * flat_col[g]  # [M, D]

        # Per-pixel colour C_p (with background), then S = C_p - inclusive prefix of w c.
        upix, seg = torch.unique_consecutive(pix, return_inverse=True)
        n_seg = upix.numel()
        T_end = torch.exp(torch.zeros(n_seg, dtype=torch.float64, device=device).index_add_(0, seg, log_om))
        cam_of_seg = torch.div(upix, H * W, rounding_mode="floor")
        C_p = torch.zeros((n_seg, D), dtype=torch.float64, device=device).index_add_(0, seg, wc)
        C_p += T_end[:, None] * bg[cam_of_seg]
        excl = torch.cumsum(wc, 0) - wc
        prefix = excl - excl[seg_start] + wc
        S = C_p[seg] - prefix
        dC = -wc + (alpha / (1.0 - alpha))[:, None] * S
        dl = (flat_grad[pix] * dC).sum(-1)

        gid = g - torch.div(g, N, rounding_mode="floor") * N  # flat [C*N] id -> Gaussian id
        delta_loss.index_add_(0, gid, dl)
        pixel_count.index_add_(0, gid, torch.ones_like(gid))
        weight_sum.index_add_(0, gid, w)

    out_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return delta_loss.to(out_dtype), pixel_count.to(torch.int32), weight_sum.to(out_dtype)


# --------------------------------------------------------------------------- #
# CUDA path
# --------------------------------------------------------------------------- #
def load_contribution_extension() -> Optional[object]:
    """The compiled kernel module, or ``None`` without CUDA / when the build fails (see ``jit.load_extension``)."""
    from nerfstudio_splat_ext.cuda.jit import load_extension

    return load_extension(_EXT_NAME, _EXT_SOURCES)


def _channel_chunks(D: int) -> List[Tuple[int, int]]:
    """Split ``D`` channels into ``[start, end)`` ranges of instantiated kernel widths (largest first)."""
    chunks = []
    start = 0
    while start < D:
        width = next(c for c in _KERNEL_CHANNELS if c <= D - start)
        chunks.append((start, start + width))
        start += width
    return chunks


def _render_loss_contribution_cuda(
    ext: object,
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    colors: Tensor,
    backgrounds: Optional[Tensor],
    grad_colors: Tensor,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    image_width: int,
    image_height: int,
    tile_size: int,
) -> ContributionOutputs:
    C, N = means2d.shape[:2]
    D = colors.shape[-1]
    f32 = dict(dtype=torch.float32)
    means2d = means2d.to(**f32).contiguous()
    conics = conics.to(**f32).contiguous()
    opacities = opacities.to(**f32).contiguous()
    offsets = isect_offsets.to(torch.int32).contiguous()
    ids = flatten_ids.to(torch.int32).contiguous()
    delta_loss = torch.zeros(N, device=means2d.device, **f32)
    pixel_count = torch.zeros(N, dtype=torch.int32, device=means2d.device)
    weight_sum = torch.zeros(N, device=means2d.device, **f32)
    for i, (c0, c1) in enumerate(_channel_chunks(D)):
        full = (c0, c1) == (0, D)
        col = (colors if full else colors[..., c0:c1]).to(**f32).contiguous()
        grad = (grad_colors if full else grad_colors[..., c0:c1]).to(**f32).contiguous()
        bg = None
        if backgrounds is not None:
            bg = (backgrounds if full else backgrounds[..., c0:c1]).to(**f32).contiguous()
        # Counts and weights do not depend on the channels: accumulate them with the first chunk only.
        ext.render_loss_contribution(
            means2d, conics, opacities, col, bg, grad, offsets, ids,
            int(image_width), int(image_height), int(tile_size),
            delta_loss, pixel_count, weight_sum, i == 0,
        )
    return delta_loss, pixel_count, weight_sum


def render_loss_contribution(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N] (or [N])
    colors: Tensor,  # [C, N, D] (or [N, D])
    backgrounds: Optional[Tensor],  # [C, D] (or [D]) or None
    grad_colors: Tensor,  # [C, H, W, D]: dL / d render_colors
    isect_offsets: Tensor,  # [C, tile_h, tile_w]
    flatten_ids: Tensor,  # [M]
    image_width: int,
    image_height: int,
    tile_size: int,
) -> ContributionOutputs:
    """Per-Gaussian ``(delta_loss [N], pixel_count [N] int32, weight_sum [N])`` summed over the ``C`` cameras.

    The inputs are gsplat's ``meta`` of ``rasterization(..., packed=False)`` (``means2d``, ``conics``,
    ``opacities``, ``isect_offsets``, ``flatten_ids``, ``width``, ``height``, ``tile_size``), the ``[C, N, D]``
    colours that were composited (post-activation / SH-evaluated, e.g. ``colors_cn`` of the render) with their
    backgrounds, and ``grad_colors = dL/d render_colors``. ``delta_loss`` / ``weight_sum`` are float32 (the
    reference keeps float64 inputs in float64). Runs the CUDA kernel when every tensor is on a CUDA device and the
    extension builds, else :func:`render_loss_contribution_reference`.
    """
    args = _normalise_inputs(
        means2d, conics, opacities, colors, backgrounds, grad_colors, isect_offsets, flatten_ids,
        image_width, image_height, tile_size,
    )
    tensors = [t for t in args if t is not None]
    if all(t.is_cuda for t in tensors):
        ext = load_contribution_extension()
        if ext is not None:
            return _render_loss_contribution_cuda(ext, *args, image_width, image_height, tile_size)
    return render_loss_contribution_reference(*args, image_width, image_height, tile_size)
