"""Build (first run) or load (later runs) the CUDA extensions a splat-ext run uses, and time each: gsplat's backend,
our fused SSIM and our contribution kernel.

    python benchmarks/warm_extensions.py            # build into the torch extension cache, print seconds per extension
    python benchmarks/warm_extensions.py --json x   # also write the timings

Run it twice on a fresh GPU host: the first run is the one-off build, the second is what every training process
pays to load the cached builds (part of the time outside the training loop).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    timings = {}
    t0 = time.perf_counter()
    import torch

    timings["import_torch"] = time.perf_counter() - t0
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to build (the PyTorch references are used on this machine)")
    t0 = time.perf_counter()
    torch.zeros(1, device="cuda")
    timings["cuda_init"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from gsplat.cuda._backend import _C

    assert _C is not None, "gsplat's CUDA backend did not build"
    timings["gsplat_backend"] = time.perf_counter() - t0

    from nerfstudio_splat_ext.cuda.contribution import load_contribution_extension
    from nerfstudio_splat_ext.losses.fused_ssim import fused_ssim_extension

    for name, load in (("fused_ssim", fused_ssim_extension), ("contribution", load_contribution_extension)):
        t0 = time.perf_counter()
        if load() is None:
            raise SystemExit(f"our {name} extension did not build (see the warning above)")
        timings[name] = time.perf_counter() - t0
    print(" | ".join(f"{k} {v:.2f} s" for k, v in timings.items()), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
