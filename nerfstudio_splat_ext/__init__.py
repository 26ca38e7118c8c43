"""nerfstudio-splat-ext: Gaussian splatting methods for nerfstudio.

Importing the package must stay cheap and must never fail: nerfstudio imports every registered plugin for every
`ns-*` command, so heavy modules (gsplat, the model, CUDA builds) are imported lazily where they are used.
"""

__version__ = "0.1.0"

from nerfstudio_splat_ext.utils.torch_compat import allow_nerfstudio_checkpoints as _allow_ckpts

# ns-eval, ns-viewer, ns-export and resume call torch.load with torch's default weights_only=True (torch >= 2.6),
# which rejects the numpy scalars that nerfstudio's schedulers store. Loading our config from a run's config.yml
# imports this package first, so registering the types here fixes every entry point without an environment variable.
_allow_ckpts()
