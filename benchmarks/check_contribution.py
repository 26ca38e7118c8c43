#!/usr/bin/env python
"""GPU check of the render loss contribution kernel (``nerfstudio_splat_ext/cuda/contribution.py``).

For several random scenes rendered with ``gsplat.rasterization(..., packed=False, tile_size=16)`` and a random
``dL/dC`` it runs the CUDA kernel and the PyTorch reference on the same ``meta`` tile lists and reports

* ``delta_rel``: ||delta_kernel - delta_ref|| / ||delta_ref|| (criterion: <= --tol, default 1e-3),
* ``weight_rel``: the same for ``weight_sum`` (criterion: <= --tol),
* informative: max |pixel_count diff|, number of Gaussians whose count differs, max |weight_sum diff| (the kernel
  keeps gsplat's float32 transmittance, the reference float64, so a pixel sitting on the T <= 1e-4 cut-off can
  take one Gaussian more or less),
* timings (CUDA events, median of --repeats after warm-up): the kernel, gsplat's rasterization forward + backward
  of the same scene, their ratio, and the reference.

Prints a table and PASS / FAIL per scene, writes JSON to ``--out``; exits 0 once every scene ran (2 without a CUDA
device or gsplat, 1 when the extension does not build).

Usage::

    python benchmarks/check_contribution.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

try:
    from nerfstudio_splat_ext.cuda.contribution import (
        load_contribution_extension,
        render_loss_contribution,
        render_loss_contribution_reference,
    )
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nerfstudio_splat_ext.cuda.contribution import (
        load_contribution_extension,
        render_loss_contribution,
        render_loss_contribution_reference,
    )

# (N, cameras, width, height): the reference needs ~n_isects * 256 pair evaluations, which bounds the sizes.
CASES = [
    (10_000, 1, 400, 400),
    (50_000, 2, 400, 400),
    (100_000, 1, 640, 640),
    (200_000, 1, 800, 800),
    (200_000, 2, 800, 600),
]


def make_scene(seed: int, n: int, n_cams: int, width: int, height: int, device: torch.device) -> Dict:
    """Gaussians in a ball of radius ~1.2 at depth ~4, mostly on screen; cameras side by side."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.randn(n, 3, generator=g) * 0.5).clamp(-1.4, 1.4)
    means[:, 2] += 4.0
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.004), math.log(0.05), generator=g))
    scales *= 1.0 if n < 10_000 else 0.6
    quats = torch.randn(n, 4, generator=g)
    opacities = torch.sigmoid(torch.randn(n, generator=g) * 1.5 + 0.5)
    colors = torch.rand(n, 3, generator=g)
    viewmats = torch.eye(4)[None].repeat(n_cams, 1, 1)
    viewmats[:, 0, 3] = torch.linspace(-0.25, 0.25, n_cams) if n_cams > 1 else 0.0
    f = 1.1 * width
    Ks = torch.tensor([[f, 0.0, width / 2 + 1.3], [0.0, f * 1.02, height / 2 - 0.7], [0.0, 0.0, 1.0]])
    Ks = Ks[None].repeat(n_cams, 1, 1)
    backgrounds = torch.rand(n_cams, 3, generator=g)
    grad = torch.randn(n_cams, height, width, 3, generator=g) * 1e-3
    out = dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmats,
               Ks=Ks, backgrounds=backgrounds, grad=grad)
    return {k: v.to(device).contiguous() for k, v in out.items()}


def cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(seed: int, n: int, n_cams: int, width: int, height: int, args) -> Dict:
    from gsplat import rasterization

    device = torch.device("cuda")
    s = make_scene(seed, n, n_cams, width, height, device)
    with torch.no_grad():
        _, _, meta = rasterization(s["means"], s["quats"], s["scales"], s["opacities"], s["colors"], s["viewmats"],
                                   s["Ks"], width, height, packed=False, tile_size=16, backgrounds=s["backgrounds"])
    inputs = (meta["means2d"], meta["conics"], meta["opacities"], s["colors"], s["backgrounds"], s["grad"],
              meta["isect_offsets"], meta["flatten_ids"], width, height, 16)

    dl, cnt, ws = render_loss_contribution(*inputs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rdl, rcnt, rws = render_loss_contribution_reference(*inputs)
    torch.cuda.synchronize()
    t_ref = time.perf_counter() - t0

    t_kernel = cuda_time_ms(lambda: render_loss_contribution(*inputs), args.repeats)

    leaves = {k: s[k].detach().clone().requires_grad_(True)
              for k in ("means", "quats", "scales", "opacities", "colors")}

    def fwd_bwd() -> None:
        img, _, _ = rasterization(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                                  leaves["colors"], s["viewmats"], s["Ks"], width, height, packed=False,
                                  tile_size=16, backgrounds=s["backgrounds"])
        (img * s["grad"]).sum().backward()

    t_gsplat = cuda_time_ms(fwd_bwd, args.repeats)

    count_diff = (cnt.long() - rcnt.long()).abs()
    row = {
        "seed": seed, "N": n, "C": n_cams, "W": width, "H": height,
        "n_isects": int(meta["flatten_ids"].numel()),
        "visible_gaussians": int((rcnt > 0).sum()),
        "composited_pairs": int(rcnt.long().sum()),
        "delta_rel": rel_err(dl, rdl),
        "weight_rel": rel_err(ws, rws),
        "count_max_abs_diff": int(count_diff.max()),
        "count_mismatched_gaussians": int((count_diff > 0).sum()),
        "weight_max_abs_diff": float((ws.double() - rws.double()).abs().max()),
        "delta_max_abs_diff": float((dl.double() - rdl.double()).abs().max()),
        "delta_max_abs": float(rdl.double().abs().max()),
        "kernel_ms": t_kernel,
        "gsplat_fwd_bwd_ms": t_gsplat,
        "kernel_over_gsplat_fwd_bwd": t_kernel / t_gsplat,
        "reference_ms": 1e3 * t_ref,
    }
    row["pass"] = row["delta_rel"] <= args.tol and row["weight_rel"] <= args.tol
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("contribution_check.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="the first two scenes only")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    try:
        import gsplat  # noqa: F401
    except ImportError:
        print("gsplat is not installed")
        return 2

    t0 = time.perf_counter()
    if load_contribution_extension() is None:
        print("FAIL: the contribution CUDA extension did not build")
        return 1
    t_build = time.perf_counter() - t0

    cases = CASES[:2] if args.quick else CASES
    rows: List[Dict] = []
    header = ("| N | C | WxH | isects | visible | delta rel | weight rel | count max diff (gaussians) | "
              "kernel ms | gsplat f+b ms | ratio | reference ms | pass |")
    print(f"device: {torch.cuda.get_device_name(0)}; extension load/build {t_build:.1f} s")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for i, (n, n_cams, w, h) in enumerate(cases):
        row = run_case(args.seed + i, n, n_cams, w, h, args)
        rows.append(row)
        print(f"| {n} | {n_cams} | {w}x{h} | {row['n_isects']} | {row['visible_gaussians']} | {row['delta_rel']:.2e} | "
              f"{row['weight_rel']:.2e} | {row['count_max_abs_diff']} ({row['count_mismatched_gaussians']}) | "
              f"{row['kernel_ms']:.3f} | {row['gsplat_fwd_bwd_ms']:.3f} | {row['kernel_over_gsplat_fwd_bwd']:.2f} | "
              f"{row['reference_ms']:.0f} | {'PASS' if row['pass'] else 'FAIL'} |", flush=True)
    ok = all(r["pass"] for r in rows)
    summary = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "gsplat": __import__("gsplat").__version__,
        "tolerance": args.tol,
        "extension_build_s": t_build,
        "pass": ok,
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"{'PASS' if ok else 'FAIL'}: delta_loss / weight_sum relative error <= {args.tol} on "
          f"{sum(r['pass'] for r in rows)}/{len(rows)} scenes; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
