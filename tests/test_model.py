"""SplatExtModel pieces: initialisation, background, camera convention, position learning-rate scaling, rendering."""

from __future__ import annotations

import math

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.optimizers import AdamOptimizerConfig, Optimizers
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

from nerfstudio_splat_ext.strategy import ContributionStrategy
from nerfstudio_splat_ext.models.splat_ext import (
    SH_C0,
    SplatExtModel,
    SplatExtModelConfig,
    camera_extent,
    camera_to_world_to_viewmat,
    knn_mean_distance,
    view_dependent_colors,
)
from nerfstudio_splat_ext.render.reference import spherical_harmonics_reference


def make_model(**kwargs) -> SplatExtModel:
    box = SceneBox(aabb=torch.tensor([[-1.0, -2.0, -0.5], [1.0, 2.0, 0.5]]))
    config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in SplatExtModelConfig.__dataclass_fields__}
    return SplatExtModelConfig(**config_kwargs).setup(scene_box=box, num_train_data=4, device="cpu", **kwargs)


def test_random_init_fills_the_scene_box():
    model = make_model(num_random=3000, metadata={})
    means = model.gauss_params["means"].detach()
    assert means.shape == (3000, 3)
    lo, hi = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([1.0, 2.0, 0.5])
    assert ((means >= lo) & (means <= hi)).all()
    # spread over the whole box, not a corner of it
    assert (means.min(0).values < lo + 0.1).all() and (means.max(0).values > hi - 0.1).all()
    assert torch.allclose(torch.sigmoid(model.gauss_params["opacities"]), torch.tensor(0.1))


def test_sfm_points_initialise_positions_and_colours():
    xyz = torch.randn(500, 3)
    rgb = torch.randint(0, 256, (500, 3), dtype=torch.uint8)
    model = make_model(seed_points=(xyz, rgb), metadata={})
    assert torch.equal(model.gauss_params["means"].detach(), xyz)
    colour = model.gauss_params["features_dc"].detach() * SH_C0 + 0.5
    assert torch.allclose(colour, rgb.float() / 255.0, atol=1e-6)
    # initial scale: mean distance to the 3 nearest neighbours (brute force here)
    d = torch.cdist(xyz, xyz)
    d.fill_diagonal_(float("inf"))
    knn = d.topk(3, largest=False).values.mean(-1)
    assert torch.allclose(model.gauss_params["scales"].detach()[:, 0].exp(), knn, rtol=1e-4)


def test_initial_points_are_subsampled_to_the_gaussian_budget():
    from nerfstudio_splat_ext.strategy.contribution import ContributionStrategy

    xyz = torch.randn(500, 3)
    rgb = torch.randint(0, 256, (500, 3), dtype=torch.uint8)
    model = make_model(seed_points=(xyz, rgb), metadata={},
                       strategy=ContributionStrategy(kind="contribution", max_gaussians=321))
    means = model.gauss_params["means"].detach()
    assert means.shape == (321, 3)
    # a subset of the SfM points, each with its own colour
    index = torch.cdist(means, xyz).argmin(dim=1)
    assert torch.equal(xyz[index], means) and index.unique().numel() == 321
    colour = model.gauss_params["features_dc"].detach() * SH_C0 + 0.5
    assert torch.allclose(colour, rgb[index].float() / 255.0, atol=1e-6)
    assert make_model(num_random=300, metadata={},
                      strategy=ContributionStrategy(max_gaussians=1000)).gauss_params["means"].shape[0] == 300


def test_background_follows_the_dataset():
    white = make_model(num_random=100, metadata={"background_color": torch.ones(3)})
    assert torch.equal(white.background_color, torch.ones(3))
    unknown = make_model(num_random=100, metadata={})
    assert torch.equal(unknown.background_color, torch.zeros(3))
    forced = make_model(num_random=100, metadata={"background_color": torch.ones(3)}, background_color="black")
    assert torch.equal(forced.background_color, torch.zeros(3))


def test_viewmat_matches_nerfstudio_convention():
    from nerfstudio.models.splatfacto import get_viewmat  # nerfstudio's own conversion, as the reference

    c2w = torch.randn(5, 3, 4)
    c2w[:, :3, :3] = torch.linalg.qr(torch.randn(5, 3, 3)).Q
    assert torch.allclose(camera_to_world_to_viewmat(c2w), get_viewmat(c2w), atol=1e-5)


def test_position_lr_scaled_by_extent_and_idempotent():
    means = torch.nn.Parameter(torch.zeros(10, 3))
    config = {
        "means": {"optimizer": AdamOptimizerConfig(lr=1.6e-4, eps=1e-15),
                  "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=1000)},
    }
    optimizers = Optimizers(config, {"means": [means]})
    SplatExtModel._scale_position_lr(optimizers, 4.0)
    SplatExtModel._scale_position_lr(optimizers, 4.0)  # a resume applies it again: no compounding
    group = optimizers.optimizers["means"].param_groups[0]
    assert group["lr"] == pytest.approx(6.4e-4)
    scheduler = optimizers.schedulers["means"]
    for _ in range(1000):
        scheduler.step()
    assert optimizers.optimizers["means"].param_groups[0]["lr"] == pytest.approx(6.4e-6, rel=1e-3)


def test_camera_extent_is_paper_radius():
    centres = torch.tensor([[4.0, 0, 0], [-4.0, 0, 0], [0, 4.0, 0], [0, -4.0, 0]])
    c2w = torch.zeros(4, 3, 4)
    c2w[:, :3, :3] = torch.eye(3)
    c2w[:, :3, 3] = centres
    assert camera_extent(c2w) == pytest.approx(4.4)


def test_cpu_render_and_gradients():
    model = make_model(num_random=2000, metadata={"background_color": torch.ones(3)})
    model.train()
    camera = Cameras(
        camera_to_worlds=torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 5.0]]]),
        fx=40.0, fy=40.0, cx=16.0, cy=12.0, width=32, height=24,
    )
    model.strategy_state = model.strategy.initialize_state(scene_extent=1.0)
    out = model.get_outputs(camera)
    assert out["rgb"].shape == (24, 32, 3)
    assert 0.0 <= float(out["rgb"].min()) and float(out["rgb"].max()) <= 1.0
    loss = model.get_loss_dict(out, {"image": torch.rand(24, 32, 3)})["main_loss"]
    loss.backward()
    grads = model.gauss_params["means"].grad
    assert grads is not None and torch.isfinite(grads).all() and grads.abs().sum() > 0
    assert model.info["means2d"].grad is not None  # the density control sees view-space gradients
    assert not math.isnan(float(loss))


