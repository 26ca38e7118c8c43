"""splat-ext-nerf: the paper's encoding and network, its volume rendering, and a tiny CPU training run on lego."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import train_and_eval, viewer_page

from nerfstudio_splat_ext.fields.nerf_mlp import NeRFMLP, PositionalEncoding

BIN = Path(sys.executable).parent


def test_positional_encoding_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(17, 3, generator=g) * 4 - 2
    enc = PositionalEncoding(3, num_frequencies=6)(x)
    assert enc.shape == (17, 3 * (2 * 6 + 1))
    torch.testing.assert_close(enc[:, :3], x)
    for k in range(6):
        block = enc[:, 3 + 6 * k : 3 + 6 * (k + 1)]
        torch.testing.assert_close(block[:, :3], torch.sin(x * 2.0**k))
        torch.testing.assert_close(block[:, 3:], torch.cos(x * 2.0**k))


def test_mlp_has_the_paper_layout_and_ranges():
    mlp = NeRFMLP()
    widths = [(layer.in_features, layer.out_features) for layer in mlp.trunk]
    pos_dim, dir_dim = 3 + 3 * 2 * 10, 3 + 3 * 2 * 4
    assert len(widths) == 8 and all(out == 256 for _, out in widths)
    assert widths[0][0] == pos_dim and widths[4][0] == 256 + pos_dim  # skip into the fifth layer
    assert all(w[0] == 256 for i, w in enumerate(widths) if i not in (0, 4))
    assert mlp.color_hidden.in_features == 256 + dir_dim and mlp.color_hidden.out_features == 128
    g = torch.Generator().manual_seed(1)
    sigma, rgb = mlp(torch.randn(64, 3, generator=g), torch.nn.functional.normalize(torch.randn(64, 3, generator=g), dim=-1))
    assert sigma.shape == (64, 1) and rgb.shape == (64, 3)
    assert bool((sigma >= 0).all()) and bool(((rgb > 0) & (rgb < 1)).all())
    # density does not depend on the view direction
    p = torch.randn(8, 3, generator=g)
    s1, _ = mlp(p, torch.tensor([[0.0, 0.0, 1.0]]).expand(8, 3))
    s2, _ = mlp(p, torch.tensor([[1.0, 0.0, 0.0]]).expand(8, 3))
    torch.testing.assert_close(s1, s2)


def _model(**overrides):
    from nerfstudio.data.scene_box import SceneBox

    from nerfstudio_splat_ext.models.nerf import SplatExtNerfModelConfig

    settings = dict(mlp_depth=2, mlp_width=16, mlp_skip=1, color_width=8, num_coarse_samples=32,
                    num_importance_samples=32, fast_path="off")
    settings.update(overrides)
    cfg = SplatExtNerfModelConfig(**settings)
    box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    return cfg.setup(scene_box=box, num_train_data=1, metadata={"background_color": torch.ones(3)})


def _rays(n: int):
    from nerfstudio.cameras.rays import RayBundle

    origins = torch.tensor([[0.0, 0.0, -3.0]]).expand(n, 3).clone()
    xy = torch.linspace(-0.2, 0.2, n)
    directions = torch.nn.functional.normalize(torch.stack([xy, torch.zeros(n), torch.ones(n)], -1), dim=-1)
    return RayBundle(origins=origins, directions=directions, pixel_area=torch.ones(n, 1),
                     camera_indices=torch.zeros(n, 1, dtype=torch.long))


@pytest.mark.parametrize("fast_path", ["off", "on"])
def test_volume_rendering_of_a_homogeneous_box_is_analytic(fast_path):
    """A constant density sigma and colour c inside the box: C = (1 - exp(-sigma L)) c + exp(-sigma L) bg, where L is
    the ray's length inside the box (the collider, or the occupancy grid's marching, clips rays to it)."""
    model = _model(fast_path=fast_path, render_step_size=1e-3, grid_resolution=16)
    model.eval()
    sigma, colour = 0.7, torch.tensor([0.2, 0.5, 0.9])

    def constant(positions, directions):
        shape = positions.shape[:-1]
        return torch.full((*shape, 1), sigma), colour.expand(*shape, 3)

    model.field_coarse.forward = constant
    model.field_fine.forward = constant
    model.field_fine.density = lambda positions: constant(positions, None)[0]
    rays = _rays(9)
    with torch.no_grad():
        out = model(rays)
    length = 2.0 / rays.directions[:, 2]  # z from -1 to 1
    trans = torch.exp(-sigma * length)[:, None]
    expected = (1 - trans) * colour + trans * torch.ones(3)
    torch.testing.assert_close(out["rgb"], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["accumulation"], 1 - trans, atol=1e-4, rtol=0)


def test_training_step_reduces_the_loss_on_a_fixed_batch():
    # The network's initial weights come from the global generator: seed it, so that the outcome does not depend
    # on which tests ran before.
    torch.manual_seed(0)
    model = _model()
    model.train()
    rays = _rays(32)
    batch = {"image": torch.rand(32, 3, generator=torch.Generator().manual_seed(2))}
    params = model.get_param_groups()["fields"]
    assert {id(p) for p in params} == {id(p) for p in model.field_coarse.parameters()} | {
        id(p) for p in model.field_fine.parameters()
    }
    opt = torch.optim.Adam(params, lr=5e-3)
    losses = []
    for _ in range(60):
        loss = sum(model.get_loss_dict(model(rays), batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_ns_train_lists_splat_ext_nerf():
    out = subprocess.run([str(BIN / "ns-train"), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "splat-ext-nerf" in out.stdout


# A tiny NeRF (4x64 MLP, 32 + 32 samples, 512 rays per batch) that trains on 2 cores in a few minutes.
TINY = [
    "--pipeline.model.mlp-depth", "4", "--pipeline.model.mlp-width", "64", "--pipeline.model.mlp-skip", "2",
    "--pipeline.model.color-width", "32", "--pipeline.model.num-coarse-samples", "32",
    "--pipeline.model.num-importance-samples", "32", "--pipeline.datamanager.train-num-rays-per-batch", "512",
]
NERF_CPU_STEPS = 2500
NERF_CPU_MIN_PSNR = 20.0


@pytest.mark.slow
def test_tiny_nerf_on_lego_50px_cpu(lego_dir, tmp_path):
    results, config = train_and_eval("splat-ext-nerf", lego_dir, tmp_path, [
        "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--max-num-iterations", str(NERF_CPU_STEPS), "--optimizers.fields.scheduler.max-steps", str(NERF_CPU_STEPS),
        "--steps-per-eval-image", str(10 * NERF_CPU_STEPS), "--steps-per-eval-all-images", str(10 * NERF_CPU_STEPS),
        "--steps-per-save", str(NERF_CPU_STEPS), "--pipeline.datamanager.camera-res-scale-factor", "0.0625",
        "--pipeline.model.eval-num-rays-per-chunk", "2500", *TINY])
    print(f"splat-ext-nerf tiny, lego 50x50 CPU: test PSNR {results['psnr']:.2f} dB, SSIM {results['ssim']:.4f}")
    assert math.isfinite(results["psnr"]) and results["psnr"] >= NERF_CPU_MIN_PSNR
    assert "<html" in viewer_page(config).lower()  # ns-viewer loads the NeRF checkpoint and serves the page


@pytest.mark.parametrize("fast_path", ["off", "on"])
def test_random_training_background_composites_target_and_render_over_the_same_colour(fast_path):
    """With RGBA targets, training composites both the target and the render (C_obj + (1 - acc) bg, for the coarse
    and the fine render) over one random colour per ray; with train_background 'fixed' both use white."""
    model = _model(fast_path=fast_path, grid_resolution=16, train_background="random")
    model.train()
    rays = _rays(64)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    image = torch.rand(64, 4, generator=gen)
    image[:20, 3] = 0.0  # fully transparent pixels: their target is the background itself
    with torch.no_grad():
        out = model(rays)
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        torch.manual_seed(seed)
        losses = model.get_loss_dict(out, {"image": image})
        torch.manual_seed(seed)
        bg = torch.rand(64, 3)
        gt = image[:, :3] * image[:, 3:] + (1 - image[:, 3:]) * bg
        for key, render, acc in (("rgb_loss_fine", "rgb", "accumulation"),
                                 ("rgb_loss_coarse", "rgb_coarse", "accumulation_coarse")):
            if render not in out:
                continue
            pred = out[render] - (1 - out[acc]) * torch.ones(3) + (1 - out[acc]) * bg
            torch.testing.assert_close(losses[key], torch.mean((pred - gt) ** 2))
        model.config.train_background = "fixed"
        fixed = model.get_loss_dict(out, {"image": image})
        white_gt = image[:, :3] * image[:, 3:] + (1 - image[:, 3:])
        torch.testing.assert_close(fixed["rgb_loss_fine"], torch.mean((out["rgb"] - white_gt) ** 2))


def test_softplus_density_keeps_a_gradient_where_relu_has_none():
    # A density head pushed far negative (what happens when a run loses all density): ReLU passes no gradient, so
    # the run cannot recover; softplus still does.
    torch.manual_seed(0)
    x = torch.rand(64, 3) * 2 - 1
    grads = {}
    for activation in ("relu", "softplus"):
        mlp = NeRFMLP(depth=2, width=16, skip=4, color_width=8, density_activation=activation)
        with torch.no_grad():
            mlp.density_head.bias.fill_(-30.0)
        sigma = mlp.density(x)
        assert (sigma >= 0).all()
        sigma.sum().backward()
        grads[activation] = mlp.density_head.bias.grad.abs().item()
    assert grads["relu"] == 0.0
    assert grads["softplus"] > 0.0
    with pytest.raises(ValueError, match="density_activation"):
        NeRFMLP(density_activation="exp")


def test_a_run_that_loses_all_density_is_reported_once(capsys):
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes

    def grid_callback(model):
        return model.get_training_callbacks(TrainingCallbackAttributes(None, None, None, None))[0]

    # A live network: the grid keeps cells, nothing is said.
    torch.manual_seed(0)
    live = _model(fast_path="on", grid_resolution=8)
    grid_callback(live).run_callback(0)
    assert live.occupancy_grid.occupied.any()
    assert "occupancy grid is empty" not in capsys.readouterr().out
    # Zero density everywhere (a dead ReLU): the grid empties, and the user is told what to do, once.
    dead = _model(fast_path="on", grid_resolution=8)
    dead.field_fine.density = lambda positions: torch.zeros(*positions.shape[:-1], 1)
    callback = grid_callback(dead)
    for step in range(0, 10 * dead.config.grid_update_every, dead.config.grid_update_every):
        callback.run_callback(step)
    assert not dead.occupancy_grid.occupied.any()
    out = capsys.readouterr().out
    assert out.count("occupancy grid is empty") == 1 and "density-activation softplus" in out
