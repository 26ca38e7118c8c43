"""The student's denoiser: (noisy canonical Gaussian map, timestep, source image) -> clean canonical map."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from nerfstudio_splat_ext.generative.networks.unet import AttentionBlock, UNet, count_parameters
from nerfstudio_splat_ext.generative.pixel_gaussians import (
    GAUSSIAN_MAP_CHANNELS,
    activate_raw,
    image_and_rays,
    image_and_rays_channels,
)


class GaussianMapDenoiser(nn.Module):
    """A time-conditioned U-Net over ``[noisy map (15 ch), (level plane (1 ch),) source image (3 ch), pixel rays
    (6 ch)]`` predicting the clean map (x0).

    The level t reaches the network by FiLM in every residual block (``time_conditioning="film"``) or as one constant
    input plane t / num_timesteps (``"input"``: almost no parameters, so a teacher's U-Net can be reused as it is;
    see :func:`teacher_initialised_denoiser`).

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
        time_conditioning: Literal["film", "input"] = "film",
        decoder_attention_levels: Optional[Sequence[int]] = None,
        num_timesteps: int = 100,
    ) -> None:
        super().__init__()
        if time_conditioning not in ("film", "input"):
            raise ValueError(f"time_conditioning must be 'film' or 'input', got {time_conditioning!r}")
        self.ray_conditioning = ray_conditioning
        self.time_conditioning = time_conditioning
        self.num_timesteps = num_timesteps
        level_planes = 1 if time_conditioning == "input" else 0
        self.unet = UNet(
            in_channels=GAUSSIAN_MAP_CHANNELS + level_planes + self.condition_channels,
            out_channels=GAUSSIAN_MAP_CHANNELS,
            base_width=base_width,
            channel_mults=channel_mults,
            num_res_blocks=num_res_blocks,
            attention_levels=attention_levels,
            time_embedding=time_conditioning == "film",
            decoder_attention_levels=decoder_attention_levels,
        )

    @property
    def condition_channels(self) -> int:
        return image_and_rays_channels(self.ray_conditioning)

    @property
    def size_multiple(self) -> int:
        return self.unet.size_multiple

    def condition(self, source_rgb: Tensor, c2w: Tensor, intrinsics: Tensor) -> Tensor:
        """The condition channels [B, 3 (+6), H, W] of source_rgb [B, H, W, 3] in [0, 1] (on the background) seen
        from c2w [B, 4, 4] with intrinsics [B, 4]: the image in the maps' symmetric range [-1, 1] (+ its rays)."""
        return image_and_rays(source_rgb, c2w, intrinsics, self.ray_conditioning)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x_t [B, 15, H, W] noisy map, t [B] levels (long or float), cond [B, 3 (+6), H, W] from :meth:`condition`
        -> predicted clean canonical map [B, 15, H, W] in [-1, 1]."""
        if cond.shape[0] != x_t.shape[0] or cond.shape[-2:] != x_t.shape[-2:]:
            raise ValueError(f"condition {tuple(cond.shape)} does not match the noisy map {tuple(x_t.shape)} (same B, H, W)")
        if self.time_conditioning == "film":
            return activate_raw(self.unet(torch.cat([x_t, cond], dim=1), t.float()))
        b, _, h, w = x_t.shape
        level = (t.float().reshape(-1) / self.num_timesteps).to(x_t).expand(b)[:, None, None, None].expand(b, 1, h, w)
        return activate_raw(self.unet(torch.cat([x_t, level, cond], dim=1)))


def _attention_levels(blocks: nn.ModuleList, decoder: bool) -> list:
    """Levels (0 = full resolution) of a U-Net's encoder (or decoder: its lists run deepest first) with attention."""
    n = len(blocks)
    return [(n - 1 - i) if decoder else i for i, block in enumerate(blocks) if isinstance(block, AttentionBlock)]


def teacher_initialised_denoiser(teacher_unet: UNet, ray_conditioning: bool, num_timesteps: int) -> GaussianMapDenoiser:
    """A denoiser that starts as the teacher's network: same levels, widths and weights, its input convolution
    extended by zero weights for the noisy map and the level plane, so that at initialisation it returns the
    teacher's map whatever the noise.

    To stay within the teacher's parameter count (the method's claim), the decoder's attention block at the deepest
    level is left out: it pays for the new input weights (on the default teacher 264k parameters against 9k; leaving
    it out costs the trained teacher 0.1 dB before any training of the student). Raises ValueError when the teacher
    has no such block or its input is not the denoiser's condition.
    """
    levels = len(teacher_unet.channel_mults)
    encoder_attn = _attention_levels(teacher_unet.down_attn, decoder=False)
    decoder_attn = _attention_levels(teacher_unet.up_attn, decoder=True)
    if levels - 1 not in decoder_attn:
        raise ValueError(
            "a teacher-initialised denoiser drops the teacher's deepest decoder attention block to stay within its "
            f"parameter count, but this teacher has none (attention at decoder levels {sorted(decoder_attn)}); "
            "use --pipeline.model.denoiser-init scratch"
        )
    denoiser = GaussianMapDenoiser(
        teacher_unet.base_width,
        teacher_unet.channel_mults,
        len(teacher_unet.down_blocks[0]),
        encoder_attn,
        ray_conditioning,
        time_conditioning="input",
        decoder_attention_levels=[lvl for lvl in decoder_attn if lvl != levels - 1],
        num_timesteps=num_timesteps,
    )
    if teacher_unet.in_channels != denoiser.condition_channels:
        raise ValueError(
            f"the teacher's network reads {teacher_unet.in_channels} channels, the denoiser's condition has "
            f"{denoiser.condition_channels} (ray conditioning {ray_conditioning}); they must be the same"
        )
    source = teacher_unet.state_dict()
    with torch.no_grad():  # state_dict() tensors share the parameters' storage: writing them sets the weights
        for name, value in denoiser.unet.state_dict().items():
            if name == "in_conv.weight":  # [width, map + level + condition, 3, 3]: the condition's part is the teacher's
                value.zero_()
                value[:, -teacher_unet.in_channels :] = source[name]
            elif name not in source or source[name].shape != value.shape:
                raise ValueError(f"the teacher's network has no parameter {name} of shape {tuple(value.shape)}")
            else:
                value.copy_(source[name])
    return denoiser


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
