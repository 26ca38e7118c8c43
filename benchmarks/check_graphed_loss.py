#!/usr/bin/env python
"""GPU check: splat-ext's photometric loss replayed from a CUDA graph (losses/graphed.py) against the eager loss, on
fresh random images of training sizes, and the wall time per training call of each (loss forward + backward,
launches included, one synchronisation after all calls). Exits 1 when a relative error exceeds --tol, 2 without
CUDA. (At `90281ed` it also timed a GPU neighbour search of the initial scales, since removed: BENCHMARKS.md
00000000000000000.)

    python benchmarks/check_graphed_loss.py --out graphed_loss.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nerfstudio_splat_ext.losses.photometric import PhotometricLossConfig  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def loss_and_grad(loss_fn, pred, target):
    pred = pred.detach().clone().requires_grad_()
    loss = loss_fn(pred, target)
    loss.backward()
    return loss.detach(), pred.grad


def per_call_ms(loss_fn, pred, target, calls: int) -> float:
    pred = pred.detach().clone().requires_grad_()
    for _ in range(3):
        loss_fn(pred, target).backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        loss_fn(pred, target).backward()
    torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["540x960", "800x800"])
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    graphed = PhotometricLossConfig().setup()
    eager = PhotometricLossConfig(cuda_graph=False).setup()
    rows, ok = [], True
    print("| image | loss rel. error | gradient rel. error | eager ms/call | graphed ms/call |")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        errors = {"loss": 0.0, "grad": 0.0}
        for _ in range(5):  # fresh images every call: the static buffers must be refilled
            pred, target = torch.rand(h, w, 3, device="cuda"), torch.rand(h, w, 3, device="cuda")
            lg, gg = loss_and_grad(graphed, pred, target)
            le, ge = loss_and_grad(eager, pred, target)
            errors = {"loss": max(errors["loss"], rel(lg, le)), "grad": max(errors["grad"], rel(gg, ge))}
        row = {"image": size, "rel_err": errors,
               "ms_eager": per_call_ms(eager, pred, target, args.calls),
               "ms_graphed": per_call_ms(graphed, pred, target, args.calls)}
        ok &= max(errors.values()) <= args.tol
        rows.append(row)
        print(f"| {size} | {errors['loss']:.1e} | {errors['grad']:.1e} | {row['ms_eager']:.3f} | {row['ms_graphed']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"loss": rows, "tol": args.tol,
                                        "device": torch.cuda.get_device_name(), "pass": ok}, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