def test_one_camera_colours_equal_the_per_camera_path():
    """The single-camera shortcut of view_dependent_colors (no [C,N,K,3] copy) gives each camera's colours of the
    batched path, values and gradients."""
    torch.manual_seed(0)
    n = 50
    means = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    f_dc = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    f_rest = 0.3 * torch.randn(n, 15, 3, dtype=torch.float64).requires_grad_()
    centres = torch.randn(2, 3, dtype=torch.float64) * 4
    batched = view_dependent_colors(spherical_harmonics_reference, 3, means, f_dc, f_rest, centres)
    weights = torch.rand_like(batched)
    grads_batched = torch.autograd.grad((batched * weights).sum(), (means, f_dc, f_rest))
    singles = [view_dependent_colors(spherical_harmonics_reference, 3, means, f_dc, f_rest, centres[c : c + 1])
               for c in range(2)]
    assert all(single.shape == (1, n, 3) for single in singles)
    single = torch.cat(singles)
    torch.testing.assert_close(single, batched)
    grads_single = torch.autograd.grad((single * weights).sum(), (means, f_dc, f_rest))
    for a, b in zip(grads_single, grads_batched):
        torch.testing.assert_close(a, b)


def test_cached_training_views_render_what_the_cameras_render():
    """A training step reads intrinsics, pose and size from the model's cache (no GPU-to-host reads); the image
    must be the one nerfstudio's camera path gives, and a downscaled render must leave the camera untouched."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = make_model(num_random=500, metadata={"background_color": torch.ones(3)})
    model.train()
    model.strategy_state = model.strategy.initialize_state(scene_extent=1.0)
    rot = torch.linalg.qr(torch.randn(3, 3, 3, generator=gen)).Q
    rot = rot * torch.sign(torch.linalg.det(rot))[:, None, None]
    centres = rot[:, :, 2] * 5.0  # nerfstudio cameras look along their -z: at the origin
    cameras = Cameras(
        camera_to_worlds=torch.cat([rot, centres[:, :, None]], dim=-1),
        fx=30.0 + 20 * torch.rand(3, 1, generator=gen), fy=40.0, cx=16.0, cy=12.0, width=32, height=24,
    )
    for i in range(3):
        camera = cameras[i : i + 1]
        plain = model.get_outputs(camera)["rgb"]
        assert plain.std() > 1e-3  # Gaussians in view, not an empty background
        camera.metadata = {"cam_idx": i}
        first = model.get_outputs(camera)["rgb"]  # reads the camera and keeps its view
        camera.fx = camera.fx * 2  # not read again: the cache answers
        cached = model.get_outputs(camera)["rgb"]
        torch.testing.assert_close(first, plain, atol=1e-6, rtol=0)
        torch.testing.assert_close(cached, plain, atol=1e-6, rtol=0)
    assert sorted(model._train_views) == [0, 1, 2]
    model.config.num_downscales = 1  # renders at half resolution for the first steps
    model.config.resolution_schedule = 10**6
    model.step = 0
    camera = cameras[0:1]
    camera.metadata = {"cam_idx": 0}
    assert model.get_outputs(camera)["rgb"].shape == (12, 16, 3)
    assert int(camera.width) == 32 and float(camera.fy) == 40.0


def test_auto_strategy_and_placement_follow_the_kind_of_images():
    photos = make_model(num_random=100, metadata={})
    objects = make_model(num_random=100, metadata={"background_color": torch.ones(3)})
    assert photos.strategy.kind == "contribution" and photos._random_placement() == "views"
    assert objects.strategy.kind == "adc" and objects._random_placement() == "box"
    forced = make_model(num_random=100, metadata={}, strategy=ContributionStrategy(kind="adc"))
    assert forced.strategy.kind == "adc"


def test_initial_scales_follow_the_point_spacing():
    """Box placement: each scale is the mean distance to the 3 nearest points. Points that the views will place
    (photographs) skip that search: one scale, the box's mean spacing, of the same order as the searched ones."""
    objects = make_model(num_random=4000, metadata={"background_color": torch.ones(3)})
    photos = make_model(num_random=4000, metadata={})
    searched = objects.gauss_params["scales"].detach()
    means = objects.gauss_params["means"].detach()
    assert torch.allclose(searched, torch.log(knn_mean_distance(means))[:, None].expand(-1, 3))
    placeholder = photos.gauss_params["scales"].detach()
    assert torch.all(placeholder == placeholder[0, 0])
    ratio = placeholder[0, 0].exp() / searched.exp().mean()
    assert 0.5 < ratio < 2.0, ratio
