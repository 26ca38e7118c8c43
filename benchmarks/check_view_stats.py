#!/usr/bin/env python
"""GPU check: the per-view densification statistics kernel (cuda/csrc/view_stats.cu) against its PyTorch reference
(cuda/view_stats.py) on fresh random inputs, and the wall time per call of each as a training step pays it (kernel
launches included, one synchronisation after all calls). The statistics are not differentiated: there is no
backward pass to compare. Exits 1 when the relative error exceeds --tol, 2 without CUDA or the extension.

    python benchmarks/check_view_stats.py --out view_stats.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nerfstudio_splat_ext.cuda.contribution import load_contribution_extension  # noqa: E402
from nerfstudio_splat_ext.cuda.view_stats import accumulate_view_stats, accumulate_view_stats_reference  # noqa: E402


def inputs(C: int, N: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    radii = (torch.randint(0, 60, (C, N), generator=g, device="cuda") *
             (torch.rand(C, N, generator=g, device="cuda") > 0.3)).to(torch.int32)
    grads = torch.randn(C, N, 2, generator=g, device="cuda") * 1e-4 * (radii > 0)[..., None]
    start = [torch.rand(N, generator=g, device="cuda") for _ in range(3)]
    return grads, radii, start


def per_call_ms(fn, grads, radii, start, calls: int) -> float:
    outs = [t.clone() for t in start]
    fn(grads, radii, 400.0, 400.0, 1 / 800, *outs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(grads, radii, 400.0, 400.0, 1 / 800, *outs)
    torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, nargs="+", default=[1000, 170_000, 600_000])
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() or load_contribution_extension() is None:
        print("no CUDA device or no extension: nothing to check")
        return 2
    rows, ok = [], True
    for i, n in enumerate(args.gaussians):
        grads, radii, start = inputs(args.cameras, n, seed=i)
        kernel = [t.clone() for t in start]
        reference = [t.clone() for t in start]
        for _ in range(3):  # accumulation over several views
            accumulate_view_stats(grads, radii, 400.0 * args.cameras, 300.0 * args.cameras, 1 / 800, *kernel)
            accumulate_view_stats_reference(grads, radii, 400.0 * args.cameras, 300.0 * args.cameras, 1 / 800,
                                            *reference)
        errors = {name: float((k - r).norm() / r.norm().clamp_min(1e-30))
                  for name, k, r in zip(("grad2d", "count", "max_radii2d"), kernel, reference)}
        row = {"gaussians": n, "cameras": args.cameras, "rel_err": errors,
               "ms_kernel": per_call_ms(accumulate_view_stats, grads, radii, start, args.calls),
               "ms_reference": per_call_ms(accumulate_view_stats_reference, grads, radii, start, args.calls)}
        ok &= max(errors.values()) <= args.tol
        rows.append(row)
        print(f"| {n} | {max(errors.values()):.1e} | {row['ms_kernel']:.3f} | {row['ms_reference']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "tol": args.tol, "device": torch.cuda.get_device_name(),
                                        "pass": ok}, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
