"""A ray datamanager for per-ray methods (splat-ext-nerf) that keeps every training pixel on the device.

nerfstudio's VanillaDataManager builds each batch from a cached image batch with a pixel sampler and a
RayGenerator (Cameras.generate_rays): general, but about 7 ms per step of Python and small kernels on an H100 for
8192 rays, a quarter of a NeRF step. For pinhole cameras without distortion, all of one size (Blender and most
processed captures), this datamanager holds the images as one uint8 tensor on the device, draws pixels uniformly
over all images and builds the rays with a few tensor operations, the same rays as nerfstudio's (tested).
Other datasets (distortion, fisheye, mixed sizes, masks) fall back to the parent's path.

Images keep their alpha channel, so the model can composite the training targets over a background of its choice
(``batch["image"]`` is [N, 4] then; nerfstudio's renderers blend it over the fixed background as before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import CameraType
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_splat_ext.utils.threads import map_in_threads


@dataclass
class SplatExtRayDataManagerConfig(VanillaDataManagerConfig):
    _target: Type = field(default_factory=lambda: SplatExtRayDataManager)
    device_images: bool = True
    """Keep the training images on the device and build rays there (pinhole cameras only; else nerfstudio's
    pixel sampler)."""


def pinhole_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, camera: torch.Tensor, y: torch.Tensor,
                 x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rays through pixel centres (x + 0.5, y + 0.5) of pinhole cameras in nerfstudio's convention (OpenGL camera:
    +x right, +y up, looking down -z). c2w [C, 3, 4], intrinsics [C, 4] (fx, fy, cx, cy), camera/y/x [N] long.
    Returns origins [N, 3], unit directions [N, 3], pixel_area [N, 1] and the norm of the unnormalised direction
    [N, 1], as Cameras.generate_rays."""
    k = intrinsics[camera]
    fx, fy, cx, cy = k.unbind(-1)
    u = (x.to(k.dtype) + 0.5 - cx) / fx
    v = -(y.to(k.dtype) + 0.5 - cy) / fy
    rot = c2w[camera, :3, :3]
    # centre, one pixel right, one pixel down: pixel_area is the product of the angular steps, as nerfstudio's
    cam = torch.stack([
        torch.stack([u, v, -torch.ones_like(u)], -1),
        torch.stack([u + 1.0 / fx, v, -torch.ones_like(u)], -1),
        torch.stack([u, v - 1.0 / fy, -torch.ones_like(u)], -1),
    ])  # [3, N, 3]
    world = torch.einsum("nij,knj->kni", rot, cam)
    norms = world.norm(dim=-1, keepdim=True)
    unit = world / norms
    dx = (unit[0] - unit[1]).norm(dim=-1)
    dy = (unit[0] - unit[2]).norm(dim=-1)
    return c2w[camera, :3, 3], unit[0], (dx * dy)[:, None], norms[0]


class SplatExtRayDataManager(VanillaDataManager):
    config: SplatExtRayDataManagerConfig

    def _device_images_supported(self) -> Optional[str]:
        """None when the device path applies, else why not."""
        dataset = self.train_dataset
        cameras = dataset.cameras
        if not self.config.device_images:
            return "disabled"
        if not bool((cameras.camera_type == CameraType.PERSPECTIVE.value).all()):
            return "cameras are not all pinhole"
        if cameras.distortion_params is not None and bool((cameras.distortion_params != 0).any()):
            return "cameras have distortion"
        if int(cameras.width.unique().numel()) != 1 or int(cameras.height.unique().numel()) != 1:
            return "images differ in size"
        if dataset._dataparser_outputs.mask_filenames is not None:
            return "the dataset has masks"
        if self.config.patch_size != 1:
            return "patch sampling"
        return None

    def setup_train(self) -> None:
        self._images: Optional[torch.Tensor] = None
        why_not = self._device_images_supported()
        if why_not is not None:
            if why_not != "disabled":
                CONSOLE.print(f"[yellow]Ray datamanager: nerfstudio's pixel sampler is used ({why_not}).")
            super().setup_train()
            return
        dataset = self.train_dataset
        cameras = dataset.cameras
        CONSOLE.print(f"Loading {len(dataset)} training images onto {self.device}...")
        arrays = map_in_threads(dataset.get_numpy_image, range(len(dataset)))
        channels = max(a.shape[-1] for a in arrays)
        tensors = []
        for a in arrays:
            t = torch.from_numpy(a)
            if t.shape[-1] < channels:  # an RGB image among RGBA ones: opaque
                t = torch.cat([t, torch.full_like(t[..., :1], 255)], -1)
            tensors.append(t)
        self._images = torch.stack(tensors).to(self.device)  # [N, H, W, C] uint8
        self._c2w = cameras.camera_to_worlds.to(self.device).float()
        self._intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], -1).to(self.device).float()
        # nerfstudio's RayGenerator stays available (the viewer and other callers may use it).
        from nerfstudio.model_components.ray_generators import RayGenerator

        self.train_ray_generator = RayGenerator(cameras.to(self.device))
        self.train_pixel_sampler = self._get_pixel_sampler(dataset, self.config.train_num_rays_per_batch)

    def next_train(self, step: int) -> Tuple[RayBundle, Dict]:
        if self._images is None:
            return super().next_train(step)
        self.train_count += 1
        num_images, height, width, _ = self._images.shape
        num_rays = self.config.train_num_rays_per_batch
        flat = torch.randint(0, num_images * height * width, (num_rays,), device=self.device)
        camera = flat // (height * width)
        y = (flat // width) % height
        x = flat % width
        origins, directions, pixel_area, norms = pinhole_rays(self._c2w, self._intrinsics, camera, y, x)
        ray_bundle = RayBundle(
            origins=origins,
            directions=directions,
            pixel_area=pixel_area,
            camera_indices=camera[:, None],
            metadata={"directions_norm": norms},
        )
        batch = {
            "image": self._images[camera, y, x].float() / 255.0,
            "indices": torch.stack([camera, y, x], -1),
        }
        return ray_bundle, batch
