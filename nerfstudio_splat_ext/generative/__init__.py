"""Single-image-to-3D-Gaussians models (Splatter-Image-style teacher, diffusion student) and their data.

Only the data layer exists so far: :mod:`nerfstudio_splat_ext.generative.data`.
"""
