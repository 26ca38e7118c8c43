"""Tests for the pure-PyTorch rasterizer (nerfstudio_splat_ext.render.reference).

Every test draws a fresh random seed and prints it; set ``SPLAT_TEST_SEED`` to
replay a failing run. The compositor is checked against an independent dense
brute-force implementation (every pixel x every Gaussian, Python loop over
Gaussians in depth order) built on gsplat's pure-torch projection.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from nerfstudio_splat_ext.render.reference import (
    fully_fused_projection_reference,
    isect_tile_bounds,
    rasterization_reference,
    rasterize_to_pixels_reference,
    spherical_harmonics_reference,
)

ti = pytest.importorskip("gsplat.cuda._torch_impl")


def _seed() -> int:
    seed = int(os.environ.get("SPLAT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"[test_render_reference] seed={seed} (replay with SPLAT_TEST_SEED={seed})")
    torch.manual_seed(seed)
    return seed


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_scene(
    N: int = 50,
    C: int = 2,
    W: int = 40,
    H: int = 30,
    D: int = 3,
    dtype=torch.float64,
    sh_degree=None,
    scale_range=(0.03, 0.25),
    with_culled: bool = True,
):
    """Random Gaussians mostly in front of / on screen of C cameras around the origin."""
    f = 0.9 * W
    means = torch.randn(N, 3, dtype=dtype) * torch.tensor([0.6, 0.45, 0.6], dtype=dtype)
    scales = torch.empty(N, 3, dtype=dtype).uniform_(*scale_range)
    quats = torch.randn(N, 4, dtype=dtype)
    opacities = torch.rand(N, dtype=dtype) * 0.7 + 0.3
    # near-opaque Gaussians: exercise the 0.999 alpha clamp and the T <= 1e-4 cut-off
    opacities[: max(1, N // 3)] = 0.99995
    if N >= 10:  # faint ones around the 1/255 alpha cut
        opacities[N // 3 : N // 3 + 3] = torch.tensor([0.002, 0.0045, 0.01], dtype=dtype)
    if with_culled and N >= 10:
        means[-1] = torch.tensor([0.0, 0.0, -4.5], dtype=dtype)  # behind camera 0
        means[-2] = torch.tensor([40.0, 0.0, 0.0], dtype=dtype)  # far off screen
    if sh_degree is None:
        colors = torch.rand(N, D, dtype=dtype)
    else:
        colors = torch.randn(N, (sh_degree + 1) ** 2, 3, dtype=dtype) * 0.4
    viewmats = []
    for c in range(C):
        ang = 0.25 * c
        R = torch.tensor(
            [[math.cos(ang), 0.0, -math.sin(ang)], [0.0, 1.0, 0.0], [math.sin(ang), 0.0, math.cos(ang)]],
            dtype=dtype,
        )
        vm = torch.eye(4, dtype=dtype)
        vm[:3, :3] = R
        vm[:3, 3] = torch.tensor([0.05 * c, -0.03 * c, 4.0], dtype=dtype)
        viewmats.append(vm)
    viewmats = torch.stack(viewmats)
    K = torch.tensor([[f, 0.0, W / 2 + 0.7], [0.0, f * 1.05, H / 2 - 0.4], [0.0, 0.0, 1.0]], dtype=dtype)
    Ks = K.repeat(C, 1, 1)
    Ks[:, 0, 0] += torch.arange(C, dtype=dtype)
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                viewmats=viewmats, Ks=Ks, width=W, height=H)


# --------------------------------------------------------------------------- #
# Independent dense reference
# --------------------------------------------------------------------------- #
def _gsplat_torch_projection(s, rasterize_mode="classic"):
    covars, _ = ti._quat_scale_to_covar_preci(s["quats"], s["scales"], True, False)
    radii, means2d, depths, conics, comp = ti._fully_fused_projection(
        s["means"], covars, s["viewmats"], s["Ks"], s["width"], s["height"],
        calc_compensations=(rasterize_mode == "antialiased"),
    )
    return radii, means2d, depths, conics, comp


def brute_composite(means2d, conics, colors, opacities, radii, depths, W, H, tile_size,
                    backgrounds=None, absgrad_out=None):
    """Dense compositing: loop over Gaussians front to back, all pixels at once."""
    C, N = means2d.shape[:2]
    dtype = means2d.dtype
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    px = xs.to(dtype) + 0.5
    py = ys.to(dtype) + 0.5
    tx = torch.div(xs, tile_size, rounding_mode="floor")
    ty = torch.div(ys, tile_size, rounding_mode="floor")
    tw, th = math.ceil(W / tile_size), math.ceil(H / tile_size)
    outs, alphas = [], []
    for c in range(C):
        T = torch.ones(H, W, dtype=dtype)
        out = torch.zeros(H, W, colors.shape[-1], dtype=dtype)
        done = torch.zeros(H, W, dtype=torch.bool)
        valid = [g for g in range(N) if int(radii[c, g]) > 0]
        valid.sort(key=lambda g: (float(depths[c, g].detach()), g))
        for g in valid:
            mx, my = float(means2d[c, g, 0].detach()), float(means2d[c, g, 1].detach())
            r = float(radii[c, g])
            x_lo = min(max(math.floor(mx / tile_size - r / tile_size), 0), tw)
            x_hi = min(max(math.ceil(mx / tile_size + r / tile_size), 0), tw)
            y_lo = min(max(math.floor(my / tile_size - r / tile_size), 0), th)
            y_hi = min(max(math.ceil(my / tile_size + r / tile_size), 0), th)
            member = (tx >= x_lo) & (tx < x_hi) & (ty >= y_lo) & (ty < y_hi)
            xy = means2d[c, g][None, None, :].expand(H, W, 2)
            if absgrad_out is not None and xy.requires_grad:
                def hook(grad, c=c, g=g):
                    absgrad_out[c, g] += grad.abs().sum(dim=(0, 1))
                xy.register_hook(hook)
            dx = xy[..., 0] - px
            dy = xy[..., 1] - py
            a, b, cc = conics[c, g]
            sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
            alpha = torch.clamp(opacities[c, g] * torch.exp(-sigma), max=0.999)
            active = member & ~done & (sigma >= 0) & (alpha >= 1.0 / 255.0)
            next_T = T * (1.0 - alpha)
            stop = active & (next_T <= 1e-4)
            done = done | stop
            use = active & ~stop
            out = out + torch.where(use, alpha * T, 0.0)[..., None] * colors[c, g]
            T = torch.where(use, next_T, T)
        if backgrounds is not None:
            out = out + T[..., None] * backgrounds[c]
        outs.append(out)
        alphas.append(1.0 - T[..., None])
    return torch.stack(outs), torch.stack(alphas)


def brute_rasterization(s, tile_size, backgrounds=None, render_mode="RGB", sh_degree=None,
                        rasterize_mode="classic", absgrad_out=None):
    """Brute-force version of the whole gsplat.rasterization pipeline (packed=False)."""
    radii, means2d, depths, conics, comp = _gsplat_torch_projection(s, rasterize_mode)
    C, N = radii.shape
    opac = s["opacities"][None].expand(C, N)
    if comp is not None:
        opac = opac * comp
    if sh_degree is None:
        colors = s["colors"].expand(C, -1, -1) if s["colors"].dim() == 2 else s["colors"]
    else:
        campos = torch.inverse(s["viewmats"])[:, :3, 3]
        dirs = s["means"][None] - campos[:, None]
        colors = ti._spherical_harmonics(sh_degree, dirs, s["colors"].expand(C, -1, -1, -1))
        colors = torch.clamp_min(colors + 0.5, 0.0)
    if render_mode in ("RGB+D", "RGB+ED"):
        colors = torch.cat([colors, depths[..., None]], -1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], -1)
    elif render_mode in ("D", "ED"):
        colors = depths[..., None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(C, 1)
    img, alpha = brute_composite(means2d, conics, colors, opac, radii, depths, s["width"], s["height"],
                                 tile_size, backgrounds, absgrad_out)
    if render_mode in ("ED", "RGB+ED"):
        img = torch.cat([img[..., :-1], img[..., -1:] / alpha.clamp(min=1e-10)], -1)
    return img, alpha, means2d, radii


PARAMS = ("means", "quats", "scales", "opacities", "colors")


def _grads(s, img, alpha, extra=()):
    g = torch.Generator().manual_seed(1234)
    w_img = torch.rand(img.shape, generator=g, dtype=img.dtype) - 0.3
    w_a = torch.rand(alpha.shape, generator=g, dtype=img.dtype) - 0.5
    loss = (img * w_img).sum() + (alpha * w_a).sum()
    inputs = [s[k] for k in PARAMS] + list(extra)
    return torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)


def _with_grad(s):
    for k in PARAMS:
        s[k] = s[k].detach().clone().requires_grad_(True)
    return s


# --------------------------------------------------------------------------- #
# Projection / SH vs gsplat's torch implementation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projection_matches_gsplat_torch(dtype):
    _seed()
    s = random_scene(N=3000, C=3, W=64, H=48, dtype=dtype, scale_range=(0.005, 0.3))
    radii, means2d, depths, conics, _ = fully_fused_projection_reference(
        s["means"], s["quats"], s["scales"], s["viewmats"], s["Ks"], s["width"], s["height"])
    r_ref, m_ref, d_ref, c_ref, _ = _gsplat_torch_projection(s)
    assert radii.dtype == torch.int32 and radii.shape == (3, 3000)
    mismatch = int((radii != r_ref).sum())
    # float32: ceil() of 3 sqrt(lambda) may flip on the last ulp for a rare Gaussian
    assert mismatch <= (0 if dtype == torch.float64 else 3), mismatch
    v = (radii > 0) & (r_ref > 0)
    assert v.sum() > 1000
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(means2d[v], m_ref[v], **tol)
    torch.testing.assert_close(depths[v], d_ref[v], **tol)
    torch.testing.assert_close(conics[v], c_ref[v], **tol)
    # culled entries are zeroed and there are culled ones (behind / off-screen)
    assert (radii == 0).any()
    assert (means2d[radii == 0] == 0).all() and (conics[radii == 0] == 0).all()


def test_projection_culling_rules():
    """Near/far, radius_clip and off-screen culling as gsplat's CUDA kernel decides."""
    dtype = torch.float64
    W, H = 32, 24
    K = torch.tensor([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]], dtype=dtype)[None]
    vm = torch.eye(4, dtype=dtype)[None]
    means = torch.tensor([[0, 0, 0.005], [0, 0, 0.01], [0, 0, 5.0], [0, 0, 50.0],
                          [100.0, 0, 1.0], [0, 0, 2.0]], dtype=dtype)
    quats = torch.tensor([[1.0, 0, 0, 0]], dtype=dtype).repeat(6, 1)
    scales = torch.full((6, 3), 0.05, dtype=dtype)
    scales[5] = 1e-4  # radius from eps2d only: ceil(3 sqrt(0.3 + ...)) = 2
    radii, *_ = fully_fused_projection_reference(means, quats, scales, vm, K, W, H,
                                                 near_plane=0.01, far_plane=10.0)
    r = radii[0].tolist()
    assert r[0] == 0  # in front of near plane
    assert r[1] > 0  # exactly on near plane: kept (z < near culls)
    assert r[2] > 0
    assert r[3] == 0  # beyond far plane
    assert r[4] == 0  # off screen
    assert r[5] == 2
    radii_c, *_ = fully_fused_projection_reference(means, quats, scales, vm, K, W, H,
                                                   near_plane=0.01, far_plane=10.0, radius_clip=2.0)
    assert radii_c[0, 5] == 0  # radius <= radius_clip


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_sh_matches_gsplat_torch(degree):
    _seed()
    dirs = torch.randn(500, 3, dtype=torch.float64) * 3.0
    coeffs = torch.randn(500, 16 if degree < 4 else 25, 3, dtype=torch.float64)
    ours = spherical_harmonics_reference(degree, dirs, coeffs)
    ref = ti._spherical_harmonics(degree, dirs, coeffs)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# Compositor vs dense brute force
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("tile_size", [1, 4, 16])
def test_forward_and_gradients_match_brute_force(tile_size):
    _seed()
    s = _with_grad(random_scene(N=50, C=2, W=40, H=30, dtype=torch.float64, scale_range=(0.03, 0.3)))
    bg = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    img, alpha, meta = rasterization_reference(**s, tile_size=tile_size, backgrounds=bg)
    meta["means2d"].retain_grad()
    img_b, alpha_b, m2d_b, radii_b = brute_rasterization(s, tile_size, backgrounds=bg)
    m2d_b.retain_grad()
    assert torch.equal(meta["radii"], radii_b.to(torch.int32))
    assert (1.0 - alpha).min() < 1e-3  # some pixels reach the T <= 1e-4 cut-off
    torch.testing.assert_close(img, img_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(alpha, alpha_b, rtol=0, atol=1e-5)
    g = _grads(s, img, alpha, extra=[bg])
    g_b = _grads(s, img_b, alpha_b, extra=[bg])
    for name, a, b in zip(PARAMS + ("backgrounds",), g, g_b):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8 * float(b.abs().max())), name
    # dL/d means2d through the retained grad
    loss = lambda i, a: (i * torch.rand(i.shape, generator=torch.Generator().manual_seed(7),
                                          dtype=i.dtype)).sum() + a.sum()
    loss(img, alpha).backward()
    loss(img_b, alpha_b).backward()
    v = meta["radii"] > 0
    assert _rel(meta["means2d"].grad[v], m2d_b.grad[v]) < 1e-4


