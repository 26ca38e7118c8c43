"""The `splat-ext-image` model: a Splatter-Image-style teacher (Szymanowicz et al. 2024).

A U-Net maps one source image of an object to one 3D Gaussian per pixel (depth along the pixel's ray, a 3D
offset, opacity, scale, rotation and colour: the canonical map of
:mod:`nerfstudio_splat_ext.generative.pixel_gaussians`). The Gaussians are rendered at K target views of the
same object (and at the source view) with the project's render backend (gsplat on CUDA, the reference on CPU)
and compared with the ground truth composited on the background: L2, plus LPIPS when its weights can be loaded.

Input: the source RGB composited on the background, mapped to [-1, 1], plus the Plücker coordinates of each
pixel's ray (direction ``d`` and moment ``o x d`` in the world frame, 6 channels). The offsets and rotations of the
canonical map are expressed in the world frame, and the generated objects are seen from random azimuths, so
without the rays the network could not know which way world axes point in the image (the Splatter Image paper
predicts in the camera frame instead; our map format fixes the world frame so the student can denoise it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from nerfstudio.models.base_model import ModelConfig
from torch import Tensor
from torch.nn import Parameter

from nerfstudio_splat_ext.generative.networks.unet import UNet, count_parameters
from nerfstudio_splat_ext.generative.pipeline import ObjectsModel, composite, psnr
from nerfstudio_splat_ext.generative.pixel_gaussians import (
    CHANNEL_SLICES,
    GAUSSIAN_MAP_CHANNELS,
    GaussianMapConfig,
    PixelGaussians,
    activate_raw,
    decode_gaussian_map,
    image_and_rays,
    image_and_rays_channels,
    render_pixel_gaussians,
)
from nerfstudio_splat_ext.render.backend import RenderBackend


@dataclass
class SplatExtImageModelConfig(ModelConfig):
    """splat-ext-image: one image -> one 3D Gaussian per pixel (Splatter Image), trained on novel views."""

    _target: Type = field(default_factory=lambda: SplatExtImageModel)
    enable_collider: bool = False
    base_width: int = 64
    """U-Net width of the first level (64 with the defaults below: 12.8M parameters)."""
    channel_mults: Tuple[int, ...] = (1, 2, 2, 4)
    """Width multipliers per U-Net level (image sides must be divisible by 2**(levels - 1))."""
    num_res_blocks: int = 2
    attention_levels: Tuple[int, ...] = (3,)
    """U-Net levels with self-attention (3: the 16x16 level of 128x128 images)."""
    ray_conditioning: bool = True
    """Feed the Plücker coordinates of the pixel rays (6 channels) beside the RGB (see the module docstring)."""
    map: GaussianMapConfig = field(default_factory=GaussianMapConfig)
    """Decoding ranges of the canonical Gaussian map (shared with the diffusion student)."""
    background_color: Literal["white", "black"] = "white"
    """Background the targets are composited on and the Gaussians are rendered over."""
    include_source_view: bool = True
    """Also render and supervise the source view (besides the K target views)."""
    rgb_loss_weight: float = 1.0
    """Weight of the mean squared error of the renders."""
    lpips_loss_weight: float = 0.05
    """Weight of LPIPS (AlexNet) on the renders; skipped with one warning when its weights cannot be loaded."""
    lpips_start_step: int = 0
    """First training step with the LPIPS term (the paper adds it once L2 has converged)."""
    init_opacity: float = 0.1
    """Opacity of every Gaussian at initialisation (through the output bias)."""
    init_scale: float = 0.03
    """Standard deviation of every Gaussian at initialisation (world units; ~1.5 px at 128^2 and depth 2.6)."""
    output_init_gain: float = 0.1
    """The U-Net's output convolution weights are scaled by this at initialisation, so the first maps stay near
    the initial bias (a plane of faint, small Gaussians at mid depth) instead of random Gaussians everywhere."""
    render_backend: RenderBackend = "auto"
    """'auto': gsplat on CUDA, our pure-PyTorch reference on CPU."""
    reference_tile_size: int = 1
    """Tile size of the reference rasterizer on CPU (1: per-pixel bounding boxes, the cheap CPU setting)."""


def _atanh(x: float) -> float:
    x = min(max(x, -0.999), 0.999)
    return 0.5 * math.log((1 + x) / (1 - x))


class SplatExtImageModel(ObjectsModel):
    """The teacher; entry points ``forward_batch``, ``get_loss_dict``, ``get_metrics_dict``, ``predict_canonical``,
    ``predict_gaussians`` (the interface of :mod:`nerfstudio_splat_ext.generative.pipeline`)."""

    config: SplatExtImageModelConfig
    method_name = "splat-ext-image"

    # ---------------------------------------------------------------------------------------------- setup
    def populate_modules(self) -> None:
        # Needs nothing from the datamanager, so a trained teacher can be rebuilt from its config alone.
        super().populate_modules()
        cfg = self.config
        self.map_config: GaussianMapConfig = cfg.map
        in_channels = image_and_rays_channels(cfg.ray_conditioning)
        self.unet = UNet(
            in_channels,
            GAUSSIAN_MAP_CHANNELS,
            base_width=cfg.base_width,
            channel_mults=cfg.channel_mults,
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=cfg.attention_levels,
        )
        self._init_output_layer()
        colour = torch.ones(3) if cfg.background_color == "white" else torch.zeros(3)
        self.register_buffer("background", colour)

    def _init_output_layer(self) -> None:
        cfg, m = self.config, self.config.map
        out = self.unet.out_conv
        bias = torch.zeros(GAUSSIAN_MAP_CHANNELS)
        bias[CHANNEL_SLICES["opacity"]] = _atanh(2 * cfg.init_opacity - 1)
        unit = (math.log(cfg.init_scale) - math.log(m.scale_min)) / (math.log(m.scale_max) - math.log(m.scale_min))
        bias[CHANNEL_SLICES["scale"]] = _atanh(2 * unit - 1)
        bias[CHANNEL_SLICES["rotation"].start] = 1.0  # identity quaternion
        with torch.no_grad():
            out.weight.mul_(cfg.output_init_gain)
            out.bias.copy_(bias)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.unet)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {"network": list(self.unet.parameters())}

    # --------------------------------------------------------------------------------------- prediction
    def network_input(self, source_rgb: Tensor, c2w: Tensor, intrinsics: Tensor) -> Tensor:
        """source_rgb [B, H, W, 3] in [0, 1] (on the background) -> U-Net input [B, 3 (+6), H, W]."""
        return image_and_rays(source_rgb, c2w, intrinsics, self.config.ray_conditioning)

    def predict_canonical(self, source_rgb: Tensor, source_c2w: Tensor, source_intrinsics: Tensor) -> Tensor:
        """Canonical Gaussian map [B, 15, H, W] in [-1, 1] of source_rgb [B, H, W, 3] (on the background) seen
        from source_c2w [B, 4, 4] (OpenGL) with source_intrinsics [B, 4]."""
        h, w = source_rgb.shape[1:3]
        m = self.unet.size_multiple
        if h % m or w % m:
            raise ValueError(
                f"splat-ext-image needs image sides divisible by {m} (U-Net with {len(self.config.channel_mults)} "
                f"levels), got {w}x{h}; resize the images or use fewer --pipeline.model.channel-mults"
            )
        x = self.network_input(source_rgb.to(self.device), source_c2w.to(self.device), source_intrinsics.to(self.device))
        return activate_raw(self.unet(x))

    def predict_gaussians(self, source_rgb: Tensor, source_c2w: Tensor, source_intrinsics: Tensor) -> PixelGaussians:
        """One Gaussian per source pixel (``N = H * W``), world frame."""
        canonical = self.predict_canonical(source_rgb, source_c2w, source_intrinsics)
        return decode_gaussian_map(canonical, source_c2w.to(canonical), source_intrinsics.to(canonical), self.map_config)

    def render(self, gaussians: PixelGaussians, c2w: Tensor, intrinsics: Tensor, width: int, height: int):
        """(rgb [B, V, H, W, 3] on the background, alpha [B, V, H, W, 1]) at cameras c2w [B, V, 4, 4]."""
        return render_pixel_gaussians(
            gaussians,
            c2w,
            intrinsics,
            width,
            height,
            self.background,
            backend=self.config.render_backend,
            reference_tile_size=self.config.reference_tile_size,
        )

    # -------------------------------------------------------------------------------- pipeline interface
    def forward_batch(self, batch: Dict, step: int) -> Dict:
        """Predictions for a batch of the multi-object datamanager.

        Returns ``canonical`` [B, 15, H, W], renders ``rgb`` [B, V, H, W, 3] and ``alpha`` [B, V, H, W, 1] and the
        ground truth ``gt_rgb`` [B, V, H, W, 3] on the background, where the V views are the source (first, with
        ``include_source_view``) and the K targets; ``num_source_views`` (0 or 1) says which.
        """
        bg = self.background
        src = composite(batch["source_image"], bg)
        h, w = src.shape[1:3]
        canonical = self.predict_canonical(src, batch["source_c2w"], batch["source_intrinsics"])
        gaussians = decode_gaussian_map(canonical, batch["source_c2w"], batch["source_intrinsics"], self.map_config)
        c2w, intr, gt = batch["target_c2w"], batch["target_intrinsics"], composite(batch["target_images"], bg)
        n_src = 1 if self.config.include_source_view else 0
        if n_src:
            c2w = torch.cat([batch["source_c2w"][:, None], c2w], dim=1)
            intr = torch.cat([batch["source_intrinsics"][:, None], intr], dim=1)
            gt = torch.cat([src[:, None], gt], dim=1)
        rgb, alpha = self.render(gaussians, c2w, intr, int(w), int(h))
        return {
            "canonical": canonical,
            "rgb": rgb,
            "alpha": alpha,
            "gt_rgb": gt,
            "num_source_views": n_src,
            "step": step,
        }

    def get_metrics_dict(self, outputs: Dict, batch: Dict) -> Dict[str, Tensor]:
        n = outputs["num_source_views"]
        pred = outputs["rgb"][:, n:].detach().flatten(0, 1)
        gt = outputs["gt_rgb"][:, n:].flatten(0, 1)
        return {
            "psnr": psnr(pred.clamp(0, 1), gt).mean(),
            "mean_opacity": outputs["canonical"][:, CHANNEL_SLICES["opacity"]].detach().add(1).mul(0.5).mean(),
        }

    def get_loss_dict(self, outputs: Dict, batch: Dict, metrics_dict: Optional[Dict] = None) -> Dict[str, Tensor]:
        cfg = self.config
        loss = {"rgb_loss": cfg.rgb_loss_weight * F.mse_loss(outputs["rgb"], outputs["gt_rgb"])}
        if cfg.lpips_loss_weight > 0 and self.training and outputs.get("step", 0) >= cfg.lpips_start_step:
            lp = self._lpips(outputs["rgb"], outputs["gt_rgb"])
            if lp is not None:
                loss["lpips_loss"] = cfg.lpips_loss_weight * lp
        return loss

