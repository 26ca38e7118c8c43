#!/usr/bin/env python
"""GPU check of the fused SSIM kernels (losses/fused_ssim.py, cuda/csrc/fused_ssim*) against the PyTorch reference.

1. Builds the extension (or loads it from torch's extension cache) and prints the time taken.
2. Accuracy on fresh random image pairs (uniform noise and smooth, natural-image-like pairs; odd sizes, B > 1,
   "same" and "valid" padding): relative error of the mean SSIM, relative L2 error of the SSIM map and of
   d(mean SSIM)/d(img1), all against the reference evaluated in float64. The float32 reference's own error is
   reported beside it for scale.
3. Timing of forward + backward (median over --iters after --warmup, torch.cuda.synchronize around each) for the
   fused kernels, the float32 reference and pytorch-msssim's ``ssim(..., data_range=1.0, size_average=True)``.

Criteria: forward rel err <= 1e-4, gradient rel err <= 1e-3 (every case), fused >= 5x faster than pytorch-msssim
on 1x3x800x800. Prints PASS/FAIL lines, writes JSON to --out, and exits 0 whatever the verdict (2 without CUDA).

Usage::

    python benchmarks/check_fused_ssim.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nerfstudio_splat_ext.losses.fused_ssim import _taps, fused_ssim, fused_ssim_extension  # noqa: E402
from nerfstudio_splat_ext.losses.ssim import ssim, ssim_map  # noqa: E402

FWD_TOL = 1e-4
GRAD_TOL = 1e-3
MIN_SPEEDUP_VS_MSSSIM = 5.0

Shape = Tuple[int, int, int, int]
ACCURACY_CASES: List[Tuple[Shape, str, bool]] = [
    ((1, 3, 800, 800), "same", False),
    ((1, 3, 800, 800), "same", True),
    ((1, 3, 800, 800), "valid", False),
    ((2, 3, 800, 800), "same", False),
    ((3, 3, 801, 799), "same", True),
    ((2, 3, 257, 333), "valid", False),
    ((1, 1, 13, 1001), "same", False),
]
TIMING_SHAPES: List[Shape] = [(1, 3, 800, 800), (4, 3, 800, 800), (1, 3, 1080, 1920)]


def random_pair(shape: Shape, smooth: bool, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    b, c, h, w = shape
    if smooth:
        low = torch.rand(b, c, max(h // 16, 2), max(w // 16, 2), device="cuda", generator=gen)
        x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        y = (0.9 * x + 0.1 * torch.rand(shape, device="cuda", generator=gen)).clamp(0, 1)
    else:
        x = torch.rand(shape, device="cuda", generator=gen)
        y = (0.7 * x + 0.3 * torch.rand(shape, device="cuda", generator=gen)).clamp(0, 1)
    return x, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def value_and_grad(fn: Callable, x: torch.Tensor, y: torch.Tensor, padding: str) -> Tuple[torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_(True)
    value = fn(xr, y, padding=padding)
    value.backward()
    return value.detach(), xr.grad


def accuracy(ext, gen: torch.Generator) -> List[Dict]:
    rows = []
    for shape, padding, smooth in ACCURACY_CASES:
        x, y = random_pair(shape, smooth, gen)
        s_f, g_f = value_and_grad(fused_ssim, x, y, padding)
        s_32, g_32 = value_and_grad(ssim, x, y, padding)
        s_64, g_64 = value_and_grad(ssim, x.double(), y.double(), padding)
        fused_map = ext.forward(x, y, list(_taps(1.5)), False)[0]
        map_64 = ssim_map(x.double(), y.double())
        row = {
            "shape": list(shape),
            "padding": padding,
            "images": "smooth" if smooth else "noise",
            "ssim": float(s_64),
            "fwd_rel_err": abs(float(s_f) - float(s_64)) / abs(float(s_64)),
            "map_rel_err": rel(fused_map, map_64),
            "grad_rel_err": rel(g_f, g_64),
            "grad_rel_err_vs_ref32": rel(g_f, g_32),
            "ref32_fwd_rel_err": abs(float(s_32) - float(s_64)) / abs(float(s_64)),
            "ref32_grad_rel_err": rel(g_32, g_64),
        }
        row["pass"] = max(row["fwd_rel_err"], row["map_rel_err"]) <= FWD_TOL and row["grad_rel_err"] <= GRAD_TOL
        rows.append(row)
        print(
            f"  {'x'.join(map(str, shape)):>14} {padding:5} {row['images']:6} SSIM {row['ssim']:.4f} | "
            f"fwd {row['fwd_rel_err']:.1e} map {row['map_rel_err']:.1e} grad {row['grad_rel_err']:.1e} | "
            f"fp32 ref: fwd {row['ref32_fwd_rel_err']:.1e} grad {row['ref32_grad_rel_err']:.1e} | "
            f"{'PASS' if row['pass'] else 'FAIL'}"
        )
    return rows


def median_ms(step: Callable[[], None], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def timing(shape: Shape, msssim: Optional[Callable], gen: torch.Generator, iters: int, warmup: int) -> Dict:
    x, y = random_pair(shape, False, gen)
    xr = x.clone().requires_grad_(True)
    impls: Dict[str, Callable] = {"fused": fused_ssim, "reference": ssim}
    if msssim is not None:
        impls["pytorch_msssim"] = lambda a, b: msssim(a, b, data_range=1.0, size_average=True)
    row: Dict = {"shape": list(shape)}
    for name, fn in impls.items():

        def fwd_bwd(fn=fn) -> None:
            xr.grad = None
            fn(xr, y).backward()

        def fwd(fn=fn) -> None:
            with torch.no_grad():
                fn(x, y)

        row[f"{name}_fwd_bwd_ms"] = median_ms(fwd_bwd, iters, warmup)
        row[f"{name}_fwd_ms"] = median_ms(fwd, iters, warmup)
    fused = row["fused_fwd_bwd_ms"]
    row["speedup_vs_reference"] = row["reference_fwd_bwd_ms"] / fused
    row["speedup_vs_pytorch_msssim"] = row["pytorch_msssim_fwd_bwd_ms"] / fused if msssim is not None else None
    vs_ms = row["speedup_vs_pytorch_msssim"]
    print(
        f"  {'x'.join(map(str, shape)):>14} fwd+bwd: fused {fused:.3f} ms, reference {row['reference_fwd_bwd_ms']:.3f} ms "
        f"({row['speedup_vs_reference']:.1f}x), pytorch-msssim "
        + (f"{row['pytorch_msssim_fwd_bwd_ms']:.3f} ms ({vs_ms:.1f}x)" if vs_ms is not None else "n/a")
        + f" | fwd only: fused {row['fused_fwd_ms']:.3f} ms, reference {row['reference_fwd_ms']:.3f} ms"
        + (f", pytorch-msssim {row['pytorch_msssim_fwd_ms']:.3f} ms" if vs_ms is not None else "")
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("fused_ssim_check.json"))
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2

    results: Dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "criteria": {}}
    t0 = time.perf_counter()
    ext = fused_ssim_extension()
    results["build_s"] = time.perf_counter() - t0
    results["build_ok"] = ext is not None
    print(f"extension build/load: {results['build_s']:.1f} s ({'ok' if ext is not None else 'FAILED'})")
    if ext is None:
        print("FAIL build: the fused SSIM extension is unavailable (see the warning above)")
        results["pass"] = False
        args.out.write_text(json.dumps(results, indent=2))
        return 0

    try:
        from pytorch_msssim import ssim as msssim
    except ImportError:
        msssim = None
        print("pytorch_msssim is not importable: its timings are recorded as null")

    gen = torch.Generator(device="cuda")
    results["seed"] = gen.seed()
    print(f"accuracy vs the float64 reference (seed {results['seed']}):")
    results["accuracy"] = accuracy(ext, gen)
    print(f"timing (median of {args.iters} after {args.warmup} warm-up):")
    results["timing"] = [timing(s, msssim, gen, args.iters, args.warmup) for s in TIMING_SHAPES]

    acc = results["accuracy"]
    main_speedup = results["timing"][0]["speedup_vs_pytorch_msssim"]
    criteria = {
        "forward_rel_err": (max(max(r["fwd_rel_err"], r["map_rel_err"]) for r in acc), FWD_TOL, "<="),
        "grad_rel_err": (max(r["grad_rel_err"] for r in acc), GRAD_TOL, "<="),
        "speedup_vs_pytorch_msssim_1x3x800x800": (main_speedup, MIN_SPEEDUP_VS_MSSSIM, ">="),
    }
    verdicts = []
    for name, (value, limit, op) in criteria.items():
        ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
        verdicts.append(ok)
        results["criteria"][name] = {"value": value, "limit": limit, "op": op, "pass": ok}
        shown = "n/a" if value is None else f"{value:.3g}"
        print(f"{'N/A ' if ok is None else 'PASS' if ok else 'FAIL'} {name}: {shown} (needs {op} {limit:g})")
    results["pass"] = all(v is not False for v in verdicts) and None not in verdicts
    print(f"{'PASS' if results['pass'] else 'FAIL'} overall")
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
