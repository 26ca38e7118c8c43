"""JIT build of our CUDA extensions with ``torch.utils.cpp_extension.load``, cached per process and on disk.

A failed build must not stop training: :func:`load_extension` then returns ``None`` after one warning line and
the caller falls back to its PyTorch reference. Set ``SPLAT_EXT_NO_CUDA_EXT=1`` to force the references.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

CSRC_DIR = Path(__file__).resolve().parent / "csrc"

# name -> module, or None when the build failed (so it is tried once per process).
_LOADED: Dict[str, Optional[object]] = {}


def cuda_extensions_disabled() -> bool:
    return os.environ.get("SPLAT_EXT_NO_CUDA_EXT", "0") not in ("", "0")


def load_extension(name: str, sources: Sequence[str], extra_cuda_cflags: Sequence[str] = ()) -> Optional[object]:
    """Compile (first call) or load from torch's extension cache the extension `name` built from `sources`
    (file names under ``cuda/csrc``). Returns the module, or ``None`` when CUDA is unavailable or the build fails."""
    if name in _LOADED:
        return _LOADED[name]
    module = None
    if cuda_extensions_disabled():
        _LOADED[name] = None
        return None
    if not torch.cuda.is_available():
        _LOADED[name] = None
        return None
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name=name,
            sources=[str(CSRC_DIR / s) for s in sources],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math", *extra_cuda_cflags],
            verbose=os.environ.get("SPLAT_EXT_VERBOSE_BUILD", "0") not in ("", "0"),
        )
    except Exception as err:  # noqa: BLE001 - any build failure means: use the reference
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"nerfstudio-splat-ext: CUDA extension '{name}' unavailable ({first_line}); using the PyTorch reference")
        module = None
    _LOADED[name] = module
    return module
