"""Work around slow CPU kernels in PyPI's CUDA builds of torch.

Measured on a 2-core machine with torch 2.11+cu130: until `torch.set_num_threads` changes the thread count once,
the reference rasterizer's forward + backward takes about 2 s for 10k Gaussians at 100x100; after a change (even
back to the same count) it takes about 0.08 s. OMP_NUM_THREADS set before start-up has the same effect, but
ns-train imports torch before any plugin code runs, so we re-apply the count here.
"""

from __future__ import annotations

import os

_applied = False


def reset_torch_cpu_threads() -> int:
    """Re-apply torch's intra-op thread count (once per process). Returns the count in use."""
    global _applied
    import torch

    n = torch.get_num_threads()
    if not _applied:
        wanted = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or n
        torch.set_num_threads(1 if wanted > 1 else 2)
        torch.set_num_threads(wanted)
        _applied = True
        n = wanted
    return n
