"""Single-image-to-3D-Gaussians models and their data.

* :mod:`.data`: procedural objects, loaders of public layouts, the multi-object datamanager;
* :mod:`.pixel_gaussians`: canonical per-pixel Gaussian maps (decode to 3D Gaussians, render);
* :mod:`.networks`: the U-Net shared by the teacher and the student's denoiser;
* :mod:`.diffusion`: the student's noise schedule, DDIM and denoiser;
* :mod:`.pipeline`: the nerfstudio pipeline that trains on object batches and evaluates held-out objects;
* :mod:`.infer`: ``splat-ext-image-to-3d``.

The nerfstudio models are ``models/splat_ext_image.py`` (teacher) and ``models/splat_ext_diffusion.py`` (student).
"""
