"""The device-resident ray datamanager of splat-ext-nerf (datamanagers/ray_datamanager.py) against nerfstudio's own
ray generation and images."""

from __future__ import annotations

import torch

from nerfstudio_splat_ext.datamanagers.ray_datamanager import SplatExtRayDataManagerConfig, pinhole_rays


def _random_cameras(n: int, gen: torch.Generator):
    from nerfstudio.cameras.cameras import Cameras

    rot = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen)).Q
    c2w = torch.cat([rot, torch.randn(n, 3, 1, generator=gen)], -1)
    fx = 50 + 100 * torch.rand(n, 1, generator=gen)
    fy = fx * (0.8 + 0.4 * torch.rand(n, 1, generator=gen))
    cx = 20 + 10 * torch.rand(n, 1, generator=gen)
    cy = 15 + 10 * torch.rand(n, 1, generator=gen)
    return Cameras(camera_to_worlds=c2w, fx=fx, fy=fy, cx=cx, cy=cy, width=48, height=36)


def test_pinhole_rays_match_nerfstudio_generate_rays():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    cameras = _random_cameras(5, gen)
    n = 500
    camera = torch.randint(0, 5, (n,), generator=gen)
    y = torch.randint(0, 36, (n,), generator=gen)
    x = torch.randint(0, 48, (n,), generator=gen)
    intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], -1)
    origins, directions, area, norms = pinhole_rays(cameras.camera_to_worlds, intrinsics, camera, y, x)
    expected = cameras.generate_rays(camera_indices=camera[:, None], coords=torch.stack([y, x], -1).float() + 0.5)
    torch.testing.assert_close(origins, expected.origins, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(directions, expected.directions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(area, expected.pixel_area, atol=1e-9, rtol=1e-3)
    torch.testing.assert_close(norms, expected.metadata["directions_norm"], atol=1e-5, rtol=1e-5)


def test_batches_are_pixels_of_the_training_images_with_nerfstudios_rays(tiny_synth):
    from nerfstudio_splat_ext.dataparsers.splat_ext_dataparser import SplatExtDataParserConfig

    config = SplatExtRayDataManagerConfig(dataparser=SplatExtDataParserConfig(data=tiny_synth),
                                          train_num_rays_per_batch=300)
    datamanager = config.setup(device="cpu", test_mode="val")
    assert datamanager._images is not None  # the device path, not nerfstudio's fallback
    dataset = datamanager.train_dataset
    seen = set()
    for step in range(3):
        rays, batch = datamanager.next_train(step)
        camera, y, x = batch["indices"].unbind(-1)
        seen.update(camera.tolist())
        assert batch["image"].shape == (300, 4)  # alpha kept for the model's background compositing
        for i in camera.unique().tolist():
            sel = camera == i
            image = torch.from_numpy(dataset.get_numpy_image(i)).float() / 255.0
            torch.testing.assert_close(batch["image"][sel], image[y[sel], x[sel]])
        expected = datamanager.train_ray_generator(batch["indices"])
        torch.testing.assert_close(rays.origins, expected.origins, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rays.directions, expected.directions, atol=1e-5, rtol=1e-5)
        assert torch.equal(rays.camera_indices, expected.camera_indices)
    assert len(seen) > len(dataset) // 2  # pixels are drawn from all images, not one image per step
