"""Networks of the generative models: the U-Net shared by the teacher (image -> Gaussian map) and the diffusion
student (noisy Gaussian map + timestep -> denoised map)."""

from nerfstudio_splat_ext.generative.networks.unet import UNet, count_parameters

__all__ = ["UNet", "count_parameters"]
