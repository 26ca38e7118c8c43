"""JIT build of our CUDA extensions with ``torch.utils.cpp_extension.load``, cached per process and on disk.

A failed build must not stop training: :func:`load_extension` then returns ``None`` after one warning line and
the caller falls back to its PyTorch reference. Set ``SPLAT_EXT_NO_CUDA_EXT=1`` to force the references.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch

CSRC_DIR = Path(__file__).resolve().parent / "csrc"

# name -> module, or None when the build failed (so it is tried once per process).
_LOADED: Dict[str, Optional[object]] = {}


def cuda_extensions_disabled() -> bool:
    return os.environ.get("SPLAT_EXT_NO_CUDA_EXT", "0") not in ("", "0")


def cuda_toolkit_root() -> Optional[str]:
    """The CUDA toolkit to build with: CUDA_HOME / CUDA_PATH, torch's guess, the toolkit behind ``nvcc`` on the PATH,
    /usr/local/cuda; the first holding both bin/nvcc and include/cuda_runtime.h. torch guesses the parent of the
    folder of ``nvcc``, which is wrong when ``nvcc`` is a wrapper script (e.g. /usr/local/bin/nvcc)."""
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return root
    return None


def build_extension(name: str, sources: Sequence[str], build_directory: Optional[Union[str, Path]] = None,
                    extra_cuda_cflags: Sequence[str] = ()) -> object:
    """Compile (or load from cache) the extension ``name`` from ``sources`` (file names under ``cuda/csrc``) with
    the toolkit of :func:`cuda_toolkit_root`. Needs no GPU; raises when there is no toolkit or the build fails."""
    from torch.utils import cpp_extension

    root = cuda_toolkit_root()
    if root is None:
        raise RuntimeError("no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) found: set CUDA_HOME")
    cpp_extension.CUDA_HOME = root
    return cpp_extension.load(
        name=name,
        sources=[str(CSRC_DIR / s) for s in sources],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math", *extra_cuda_cflags],
        build_directory=None if build_directory is None else str(build_directory),
        verbose=os.environ.get("SPLAT_EXT_VERBOSE_BUILD", "0") not in ("", "0"),
    )


def load_extension(name: str, sources: Sequence[str], extra_cuda_cflags: Sequence[str] = ()) -> Optional[object]:
    """Compile (first call) or load from torch's extension cache the extension `name` built from `sources`
    (file names under ``cuda/csrc``). Returns the module, or ``None`` when CUDA is unavailable or the build fails."""
    if name in _LOADED:
        return _LOADED[name]
    module = None
    if cuda_extensions_disabled() or not torch.cuda.is_available():
        _LOADED[name] = None
        return None
    try:
        module = build_extension(name, sources, extra_cuda_cflags=extra_cuda_cflags)
    except Exception as err:  # noqa: BLE001 - any build failure means: use the reference
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"nerfstudio-splat-ext: CUDA extension '{name}' unavailable ({first_line}); using the PyTorch reference")
        module = None
    _LOADED[name] = module
    return module
