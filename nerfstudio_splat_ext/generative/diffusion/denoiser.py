"""The student's denoiser: (noisy canonical Gaussian map, timestep, source image) -> clean canonical map."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from nerfstudio_splat_ext.generative.networks.unet import UNet, count_parameters
from nerfstudio_splat_ext.generative.pixel_gaussians import GAUSSIAN_MAP_CHANNELS, activate_raw, pixel_rays

IMAGE_CHANNELS = 3
RAY_CHANNELS = 6


def plucker_rays(c2w: Tensor, intrinsics: Tensor, height: int, width: int) -> Tensor:
    """Plücker coordinates [B, 6, H, W] (unit direction d, moment o x d; world frame) of the pixel rays of cameras
    c2w [B, 4, 4] (OpenGL) with intrinsics [B, 4]."""
    origin, dirs = pixel_rays(c2w, intrinsics, width, height)  # [B, 3], [B, HW, 3]
    moment = torch.linalg.cross(origin[:, None, :].expand_as(dirs), dirs, dim=-1)
    return torch.cat([dirs, moment], dim=-1).transpose(1, 2).reshape(c2w.shape[0], RAY_CHANNELS, height, width)


class GaussianMapDenoiser(nn.Module):
    """A time-conditioned U-Net over ``[noisy map (15 ch), source image (3 ch), pixel rays (6 ch)]`` predicting the
    clean map (x0).

    The source image is the condition (concatenated channel-wise: the map is pixel-aligned with it). The Plücker
    rays (``ray_conditioning``) tell the network how the world frame, in which the map's offsets and rotations are
    expressed, sits in the image (the teacher's reason for them too; at high noise the map no longer does). The
    output goes through :func:`activate_raw`, so it is a valid canonical map in [-1, 1] like the teacher's.
    """

    def __init__(
        self,
        base_width: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (),
        ray_conditioning: bool = True,
    ) -> None:
        super().__init__()
        self.ray_conditioning = ray_conditioning
        self.unet = UNet(
            in_channels=GAUSSIAN_MAP_CHANNELS + IMAGE_CHANNELS + (RAY_CHANNELS if ray_conditioning else 0),
            out_channels=GAUSSIAN_MAP_CHANNELS,
            base_width=base_width,
            channel_mults=channel_mults,
            num_res_blocks=num_res_blocks,
            attention_levels=attention_levels,
            time_embedding=True,
        )

    @property
    def size_multiple(self) -> int:
        return self.unet.size_multiple

    def condition(self, source_rgb: Tensor, c2w: Tensor, intrinsics: Tensor) -> Tensor:
        """The condition channels [B, 3 (+6), H, W] of source_rgb [B, H, W, 3] in [0, 1] (on the background) seen
        from c2w [B, 4, 4] with intrinsics [B, 4]: the image in the maps' symmetric range [-1, 1] (+ its rays)."""
        if source_rgb.dim() != 4 or source_rgb.shape[-1] != IMAGE_CHANNELS:
            raise ValueError(f"source_rgb must be [B, H, W, 3], got {tuple(source_rgb.shape)}")
        b, h, w, _ = source_rgb.shape
        image = source_rgb.permute(0, 3, 1, 2) * 2.0 - 1.0
        if not self.ray_conditioning:
            return image
        rays = plucker_rays(c2w.to(image.dtype), intrinsics.to(image.dtype), h, w)
        return torch.cat([image, rays], dim=1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x_t [B, 15, H, W] noisy map, t [B] levels (long or float), cond [B, 3 (+6), H, W] from :meth:`condition`
        -> predicted clean canonical map [B, 15, H, W] in [-1, 1]."""
        if cond.shape[0] != x_t.shape[0] or cond.shape[-2:] != x_t.shape[-2:]:
            raise ValueError(f"condition {tuple(cond.shape)} does not match the noisy map {tuple(x_t.shape)} (same B, H, W)")
        return activate_raw(self.unet(torch.cat([x_t, cond], dim=1), t.float()))


def fit_base_width(
    budget: int,
    channel_mults: Sequence[int] = (1, 2, 2, 4),
    num_res_blocks: int = 1,
    attention_levels: Sequence[int] = (),
    ray_conditioning: bool = True,
    multiple: int = 4,
    max_width: int = 512,
) -> int:
    """The largest ``base_width`` (a multiple of ``multiple``) whose denoiser has at most ``budget`` parameters.

    The student must not have more parameters than its teacher; this picks the widest denoiser of the given
    architecture that fits. Raises ValueError when not even the narrowest fits.
    """
    def fits(width: int) -> bool:
        net = GaussianMapDenoiser(width, channel_mults, num_res_blocks, attention_levels, ray_conditioning)
        return count_parameters(net) <= budget

    # the count grows monotonically with the width: double until it no longer fits, then bisect
    best: Optional[int] = None
    hi = 1
    while hi * multiple <= max_width and fits(hi * multiple):
        best, hi = hi * multiple, hi * 2
    lo = hi // 2 + 1 if best is not None else 1
    hi = min(hi, max_width // multiple) - 1 if best is not None else 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid * multiple):
            best, lo = mid * multiple, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(
            f"no denoiser with channel_mults={tuple(channel_mults)}, num_res_blocks={num_res_blocks} fits a budget of "
            f"{budget} parameters; give the teacher more parameters or the denoiser fewer levels"
        )
    return best
