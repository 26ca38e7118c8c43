"""View-consistent seed points: on a textured plane seen by several cameras, the vote keeps points on the plane."""

from __future__ import annotations

import math

import pytest
import torch

from nerfstudio_splat_ext.model_components.seed_points import _project, view_consistent_seed_points

SIZE = 48
FOCAL = 40.0
TILES = 96  # [-6,6]^2 in tiles of 1/8


def _look_at(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nerfstudio camera-to-world [3,4]: x right, y up, looking down -z."""
    back = eye - target
    back = back / back.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), back)
    right = right / right.norm()
    up = torch.linalg.cross(back, right)
    return torch.cat([torch.stack([right, up, back], 1), eye[:, None]], 1)


def _plane_scene(n_cams: int, seed: int):
    """Cameras on a ring above the plane z = 0, which carries a checkerboard of random colours (tiles 1/8 wide) that
    fills every view: a textureless part would agree with any point in front of it."""
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.rand(TILES, TILES, 3, generator=gen)
    c2w = torch.stack(
        [
            _look_at(torch.tensor([1.5 * math.cos(a), 1.5 * math.sin(a), 1.8]), torch.zeros(3))
            for a in torch.linspace(0, 2 * math.pi, n_cams + 1)[:-1].tolist()
        ]
    )
    K = torch.tensor([[FOCAL, 0, SIZE / 2], [0, FOCAL, SIZE / 2], [0, 0, 1]]).expand(n_cams, 3, 3).clone()
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    local = torch.stack([(xs - SIZE / 2) / FOCAL, -(ys - SIZE / 2) / FOCAL, -torch.ones_like(xs)], -1)
    images = []
    for cam in range(n_cams):
        dirs = local @ c2w[cam, :3, :3].T
        t = -c2w[cam, 2, 3] / dirs[..., 2]
        hit = c2w[cam, :3, 3] + t[..., None] * dirs
        ij = ((hit[..., :2] + TILES / 16) * 8).floor().long()
        assert bool(((ij >= 0) & (ij < TILES)).all()), "the board must fill the view"
        img = tiles[ij[..., 1], ij[..., 0]]
        images.append((img * 255).round().to(torch.uint8))
    return c2w, K, images


def test_projection_inverts_the_pixel_rays():
    c2w, K, _ = _plane_scene(4, seed=1)
    point = torch.tensor([[0.3, -0.2, 0.1]])
    u, v, z = _project(point, c2w, K)
    # Back-project each pixel at its depth: the same world point.
    local = torch.stack([(u - K[:, 0:1, 2]) / K[:, 0:1, 0], -(v - K[:, 1:2, 2]) / K[:, 1:2, 1], -torch.ones_like(u)], -1)
    world = torch.einsum("cij,cpj->cpi", c2w[:, :3, :3], local * z[..., None]) + c2w[:, None, :3, 3]
    assert torch.allclose(world, point.expand_as(world), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_vote_keeps_points_on_the_textured_surface(seed):
    c2w, K, images = _plane_scene(8, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    kwargs = dict(near=0.5, far=6.0, generator=gen)
    means, colours, stats = view_consistent_seed_points(c2w, K, images, 2000, depths_per_ray=64, **kwargs)
    # One depth per ray, no vote: where the rays would put the points without the images.
    blind, _, _ = view_consistent_seed_points(c2w, K, images, 2000, depths_per_ray=1, **kwargs)
    assert means.shape == (2000, 3) and colours.shape == (2000, 3)
    # 64 depths over [0.5, 6] are about 0.09 apart near the plane (2.3 from the cameras).
    on_plane = (means[:, 2].abs() < 0.1).float().mean()
    on_plane_blind = (blind[:, 2].abs() < 0.1).float().mean()
    assert on_plane > 0.7, f"only {on_plane:.2f} of the points lie on the plane"
    assert on_plane > 5 * on_plane_blind
    assert stats.confident_fraction > 0.5
    # Each point carries its pixel's colour, which is the colour of the tile under it (the images sample pixel
    # centres, the rays random positions inside the pixel: near tile edges the two differ).
    ij = ((means[:, :2] + TILES / 16) * 8).floor().long().clamp(0, TILES - 1)
    tile_colours = torch.rand(TILES, TILES, 3, generator=torch.Generator().manual_seed(seed))[ij[:, 1], ij[:, 0]]
    close = (colours - tile_colours).abs().amax(-1) < 0.01
    assert close[means[:, 2].abs() < 0.01].float().mean() > 0.8


def test_rejects_bad_depth_range():
    c2w, K, images = _plane_scene(2, seed=0)
    with pytest.raises(ValueError, match="near"):
        view_consistent_seed_points(c2w, K, images, 10, near=2.0, far=1.0)


@pytest.mark.parametrize("image_cache", [False, True], ids=["decodes", "datamanager-cache"])
def test_model_places_its_random_gaussians_on_the_views(monkeypatch, image_cache):
    """The splat-ext model, on photographs without SfM points, moves its initial Gaussians onto the surface the views
    agree on and colours them from the images (what ns-train does at the start of training)."""
    from nerfstudio.cameras.cameras import Cameras
    from test_model import make_model

    from nerfstudio_splat_ext.models.splat_ext import SH_C0

    c2w, K, images = _plane_scene(8, seed=3)
    cameras = Cameras(camera_to_worlds=c2w, fx=K[:, 0, 0:1], fy=K[:, 1, 1:2], cx=K[:, 0, 2:3], cy=K[:, 1, 2:3],
                      width=SIZE, height=SIZE)

    class Dataset:  # what the model reads from nerfstudio's InputDataset
        def __init__(self):
            self.cameras = cameras

        def __len__(self):
            return len(images)

        def get_image_uint8(self, index):
            assert not image_cache, "decoded an image the datamanager had cached"
            return images[index]

    class DataManager:  # without an image cache the model decodes the images itself
        train_dataset = Dataset()

    if image_cache:  # nerfstudio's full-image datamanagers: decoded (and undistorted) once, then read from here
        DataManager.cached_train = [{"image": img, "image_idx": i} for i, img in enumerate(images)]

    model = make_model(num_random=1500, metadata={})
    assert model._random_placement() == "views"
    before = model.gauss_params["means"].detach().clone()
    model.scene_extent = 2.0
    monkeypatch.setattr(model.config, "random_init_depth_range", (0.25, 3.0))  # 0.5 to 6 world units
    model._place_on_views(DataManager())
    means = model.gauss_params["means"].detach()
    assert means.shape == before.shape
    # The model tests 32 depths per ray: about 0.18 apart near the plane.
    on_plane = (means[:, 2].abs() < 0.2).float().mean()
    assert on_plane > 0.75 and on_plane > (before[:, 2].abs() < 0.2).float().mean() + 0.3
    colours = model.gauss_params["features_dc"].detach() * SH_C0 + 0.5
    assert colours.min() >= 0 and colours.max() <= 1
    assert torch.isfinite(model.gauss_params["scales"]).all()