@pytest.mark.parametrize("pairs_per_band", [1, 200, 5000])
def test_pixel_bands_match_brute_force(monkeypatch, pairs_per_band):
    """The pre-pass processes bands of pixel rows (over all cameras) to bound memory; any band size, down to one row
    per band, gives the brute-force image, alpha and gradients."""
    from nerfstudio_splat_ext.render import reference

    _seed()
    monkeypatch.setattr(reference, "_MAX_PAIRS_PER_BAND", pairs_per_band)
    s = _with_grad(random_scene(N=50, C=3, W=40, H=30, dtype=torch.float64, scale_range=(0.03, 0.3)))
    img, alpha, _ = rasterization_reference(**s, tile_size=4)
    img_b, alpha_b, _, _ = brute_rasterization(s, 4)
    torch.testing.assert_close(img, img_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(alpha, alpha_b, rtol=0, atol=1e-5)
    for name, a, b in zip(PARAMS, _grads(s, img, alpha), _grads(s, img_b, alpha_b)):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))


def test_float32_forward_matches_brute_force():
    _seed()
    s = random_scene(N=60, C=1, W=40, H=30, dtype=torch.float32, scale_range=(0.03, 0.3))
    img, alpha, meta = rasterization_reference(**s, tile_size=4)
    img_b, alpha_b, _, _ = brute_rasterization(s, 4)
    assert img.dtype == torch.float32 and img.shape == (1, 30, 40, 3) and alpha.shape == (1, 30, 40, 1)
    torch.testing.assert_close(img, img_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(alpha, alpha_b, rtol=0, atol=1e-5)


def test_sh_pipeline_matches_brute_force():
    _seed()
    s = _with_grad(random_scene(N=40, C=2, dtype=torch.float64, sh_degree=3))
    img, alpha, meta = rasterization_reference(**s, sh_degree=3, tile_size=16)
    img_b, alpha_b, _, _ = brute_rasterization(s, 16, sh_degree=3)
    torch.testing.assert_close(img, img_b, rtol=0, atol=1e-5)
    for name, a, b in zip(PARAMS, _grads(s, img, alpha), _grads(s, img_b, alpha_b)):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))


