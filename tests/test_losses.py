"""Our SSIM / photometric loss against independent implementations, on fresh random images."""

import pytest
import torch
import torch.nn.functional as F

from nerfstudio_splat_ext.losses.photometric import PhotometricLossConfig
from nerfstudio_splat_ext.losses.ssim import SSIM_C1, SSIM_C2, ssim, ssim_map


def _random_pair(b=2, c=3, h=48, w=40):
    x = torch.rand(b, c, h, w, dtype=torch.float64)
    # correlated second image, so SSIM is far from both 0 and 1
    y = (0.7 * x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    return x, y


def _ssim_2d_window(x, y, padding):
    """Independent formulation: one full 11x11 Gaussian window (outer product), one conv per statistic."""
    coords = torch.arange(11, dtype=x.dtype) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 11, 11)
    pad = 5 if padding == "same" else 0

    def filt(t):
        return F.conv2d(t, win, padding=pad, groups=x.shape[1])

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + SSIM_C1) * (2 * sxy + SSIM_C2)) / ((mu_x**2 + mu_y**2 + SSIM_C1) * (sxx + syy + SSIM_C2))


def test_ssim_matches_pytorch_msssim():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x, y = _random_pair()
    ours = ssim(x, y, padding="valid")
    theirs = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-8), (ours.item(), theirs.item())


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_ssim_map_matches_full_window_convolution(padding):
    x, y = _random_pair(b=1, h=37, w=29)
    ours = ssim_map(x, y, padding=padding)
    ref = _ssim_2d_window(x, y, padding)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-10)


def test_ssim_gradient_matches_independent_implementation():
    x, y = _random_pair(b=1, h=24, w=24)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(ssim(x1, y), x1)
    (g2,) = torch.autograd.grad(_ssim_2d_window(x2, y, "same").mean(), x2)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_ssim_identity_and_range():
    x, y = _random_pair()
    assert torch.isclose(ssim(x, x), torch.tensor(1.0, dtype=x.dtype))
    value = ssim(x, y).item()
    assert 0.0 < value < 1.0


def test_photometric_loss_is_weighted_l1_plus_dssim():
    pred = torch.rand(32, 32, 3)
    target = torch.rand(32, 32, 3)
    loss_fn = PhotometricLossConfig(ssim_lambda=0.2).setup()
    l1 = (pred - target).abs().mean()
    d_ssim = 1 - ssim(pred.permute(2, 0, 1)[None], target.permute(2, 0, 1)[None])
    assert torch.isclose(loss_fn(pred, target), 0.8 * l1 + 0.2 * d_ssim)
    assert loss_fn(target, target).item() == pytest.approx(0.0, abs=1e-6)


def _loss_and_grad(loss_fn, pred, target):
    pred = pred.detach().clone().requires_grad_()
    loss = loss_fn(pred, target)
    loss.backward()
    return loss.detach(), pred.grad


def test_graphed_loss_is_the_eager_loss_off_the_gpu():
    """On CPU tensors (and without gradients) the graphed front runs the eager loss and captures nothing."""
    graphed = PhotometricLossConfig().setup()
    eager = PhotometricLossConfig(cuda_graph=False).setup()
    pred, target = torch.rand(24, 20, 3), torch.rand(24, 20, 3)
    loss_g, grad_g = _loss_and_grad(graphed, pred, target)
    loss_e, grad_e = _loss_and_grad(eager, pred, target)
    assert torch.equal(loss_g, loss_e) and torch.equal(grad_g, grad_e)
    with torch.no_grad():
        assert torch.equal(graphed(pred, target), eager(pred, target))
    assert graphed.graphed.captures == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_loss_matches_the_eager_loss_on_the_gpu():
    """Loss and gradient of the replayed graph equal the eager loss's on fresh images every call (so the static
    buffers really are refilled), for two image sizes, with a non-contiguous prediction and a scaled backward."""
    graphed = PhotometricLossConfig().setup()
    eager = PhotometricLossConfig(cuda_graph=False).setup()
    for h, w in ((64, 96), (64, 96), (40, 56), (64, 96)):
        pred = torch.rand(3, h, w, device="cuda").permute(1, 2, 0)  # [H,W,3], not contiguous
        target = torch.rand(h, w, 3, device="cuda")
        loss_g, grad_g = _loss_and_grad(lambda p, t: 3.0 * graphed(p, t), pred, target)
        loss_e, grad_e = _loss_and_grad(lambda p, t: 3.0 * eager(p, t), pred, target)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_g, grad_e, rtol=1e-5, atol=1e-9)
    assert graphed.graphed.captures == 2 and graphed.graphed.disabled is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_loss_falls_back_to_eager_past_max_graphs():
    from nerfstudio_splat_ext.losses.graphed import GraphedLoss

    eager = PhotometricLossConfig(cuda_graph=False).setup()
    graphed = GraphedLoss(eager, max_graphs=1)
    small = torch.rand(16, 20, 3, device="cuda"), torch.rand(16, 20, 3, device="cuda")
    large = torch.rand(24, 20, 3, device="cuda"), torch.rand(24, 20, 3, device="cuda")
    _loss_and_grad(graphed, *small)
    assert graphed.captures == 1
    with pytest.warns(UserWarning, match="more than 1 sizes"):
        loss_g, grad_g = _loss_and_grad(graphed, *large)
    loss_e, grad_e = _loss_and_grad(eager, *large)
    assert torch.equal(loss_g, loss_e) and torch.equal(grad_g, grad_e)
    assert graphed.disabled is not None and not graphed.graphs
