"""Diffusion over canonical Gaussian maps (the `splat-ext-diffusion` student, after "A Lesson in Splats", ICCV 2025):
the noise schedule and DDIM sampler (:mod:`.schedule`) and the image-conditioned denoiser (:mod:`.denoiser`)."""

from nerfstudio_splat_ext.generative.diffusion.denoiser import GaussianMapDenoiser, fit_base_width
from nerfstudio_splat_ext.generative.diffusion.schedule import DiffusionSchedule, ddim_timesteps

__all__ = ["DiffusionSchedule", "GaussianMapDenoiser", "ddim_timesteps", "fit_base_width"]