@pytest.mark.parametrize("mode", ["D", "ED", "RGB+D", "RGB+ED"])
def test_depth_modes_match_brute_force(mode):
    _seed()
    s = _with_grad(random_scene(N=40, C=2, dtype=torch.float64))
    bg = torch.rand(2, 3, dtype=torch.float64)
    img, alpha, meta = rasterization_reference(**s, tile_size=4, render_mode=mode, backgrounds=bg)
    img_b, alpha_b, _, _ = brute_rasterization(s, 4, backgrounds=bg, render_mode=mode)
    assert img.shape[-1] == (1 if mode in ("D", "ED") else 4)
    torch.testing.assert_close(img, img_b, rtol=1e-9, atol=1e-6)
    for name, a, b in zip(PARAMS, _grads(s, img, alpha), _grads(s, img_b, alpha_b)):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() == 0, name
            continue
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))
    if mode == "ED":
        # expected depth lies inside the depth range wherever something was drawn
        v = alpha[..., 0] > 0.05
        d = meta["depths"][meta["radii"] > 0]
        assert (img[..., 0][v] >= d.min() - 1e-9).all() and (img[..., 0][v] <= d.max() + 1e-9).all()


def test_antialiased_matches_brute_force():
    _seed()
    s = _with_grad(random_scene(N=40, C=1, dtype=torch.float64, scale_range=(0.005, 0.1)))
    img, alpha, _ = rasterization_reference(**s, tile_size=4, rasterize_mode="antialiased")
    img_b, alpha_b, _, _ = brute_rasterization(s, 4, rasterize_mode="antialiased")
    torch.testing.assert_close(img, img_b, rtol=0, atol=1e-5)
    for name, a, b in zip(PARAMS, _grads(s, img, alpha), _grads(s, img_b, alpha_b)):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))


