"""Densification statistics of one rendered view, added per Gaussian: the norm of its screen-space position
gradient (in pixels, scaled as the 3DGS rasterizer reports it), the number of views that saw it, and its largest
screen radius as a fraction of the image size.

``accumulate_view_stats`` runs one CUDA kernel (``csrc/view_stats.cu``) on GPU tensors when the extension builds,
else ``accumulate_view_stats_reference``, with the same signature and results. The strategy calls it on every
training step while densifying; the reference costs about 17 kernel launches, and the step is bound by launches.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulate_view_stats", "accumulate_view_stats_reference"]


@torch.no_grad()
def accumulate_view_stats_reference(
    grads: Tensor,  # [C, N, 2] gradient of the loss w.r.t. the projected means
    radii: Tensor,  # [C, N] int, 0 where the Gaussian was culled
    scale_x: float,
    scale_y: float,
    inv_image_size: float,
    grad2d: Tensor,  # [N] float32, added to
    count: Tensor,  # [N] float32, added to
    max_radii2d: Tensor,  # [N] float32, raised to
) -> None:
    # Culled entries are weighted by 0, not filtered out: boolean indexing would make the host wait for the GPU.
    visible = (radii > 0).to(grad2d.dtype)
    norms = torch.hypot(grads[..., 0] * scale_x, grads[..., 1] * scale_y).to(grad2d.dtype)
    grad2d += (norms * visible).sum(dim=0)
    count += visible.sum(dim=0)
    torch.maximum(max_radii2d, (radii.to(grad2d.dtype) * visible * inv_image_size).amax(dim=0), out=max_radii2d)


@torch.no_grad()
def accumulate_view_stats(
    grads: Tensor,
    radii: Tensor,
    scale_x: float,
    scale_y: float,
    inv_image_size: float,
    grad2d: Tensor,
    count: Tensor,
    max_radii2d: Tensor,
) -> None:
    """See the module docstring; updates grad2d, count and max_radii2d in place."""
    if grads.is_cuda and grad2d.dtype == torch.float32:
        from nerfstudio_splat_ext.cuda.contribution import load_contribution_extension

        ext = load_contribution_extension()
        if ext is not None:
            ext.accumulate_view_stats(grads.float().contiguous(), radii.to(torch.int32).contiguous(), float(scale_x),
                                      float(scale_y), float(inv_image_size), grad2d, count, max_radii2d)
            return
    accumulate_view_stats_reference(grads, radii, scale_x, scale_y, inv_image_size, grad2d, count, max_radii2d)
