"""Per-pixel Gaussian maps (decode, bounds, rendering) and the U-Net of the generative models, on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from nerfstudio_splat_ext.generative.networks import UNet, count_parameters
from nerfstudio_splat_ext.generative.pixel_gaussians import (
    CHANNEL_SLICES,
    GAUSSIAN_MAP_CHANNELS,
    GaussianMapConfig,
    activate_raw,
    decode_gaussian_map,
    render_pixel_gaussians,
)
from nerfstudio_splat_ext.models.splat_ext import SH_C0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None]
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def look_at_origin(position: torch.Tensor) -> torch.Tensor:
    """OpenGL camera-to-world [4, 4] at `position` looking at the origin (world +z up)."""
    back = position / position.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype), back)
    right = right / right.norm()
    up = torch.linalg.cross(back, right)
    c2w = torch.eye(4, dtype=position.dtype)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, position
    return c2w


def project_opengl(c2w: torch.Tensor, intr: torch.Tensor, x: torch.Tensor):
    """Independent pinhole projection of world points x [N, 3] with an OpenGL c2w: (pixel uv [N, 2], depth [N])."""
    cam = (x - c2w[:3, 3]) @ c2w[:3, :3]  # R^T (x - c), OpenGL camera frame
    z = -cam[:, 2]  # the camera looks along -z
    u = intr[0] * cam[:, 0] / z + intr[2]
    v = -intr[1] * cam[:, 1] / z + intr[3]  # image rows grow downwards, camera y upwards
    return torch.stack([u, v], dim=-1), z


def test_decode_places_gaussians_on_pixel_rays():
    gen = torch.Generator().manual_seed(1)
    cfg = GaussianMapConfig()
    b, h, w = 3, 5, 7
    c2w = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
    intr = torch.zeros(b, 4, dtype=torch.float64)
    for i in range(b):
        c2w[i, :3, :3] = random_rotation(gen)
        c2w[i, :3, 3] = torch.randn(3, generator=gen, dtype=torch.float64) * 3
        intr[i] = torch.tensor([20.0, 25.0, 3.1, 2.4], dtype=torch.float64) * (0.5 + torch.rand(1, generator=gen))
    canonical = torch.rand(b, GAUSSIAN_MAP_CHANNELS, h, w, generator=gen, dtype=torch.float64) * 2 - 1
    canonical[:, CHANNEL_SLICES["offset"]] = 0.0
    g = decode_gaussian_map(canonical, c2w, intr, cfg)
    assert g.means.shape == (b, h * w, 3) and g.num_gaussians() == h * w
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    centres = torch.stack([u.flatten() + 0.5, v.flatten() + 0.5], dim=-1)
    for i in range(b):
        uv, z = project_opengl(c2w[i], intr[i], g.means[i])
        assert (z > 0).all(), "Gaussians must lie in front of the camera"
        torch.testing.assert_close(uv, centres, atol=1e-8, rtol=0)
        dist = (g.means[i] - c2w[i, :3, 3]).norm(dim=-1)
        expected = cfg.near + (canonical[i, 0].flatten() + 1) / 2 * (cfg.far - cfg.near)
        torch.testing.assert_close(dist, expected, atol=1e-9, rtol=0)
    # the offset channels move the mean by offset_scale * c in the world frame
    moved = canonical.clone()
    moved[:, CHANNEL_SLICES["offset"]] = torch.rand(b, 3, h, w, generator=gen, dtype=torch.float64) * 2 - 1
    g2 = decode_gaussian_map(moved, c2w, intr, cfg)
    off = moved[:, CHANNEL_SLICES["offset"]].flatten(2).transpose(1, 2) * cfg.offset_scale
    torch.testing.assert_close(g2.means - g.means, off, atol=1e-9, rtol=0)


def test_canonical_channels_bounded_and_decoded_in_range():
    cfg = GaussianMapConfig()
    raw = torch.randn(2, GAUSSIAN_MAP_CHANNELS, 4, 6) * 100
    canonical = activate_raw(raw)
    assert canonical.min() >= -1 and canonical.max() <= 1
    assert (canonical.abs() > 0.99).float().mean() > 0.5  # saturates, does not clip to a constant
    extremes = torch.cat([-torch.ones(1, 15, 4, 6), torch.ones(1, 15, 4, 6), canonical])
    c2w = torch.eye(4).repeat(4, 1, 1)
    intr = torch.tensor([10.0, 10.0, 3.0, 2.0]).repeat(4, 1)
    g = decode_gaussian_map(extremes, c2w, intr, cfg)
    assert g.opacities.min() >= 0 and g.opacities.max() <= 1
    assert g.colors.min() >= 0 and g.colors.max() <= 1
    assert g.scales.min() >= cfg.scale_min * (1 - 1e-5) and g.scales.max() <= cfg.scale_max * (1 + 1e-5)
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(4, 24))
    torch.testing.assert_close(g.opacities[0], torch.zeros(24))
    torch.testing.assert_close(g.scales[1], torch.full((24, 3), cfg.scale_max))
    # a zero quaternion decodes to the identity, with finite gradients
    zero_q = canonical.clone().requires_grad_(True)
    with torch.no_grad():
        zero_q[:, CHANNEL_SLICES["rotation"]] = 0.0
    gz = decode_gaussian_map(zero_q, c2w[:2], intr[:2], cfg)
    torch.testing.assert_close(gz.quats, torch.tensor([1.0, 0, 0, 0]).expand(2, 24, 4))
    gz.quats.sum().backward()
    assert torch.isfinite(zero_q.grad).all()
    with pytest.raises(ValueError, match="15"):
        activate_raw(torch.zeros(1, 14, 4, 4))
    with pytest.raises(ValueError, match="near"):
        GaussianMapConfig(near=3.0, far=2.0)


def test_ply_arrays_invert_the_activations():
    canonical = activate_raw(torch.randn(2, 15, 3, 3))
    g = decode_gaussian_map(canonical, torch.eye(4).repeat(2, 1, 1), torch.tensor([[5.0, 5, 1.5, 1.5]] * 2))
    arrays = g.to_ply_arrays(1)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    names += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    assert list(arrays) == names
    assert all(a.shape == (9,) for a in arrays.values())
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    torch.testing.assert_close(torch.stack([t["x"], t["y"], t["z"]], -1), g.means[1])
    torch.testing.assert_close(torch.sigmoid(t["opacity"]), g.opacities[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([t[f"scale_{i}"] for i in range(3)], -1).exp(), g.scales[1])
    torch.testing.assert_close(torch.stack([t[f"f_dc_{i}"] for i in range(3)], -1) * SH_C0 + 0.5, g.colors[1])
    torch.testing.assert_close(torch.stack([t[f"rot_{i}"] for i in range(4)], -1), g.quats[1])


def _camera(seed: int, size: int):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(3, generator=gen, dtype=torch.float64)
    d[2] = d[2].abs() * 0.5  # above the equator, like the generated views
    c2w = look_at_origin(2.6 * d / d.norm()).float()
    focal = 0.5 * size / math.tan(0.5 * 2 * math.atan(16 / 35))
    intr = torch.tensor([focal, focal, size / 2, size / 2])
    return c2w, intr


def test_single_gaussian_renders_at_its_pixel():
    # the OpenGL -> OpenCV view-matrix conversion of the render path agrees with the decode's rays
    size, cfg = 16, GaussianMapConfig()
    c2w, intr = _camera(3, size)
    for (u0, v0) in [(3, 11), (12, 2)]:
        canonical = -torch.ones(1, 15, size, size)  # transparent everywhere ...
        canonical[0, CHANNEL_SLICES["offset"]] = 0.0
        canonical[0, CHANNEL_SLICES["opacity"], v0, u0] = 1.0  # ... but one opaque Gaussian
        canonical[0, CHANNEL_SLICES["scale"], v0, u0] = -0.8
        canonical[0, CHANNEL_SLICES["rotation"], v0, u0] = torch.tensor([1.0, 0, 0, 0])
        g = decode_gaussian_map(canonical, c2w[None], intr[None], cfg)
        _, alpha = render_pixel_gaussians(g, c2w[None, None], intr[None, None], size, size, torch.ones(3))
        assert alpha.shape == (1, 1, size, size, 1)
        peak = int(alpha[0, 0, ..., 0].flatten().argmax())
        assert (peak % size, peak // size) == (u0, v0)


def sphere_scene(c2w: torch.Tensor, intr: torch.Tensor, size: int, radius: float = 0.8):
    """Analytic scene: a sphere at the origin coloured by position. Per pixel centre: hit mask, distance along the
    unit ray, colour."""
    from nerfstudio_splat_ext.generative.pixel_gaussians import pixel_rays

    centre, dirs = pixel_rays(c2w[None].double(), intr[None].double(), size, size)
    o, d = centre[0], dirs[0]
    bq = (o[None] * d).sum(-1)
    disc = bq**2 - (o.dot(o) - radius**2)
    hit = disc > 0
    t = -bq - disc.clamp_min(0).sqrt()
    p = o[None] + t[:, None] * d
    colour = (0.5 + 0.45 * torch.sin(2.0 * p + torch.tensor([0.0, 1.0, 2.0], dtype=p.dtype))).clamp(0, 1)
    image = torch.where(hit[:, None], colour, torch.ones_like(colour))
    return hit, t, colour, image.reshape(size, size, 3).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_true_depth_map_renders_back_the_source_image():
    size, cfg = 32, GaussianMapConfig()
    c2w, intr = _camera(7, size)
    hit, t, colour, image = sphere_scene(c2w, intr, size)
    # small opaque Gaussians at the analytic surface points, 0.3 px wide, transparent where the ray misses
    canonical = torch.zeros(1, 15, size * size)
    canonical[0, 0] = (2 * (t - cfg.near) / (cfg.far - cfg.near) - 1).float()
    canonical[0, 4] = torch.where(hit, 1.0, -1.0)
    log_s = torch.log(0.3 * t / intr[0]).float()
    canonical[0, 5:8] = 2 * (log_s - math.log(cfg.scale_min)) / (math.log(cfg.scale_max) - math.log(cfg.scale_min)) - 1
    canonical[0, 8] = 1.0
    canonical[0, 12:15] = (2 * colour - 1).T.float()
    canonical = canonical.reshape(1, 15, size, size)
    assert canonical.abs().max() <= 1.0
    g = decode_gaussian_map(canonical, c2w[None], intr[None], cfg)
    # the decoded means lie on the analytic sphere (depth is the distance along the unit ray)
    on_sphere = g.means[0][hit].norm(dim=-1)
    torch.testing.assert_close(on_sphere, torch.full_like(on_sphere, 0.8), atol=1e-4, rtol=0)

    # a nearby view (the camera turned 10 degrees about the vertical axis) of the same analytic scene
    a = math.radians(10.0)
    turn = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    c2w_b = look_at_origin(turn @ c2w[:3, 3])
    _, _, _, image_b = sphere_scene(c2w_b, intr, size)
    rgb, alpha = render_pixel_gaussians(
        g, torch.stack([c2w, c2w_b])[None], intr.expand(1, 2, 4), size, size, torch.ones(3)
    )
    got = psnr(rgb[0, 0], image)
    assert got > 22.0, got  # measured 25.9 dB; the rest is the silhouette (pixel-centre truth vs. smooth splats)
    interior = hit.reshape(size, size)
    assert alpha[0, 0, ..., 0][interior].min() > 0.95
    assert (rgb[0, 0] - image).abs()[interior].mean() < 0.03
    got_b = psnr(rgb[0, 1], image_b)
    assert got_b > 21.0, got_b  # measured 25.0 dB


def test_render_is_differentiable():
    size = 16
    c2w, intr = _camera(11, size)
    raw = torch.randn(2, 15, size, size, requires_grad=True)
    g = decode_gaussian_map(activate_raw(raw), c2w.expand(2, 4, 4), intr.expand(2, 4))
    rgb, alpha = render_pixel_gaussians(g, c2w.expand(2, 3, 4, 4), intr.expand(2, 3, 4), size, size, torch.ones(3))
    assert rgb.shape == (2, 3, size, size, 3) and alpha.shape == (2, 3, size, size, 1)
    rgb.mean().backward()
    grad = raw.grad.abs().sum(dim=(0, 2, 3))
    for name in ("depth", "opacity", "scale", "colour"):
        assert grad[CHANNEL_SLICES[name]].sum() > 0, name


def test_one_call_batch_render_matches_the_per_item_loop():
    # Several objects rendered in one rasterizer call (moved apart, far plane between them) must give each camera
    # exactly its own object: same images and same gradients as one call per object. Cameras are drawn per object
    # from all directions, so some look along the axis the objects are moved along.
    size, b, v = 16, 3, 4
    cams = [[_camera(100 + 10 * i + j, size) for j in range(v)] for i in range(b)]
    c2w = torch.stack([torch.stack([c for c, _ in row]) for row in cams])  # [B, V, 4, 4]
    intr = torch.stack([torch.stack([k for _, k in row]) for row in cams])
    c2w[1, 0] = look_at_origin(torch.tensor([2.6, 0.0, 0.0]))  # looking down -x, at the other objects' line
    c2w[0, 1] = look_at_origin(torch.tensor([-2.6, 0.0, 0.01]))
    raw = torch.randn(b, 15, size, size)
    results = []
    for one_call in (False, True):
        x = raw.clone().requires_grad_(True)
        g = decode_gaussian_map(activate_raw(x), c2w[:, 0], intr[:, 0])
        rgb, alpha = render_pixel_gaussians(g, c2w, intr, size, size, torch.ones(3), one_call=one_call)
        (rgb * torch.linspace(0, 1, 3)).sum().backward()
        results.append((rgb.detach(), alpha.detach(), x.grad))
    (rgb0, a0, g0), (rgb1, a1, g1) = results
    assert a0.amax() > 0.5  # the objects are in view
    # Equal up to float32 rounding of the moved positions, which can flip a faint tail across a pixel's bounding
    # box (measured: 0.03% of values differ by more than 1e-4, by at most 0.0011; gradients by 2e-4 of their max).
    for moved, per_item in ((rgb1, rgb0), (a1, a0)):
        diff = (moved - per_item).abs()
        assert diff.max() < 1.0 / 255 and (diff > 1e-4).float().mean() < 0.005, (diff.max(), (diff > 1e-4).float().mean())
    assert (g1 - g0).abs().max() < 1e-3 * g0.abs().max()


# ----------------------------------------------------------------------------------------------------------- U-Net


def test_unet_shapes_and_gradients():
    net = UNet(5, 15, base_width=8, channel_mults=(1, 2, 2), num_res_blocks=2, attention_levels=(2,))
    x = torch.randn(2, 5, 16, 24, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 15, 16, 24)
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())
    # a larger width has more parameters (teacher default: millions)
    assert count_parameters(UNet(3, 15, base_width=64, num_res_blocks=2)) > 5_000_000
    # receptive field: changing one corner pixel changes the far corner (information crosses the bottleneck)
    x2 = x.detach().clone()
    x2[:, :, 0, 0] += 1.0
    assert (net(x2)[:, :, -1, -1] - y.detach()[:, :, -1, -1]).abs().max() > 0
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 5, 10, 16))
    with pytest.raises(ValueError, match="no timesteps"):
        net(x, torch.zeros(2))


def test_unet_time_conditioning():
    net = UNet(15, 15, base_width=8, channel_mults=(1, 2), time_embedding=True).eval()
    x = torch.randn(3, 15, 8, 8)
    t = torch.tensor([0.0, 10.0, 90.0])
    y = net(x, t)
    y_other = net(x, t + 7.0)
    assert (y - y_other).abs().mean() > 1e-3 * y.abs().mean()
    # per-sample conditioning: one sample's timestep only changes that sample
    t2 = t.clone()
    t2[1] = 55.0
    y2 = net(x, t2)
    torch.testing.assert_close(y2[[0, 2]], y[[0, 2]])
    assert (y2[1] - y[1]).abs().max() > 0
    # gradients reach the time MLP
    net(x, t).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.time_mlp.parameters())
    with pytest.raises(ValueError, match="timesteps"):
        net(x)