def test_background_and_alpha():
    _seed()
    s = random_scene(N=50, C=2, dtype=torch.float64)
    bg = torch.rand(2, 3, dtype=torch.float64)
    img0, a0, _ = rasterization_reference(**s, tile_size=1)
    img1, a1, _ = rasterization_reference(**s, tile_size=1, backgrounds=bg)
    torch.testing.assert_close(a0, a1)
    torch.testing.assert_close(img1, img0 + (1.0 - a0) * bg[:, None, None, :])
    assert (a0 >= 0).all() and (a0 <= 1).all()
    # an empty view: all background, alpha 0
    s2 = dict(s)
    s2["means"] = s["means"] + torch.tensor([0.0, 0.0, -100.0], dtype=torch.float64)
    img2, a2, meta2 = rasterization_reference(**s2, tile_size=1, backgrounds=bg)
    assert (meta2["radii"] == 0).all()
    torch.testing.assert_close(img2, bg[:, None, None, :].expand_as(img2))
    assert (a2 == 0).all()


def test_single_opaque_gaussian_alpha_is_one_minus_T():
    """Analytic check: one Gaussian, alpha = min(0.999, o exp(-sigma)), colour = alpha c + (1-alpha) bg."""
    dtype = torch.float64
    W, H = 9, 7
    K = torch.tensor([[20.0, 0, 4.5], [0, 20.0, 3.5], [0, 0, 1]], dtype=dtype)[None]
    vm = torch.eye(4, dtype=dtype)[None]
    means = torch.tensor([[0.0, 0.0, 2.0]], dtype=dtype)
    quats = torch.tensor([[1.0, 0, 0, 0]], dtype=dtype)
    scales = torch.full((1, 3), 0.1, dtype=dtype)
    opac = torch.tensor([0.7], dtype=dtype)
    col = torch.tensor([[1.0, 0.5, 0.25]], dtype=dtype)
    bg = torch.tensor([[0.1, 0.2, 0.3]], dtype=dtype)
    img, alpha, meta = rasterization_reference(means, quats, scales, opac, col, vm, K, W, H,
                                               tile_size=16, backgrounds=bg)
    var = (0.1 * 20.0 / 2.0) ** 2 + 0.3
    ys, xs = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing="ij")
    sig = 0.5 * ((xs + 0.5 - 4.5) ** 2 + (ys + 0.5 - 3.5) ** 2) / var
    a = torch.clamp(0.7 * torch.exp(-sig), max=0.999)
    a = torch.where(a >= 1 / 255, a, 0.0)
    torch.testing.assert_close(alpha[0, ..., 0], a)
    torch.testing.assert_close(img[0], a[..., None] * col[0] + (1 - a[..., None]) * bg[0])
    assert int(meta["radii"][0, 0]) == math.ceil(3 * math.sqrt(var + math.sqrt(0.01)))


