"""SSIM with fused CUDA kernels (``cuda/csrc/fused_ssim*``): one launch for the forward, one for the backward.

``fused_ssim`` has the signature and result of :func:`nerfstudio_splat_ext.losses.ssim.ssim` and runs that
reference instead whenever the kernels do not apply: tensors not on CUDA, not float32, window size other than 11,
a gradient needed for ``img2``, too many images x channels for one grid, or the extension unavailable (no GPU,
no compiler, failed build, ``SPLAT_EXT_NO_CUDA_EXT=1``). ``padding="valid"`` runs in the kernels: the map is
computed with "same" padding (its interior is identical, those windows never touch the padding) and cropped, and
the backward masks the border pixels out of the mean.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from nerfstudio_splat_ext.cuda.jit import load_extension
from nerfstudio_splat_ext.losses.ssim import _gaussian_taps, ssim

EXTENSION_NAME = "splat_ext_fused_ssim"
EXTENSION_SOURCES = ("fused_ssim.cu", "fused_ssim_bind.cpp")
KERNEL_WINDOW = 11
_MAX_PLANES = 65535  # CUDA grid z limit, one block layer per image channel


def fused_ssim_extension() -> Optional[Any]:
    """The compiled extension (built on first use), or None when it is unavailable."""
    return load_extension(EXTENSION_NAME, EXTENSION_SOURCES)


@lru_cache(maxsize=8)
def _taps(sigma: float) -> Tuple[float, ...]:
    # The reference's own float32 taps, so both paths blur with identical weights.
    return tuple(_gaussian_taps(KERNEL_WINDOW, sigma, torch.float32, "cpu").tolist())


def kernel_applies(img1: torch.Tensor, img2: torch.Tensor, window_size: int = 11, padding: str = "same") -> bool:
    """Whether the fused kernels can compute this call (the extension itself is checked separately)."""
    if window_size != KERNEL_WINDOW or padding not in ("same", "valid"):
        return False
    if img1.dim() != 4 or img1.shape != img2.shape or img1.numel() == 0:
        return False  # the reference raises the proper error / returns its value
    if not img1.is_cuda or img2.device != img1.device:
        return False
    if img1.dtype != torch.float32 or img2.dtype != torch.float32:
        return False
    if img1.shape[0] * img1.shape[1] > _MAX_PLANES:
        return False
    if padding == "valid" and min(img1.shape[2], img1.shape[3]) < KERNEL_WINDOW:
        return False
    return not (img2.requires_grad and torch.is_grad_enabled())


class _FusedSSIM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, img1: torch.Tensor, img2: torch.Tensor, taps: Tuple[float, ...], valid: bool, ext: Any) -> torch.Tensor:
        with_grad = bool(ctx.needs_input_grad[0])
        ssim_map, dmaps = ext.forward(img1, img2, list(taps), with_grad)
        border = KERNEL_WINDOW // 2 if valid else 0
        if border:
            ssim_map = ssim_map[:, :, border:-border, border:-border]
        if with_grad:
            ctx.save_for_backward(img1, img2, dmaps)
            ctx.taps, ctx.border, ctx.ext, ctx.count = taps, border, ext, ssim_map.numel()
        return ssim_map.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None, None]:
        img1, img2, dmaps = ctx.saved_tensors
        grad1 = ctx.ext.backward(img1, img2, dmaps, grad_out, list(ctx.taps), 1.0 / ctx.count, ctx.border)
        return grad1, None, None, None, None


def fused_ssim(
    img1: torch.Tensor,
    img2: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    padding: Literal["same", "valid"] = "same",
) -> torch.Tensor:
    """Mean SSIM over batch, channels and pixels (a scalar), as :func:`~nerfstudio_splat_ext.losses.ssim.ssim`.

    Differentiable w.r.t. ``img1`` through the fused kernels; falls back to the reference (see the module
    docstring), which is also what CPU tensors always get.
    """
    if kernel_applies(img1, img2, window_size, padding):
        ext = fused_ssim_extension()
        if ext is not None:
            return _FusedSSIM.apply(img1.contiguous(), img2.contiguous(), _taps(float(sigma)), padding == "valid", ext)
    return ssim(img1, img2, window_size, sigma, padding)
