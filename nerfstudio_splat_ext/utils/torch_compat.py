"""Compatibility of nerfstudio checkpoints with torch >= 2.6 (`torch.load(weights_only=True)` by default)."""

from __future__ import annotations


def _numpy_checkpoint_globals() -> list:
    """The numpy types that nerfstudio checkpoints contain (scheduler states hold numpy float64 scalars)."""
    import numpy as np

    found = [np.dtype]
    # numpy 2 moved the pickling helper to numpy._core; numpy 1 has it in numpy.core.
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
            found.append(module.scalar)
        except (ImportError, AttributeError):
            continue
    # The per-dtype classes (numpy >= 1.25) that pickles of np.dtype objects reference.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                found.append(getattr(dtypes, name))
    return found


def allow_nerfstudio_checkpoints() -> bool:
    """Allow-list the numpy types of nerfstudio checkpoints for torch's safe unpickler. Returns True if applied."""
    try:
        import torch.serialization as serialization
    except Exception:  # torch missing or broken: nothing to patch, and the plugin must still import.
        return False
    add = getattr(serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 loads with weights_only=False by default.
        return False
    try:
        add(_numpy_checkpoint_globals())
    except Exception:
        return False
    return True