def test_absgrad_matches_brute_force():
    _seed()
    s = _with_grad(random_scene(N=40, C=2, dtype=torch.float64))
    img, alpha, meta = rasterization_reference(**s, tile_size=4, absgrad=True)
    meta["means2d"].retain_grad()
    w = torch.rand(img.shape, dtype=img.dtype) - 0.5
    ((img * w).sum() + alpha.sum()).backward()
    absgrad_b = torch.zeros(2, 40, 2, dtype=torch.float64)
    img_b, alpha_b, m2d_b, _ = brute_rasterization(s, 4, absgrad_out=absgrad_b)
    ((img_b * w).sum() + alpha_b.sum()).backward()
    ag = meta["means2d"].absgrad
    assert ag.shape == (2, 40, 2)
    assert _rel(ag, absgrad_b) < 1e-4
    # absgrad dominates |grad| per component
    assert (ag + 1e-12 >= meta["means2d"].grad.abs()).all()


def test_tile_bounds_rule():
    means2d = torch.tensor([[[5.5, 5.5], [15.9, 0.2], [-3.0, 40.0], [31.0, 17.0]]])
    radii = torch.tensor([[2, 1, 5, 0]], dtype=torch.int32)
    lo, hi = isect_tile_bounds(means2d, radii, 4, tile_width=8, tile_height=5)
    # [m - r, m + r] / 4 -> floor / ceil, clamped to the grid
    assert lo[0, 0].tolist() == [0, 0] and hi[0, 0].tolist() == [2, 2]
    assert lo[0, 1].tolist() == [3, 0] and hi[0, 1].tolist() == [5, 1]
    assert lo[0, 2].tolist() == [0, 5] and hi[0, 2].tolist() == [1, 5]  # empty in y
    assert (hi[0, 3] - lo[0, 3]).prod() == 0  # radius 0 -> empty
    lo1, hi1 = isect_tile_bounds(means2d, radii, 1, tile_width=32, tile_height=20)
    assert lo1[0, 0].tolist() == [3, 3] and hi1[0, 0].tolist() == [8, 8]


