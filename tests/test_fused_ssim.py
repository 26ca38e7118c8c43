"""Fused SSIM: the CPU fallback, the backward derivation (a PyTorch model of the kernels' math), the config flag,
the CUDA build, and, where a GPU exists, the kernels against the reference on fresh random images."""

from __future__ import annotations

import importlib
from typing import List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from nerfstudio_splat_ext.cuda.jit import build_extension, cuda_toolkit_root
from nerfstudio_splat_ext.losses import fused_ssim
from nerfstudio_splat_ext.losses.photometric import PhotometricLossConfig
from nerfstudio_splat_ext.losses.ssim import SSIM_C1, SSIM_C2, _blur, _gaussian_taps, ssim, ssim_map

# import_module: the package attribute `losses.fused_ssim` is the function, not the module
fused_mod = importlib.import_module("nerfstudio_splat_ext.losses.fused_ssim")
photometric_mod = importlib.import_module("nerfstudio_splat_ext.losses.photometric")


def _random_pair(shape: Sequence[int], smooth: bool = False, device: str = "cpu", dtype=torch.float32, generator=None):
    """A correlated image pair in [0, 1]; `smooth` gives natural-image-like low-variance regions (where the
    variances are cancellation-prone differences of nearly equal moments)."""
    b, c, h, w = shape
    if smooth:
        low = torch.rand(b, c, max(h // 16, 2), max(w // 16, 2), device=device, generator=generator)
        x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    else:
        x = torch.rand(b, c, h, w, device=device, generator=generator)
    noise = torch.rand(b, c, h, w, device=device, generator=generator)
    y = (0.9 * x + 0.1 * noise if smooth else 0.7 * x + 0.3 * noise).clamp(0, 1)
    return x.to(dtype), y.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a w.r.t. b, in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ----------------------------------------------------------------------------------------------- CPU fallback
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("shape", [(1, 3, 32, 29), (2, 3, 17, 40)])
def test_cpu_fallback_equals_reference_exactly(monkeypatch, shape, padding):
    def no_extension():
        raise AssertionError("CPU tensors must not build or load the CUDA extension")

    monkeypatch.setattr(fused_mod, "fused_ssim_extension", no_extension)
    x, y = _random_pair(shape)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, ref = fused_ssim(x1, y, padding=padding), ssim(x2, y, padding=padding)
    assert ours.shape == ref.shape == ()
    assert torch.equal(ours, ref)
    ours.backward()
    ref.backward()
    assert x1.grad is not None and torch.isfinite(x1.grad).all() and x1.grad.abs().sum() > 0
    assert torch.equal(x1.grad, x2.grad)


def test_cpu_fallback_keeps_reference_options_and_errors():
    x, y = _random_pair((1, 2, 24, 24), dtype=torch.float64)
    assert torch.equal(fused_ssim(x, y, window_size=7, sigma=1.0), ssim(x, y, window_size=7, sigma=1.0))
    with pytest.raises(ValueError):
        fused_ssim(x, y[:, :1])


# ------------------------------------------- the kernels' math, modelled in PyTorch, through the autograd.Function
class _KernelModel:
    """What fused_ssim.cu computes, written with the reference's blur (float64 on CPU): forward returns the
    "same" SSIM map and the derivatives w.r.t. img1's blurred moments, backward blurs them back."""

    @staticmethod
    def forward(img1: torch.Tensor, img2: torch.Tensor, taps: List[float], with_grad: bool) -> List[torch.Tensor]:
        t = torch.tensor(taps, dtype=img1.dtype)
        mu1, mu2, e11, e22, e12 = (_blur(v, t, 5) for v in (img1, img2, img1 * img1, img2 * img2, img1 * img2))
        s11, s22, s12 = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
        a1, a2 = 2 * mu1 * mu2 + SSIM_C1, 2 * s12 + SSIM_C2
        b1, b2 = mu1 * mu1 + mu2 * mu2 + SSIM_C1, s11 + s22 + SSIM_C2
        s = a1 * a2 / (b1 * b2)
        if not with_grad:
            return [s, img1.new_empty(0)]
        ds_ds12 = 2 * a1 / (b1 * b2)
        ds_ds11 = -s / b2
        ds_dmu1 = 2 * mu2 * a2 / (b1 * b2) - 2 * mu1 * s / b1
        return [s, torch.stack([ds_dmu1 - 2 * mu1 * ds_ds11 - mu2 * ds_ds12, ds_ds11, ds_ds12])]

    @staticmethod
    def backward(img1, img2, dmaps, grad_out, taps: List[float], scale: float, border: int) -> torch.Tensor:
        t = torch.tensor(taps, dtype=img1.dtype)
        h, w = img1.shape[-2:]
        mask = torch.zeros(h, w, dtype=img1.dtype)
        mask[border : h - border, border : w - border] = 1.0
        b0, b1, b2 = (_blur(d * mask, t, 5) for d in dmaps)
        return grad_out * scale * (b0 + 2 * img1 * b1 + img2 * b2)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_kernel_derivation_matches_autograd(padding):
    x, y = _random_pair((2, 3, 23, 31), dtype=torch.float64)
    taps = tuple(_gaussian_taps(11, 1.5, torch.float64, "cpu").tolist())
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = fused_mod._FusedSSIM.apply(x1, y, taps, padding == "valid", _KernelModel)
    ref = ssim(x2, y, padding=padding)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    (3.0 * ours).backward()
    (3.0 * ref).backward()
    assert _rel(x1.grad, x2.grad) < 1e-10


# ---------------------------------------------------------------------------------------------- config flag
@pytest.mark.parametrize("use_fused", [True, False])
def test_config_flag_selects_ssim_implementation(monkeypatch, use_fused):
    calls: List[str] = []

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(photometric_mod, "fused_ssim", recording("fused", fused_ssim))
    monkeypatch.setattr(photometric_mod, "ssim", recording("reference", ssim))
    assert PhotometricLossConfig().fused_ssim is True
    loss_fn = PhotometricLossConfig(fused_ssim=use_fused).setup()
    pred = torch.rand(16, 20, 3, requires_grad=True)
    loss = loss_fn(pred, torch.rand(16, 20, 3))
    loss.backward()
    assert calls == ["fused" if use_fused else "reference"]
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_photometric_loss_paths_agree_on_cpu():
    pred, target = torch.rand(2, 24, 18, 3), torch.rand(2, 24, 18, 3)
    fused = PhotometricLossConfig(fused_ssim=True).setup()(pred, target)
    reference = PhotometricLossConfig(fused_ssim=False).setup()(pred, target)
    assert torch.equal(fused, reference)


# ---------------------------------------------------------------------------------------------- CUDA build
@pytest.mark.slow
def test_fused_ssim_extension_compiles(tmp_path, monkeypatch):
    """Builds the extension from source (sm_90 only, ~10 s on 2 cores); runs without a GPU, so compile errors
    show up in the CPU suite rather than on the GPU host."""
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: it cannot build CUDA extensions")
    if cuda_toolkit_root() is None:
        pytest.skip("no CUDA toolkit (nvcc and cuda_runtime.h) found: set CUDA_HOME to build the fused SSIM kernels")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    module = build_extension("splat_ext_fused_ssim_compile_check", fused_mod.EXTENSION_SOURCES, build_directory=tmp_path)
    assert callable(module.forward) and callable(module.backward)


# ------------------------------------------------------------------------------------- kernels on a GPU
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the fused kernels only run on the GPU (CPU uses the reference)"
)

GPU_CASES: List[Tuple[Tuple[int, int, int, int], str, bool]] = [
    ((1, 3, 800, 800), "same", False),
    ((1, 3, 800, 800), "same", True),
    ((2, 3, 800, 800), "same", False),
    ((1, 3, 800, 800), "valid", False),
    ((3, 3, 801, 799), "same", False),
    ((2, 3, 257, 333), "valid", True),
    ((1, 1, 11, 45), "valid", False),
    ((2, 3, 5, 7), "same", False),
]


@requires_cuda
@pytest.mark.parametrize("shape,padding,smooth", GPU_CASES)
def test_kernels_match_reference_on_gpu(shape, padding, smooth):
    assert fused_mod.fused_ssim_extension() is not None, "CUDA is available but the fused SSIM extension did not build"
    gen = torch.Generator(device="cuda")
    seed = gen.seed()  # fresh images every run; the seed is in the failure message
    x, y = _random_pair(shape, smooth=smooth, device="cuda", generator=gen)

    x1 = x.clone().requires_grad_(True)
    ours = fused_ssim(x1, y, padding=padding)
    assert "_FusedSSIM" in type(ours.grad_fn).__name__, "the kernels were not used"
    ours.backward()
    # the reference in float64 is the ground truth; the float32 reference would add its own rounding error
    x2 = x.double().requires_grad_(True)
    ref = ssim(x2, y.double(), padding=padding)
    ref.backward()

    fwd_rel = abs(ours.item() - ref.item()) / abs(ref.item())
    grad_rel = _rel(x1.grad, x2.grad)
    ext_map = fused_mod.fused_ssim_extension().forward(x, y, list(fused_mod._taps(1.5)), False)[0]
    map_rel = _rel(ext_map, ssim_map(x.double(), y.double()))
    info = f"seed={seed} shape={shape} padding={padding} smooth={smooth}: fwd {fwd_rel:.2e} map {map_rel:.2e} grad {grad_rel:.2e}"
    assert fwd_rel <= 1e-4 and map_rel <= 1e-4, info
    assert grad_rel <= 1e-3, info
    with torch.no_grad():
        assert abs(fused_ssim(x, y, padding=padding).item() - ours.item()) <= 1e-6 * abs(ours.item()), info


@requires_cuda
def test_gpu_falls_back_when_kernels_do_not_apply():
    x, y = _random_pair((1, 3, 40, 40), device="cuda")
    y.requires_grad_(True)
    assert "_FusedSSIM" not in type(fused_ssim(x, y).grad_fn).__name__  # img2 needs a gradient
    xd, yd = x.double(), y.detach().double()
    assert torch.equal(fused_ssim(xd, yd), ssim(xd, yd))  # float64
    assert torch.equal(fused_ssim(x, y.detach(), window_size=7), ssim(x, y.detach(), window_size=7))