def test_tile_size_one_is_a_subset_of_tile_16():
    """tile_size=1 only drops the faint tails outside the radius box."""
    _seed()
    s = random_scene(N=60, C=1, dtype=torch.float32)
    img1, a1, _ = rasterization_reference(**s, tile_size=1)
    img16, a16, _ = rasterization_reference(**s, tile_size=16)
    assert (a16 - a1).abs().max() < 0.05
    assert (img16 - img1).abs().mean() < 5e-3


def test_gradcheck_compositor():
    _seed()
    C, N, W, H = 1, 6, 10, 8
    dtype = torch.float64
    means2d = (torch.rand(C, N, 2, dtype=dtype) * torch.tensor([W, H], dtype=dtype)).requires_grad_(True)
    L = torch.rand(C, N, 2, 2, dtype=dtype) * 1.5 + torch.eye(2, dtype=dtype) * 1.5
    L = torch.tril(L)
    cov = L @ L.transpose(-1, -2)
    inv = torch.inverse(cov)
    conics = torch.stack([inv[..., 0, 0], inv[..., 0, 1], inv[..., 1, 1]], -1).requires_grad_(True)
    colors = torch.rand(C, N, 3, dtype=dtype, requires_grad=True)
    opac = (torch.rand(C, N, dtype=dtype) * 0.8 + 0.1).requires_grad_(True)
    radii = torch.full((C, N), 6, dtype=torch.int32)
    depths = torch.rand(C, N, dtype=dtype)
    bg = torch.rand(C, 3, dtype=dtype, requires_grad=True)

    def f(m, c, col, o, b):
        img, a = rasterize_to_pixels_reference(m, c, col, o, radii, depths, W, H, tile_size=4,
                                               backgrounds=b)
        return img, a

    assert torch.autograd.gradcheck(f, (means2d, conics, colors, opac, bg), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_full_pipeline():
    _seed()
    s = random_scene(N=5, C=1, W=12, H=10, dtype=torch.float64, scale_range=(0.2, 0.5), with_culled=False)
    s["opacities"] = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1
    keys = ("means", "quats", "scales", "opacities", "colors")
    args = [s[k].clone().requires_grad_(True) for k in keys]
    rest = {k: v for k, v in s.items() if k not in keys}

    def f(*xs):
        kw = dict(zip(keys, xs))
        img, a, _ = rasterization_reference(**kw, **rest, tile_size=1)
        return img, a

    assert torch.autograd.gradcheck(f, args, eps=1e-7, atol=1e-5, rtol=1e-3)


def test_meta_contents_and_errors():
    s = random_scene(N=30, C=2, dtype=torch.float32)
    img, alpha, meta = rasterization_reference(**s, tile_size=8)
    for k in ("means2d", "radii", "depths", "conics", "opacities", "width", "height", "tile_size",
              "n_cameras", "gaussian_ids", "camera_ids"):
        assert k in meta, k
    assert meta["means2d"].shape == (2, 30, 2) and meta["radii"].dtype == torch.int32
    assert meta["conics"].shape == (2, 30, 3) and meta["depths"].shape == (2, 30)
    assert meta["opacities"].shape == (2, 30)
    assert meta["gaussian_ids"] is None and meta["camera_ids"] is None
    assert meta["n_cameras"] == 2 and meta["tile_size"] == 8
    with pytest.raises(NotImplementedError):
        rasterization_reference(**s, packed=True)
    with pytest.raises(NotImplementedError):
        rasterization_reference(**s, camera_model="fisheye")
    with pytest.raises(ValueError):
        rasterization_reference(**s, render_mode="RGBD")
    # per-camera colours [C, N, D]
    s2 = dict(s)
    s2["colors"] = s["colors"][None].expand(2, -1, -1)
    img2, _, _ = rasterization_reference(**s2, tile_size=8)
    torch.testing.assert_close(img2, img)
