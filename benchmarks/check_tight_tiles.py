#!/usr/bin/env python
"""GPU check: gsplat.rasterization vs rasterization_tight_tiles (render/tight_tiles.py), forward and backward.

For random scenes (and, with --load-config, the Gaussians of a trained splat-ext run seen from its training views)
both functions render the same inputs; the script reports

* max |image diff| and max |alpha diff| (criterion: <= --img-tol),
* gradient relative errors ||g_tight - g|| / ||g|| for means, quats, scales, opacities and colours
  (criterion: <= --grad-tol),
* the number of (tile, Gaussian) pairs each lists, and the median forward + backward time of each (CUDA events).

The two can differ only where a pair sits on the alpha >= 1/255 cut and float32 rounding (gsplat is built with
fast math) decides it differently; the bound itself is exact up to its ceil (tests/test_tight_tiles.py).
Exits 1 when a criterion fails, 2 without CUDA.

    python benchmarks/check_tight_tiles.py --out tight.json
    python benchmarks/check_tight_tiles.py --load-config outputs/lego/splat-ext/<run>/config.yml --out tight.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nerfstudio_splat_ext.render.tight_tiles import rasterization_tight_tiles  # noqa: E402

SH_C0 = 0.28209479177387814


def random_scene(n: int, size: int, seed: int) -> Tuple[Dict[str, torch.Tensor], List[Tuple]]:
    """n Gaussians in a unit ball seen from 8 cameras on a sphere; opacities and scales spread like a trained
    scene's (many faint and small ones, some opaque and large)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    means = torch.randn(n, 3, generator=g, device=dev) * 0.4
    leaves = {
        "means": means,
        "quats": torch.randn(n, 4, generator=g, device=dev),
        "scales": torch.exp(torch.randn(n, 3, generator=g, device=dev) * 0.8 - 5.0),
        "opacities": torch.sigmoid(torch.randn(n, generator=g, device=dev) * 2.5),
        "colors": torch.rand(n, 3, generator=g, device=dev),
    }
    views = []
    for i in range(8):
        ang = 2 * math.pi * i / 8
        eye = torch.tensor([3.0 * math.cos(ang), 3.0 * math.sin(ang), 1.0])
        forward = -eye / eye.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        w2c = torch.eye(4)
        w2c[:3, :3] = torch.stack([right, down, forward])
        w2c[:3, 3] = -w2c[:3, :3] @ eye
        f = 1.1 * size
        K = torch.tensor([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])
        views.append((w2c[None].to(dev), K[None].to(dev), size, size))
    return leaves, views


def trained_scene(config: Path) -> Tuple[Dict[str, torch.Tensor], List[Tuple], float]:
    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_splat_ext.models.splat_ext import camera_to_world_to_viewmat

    _, pipeline, _, _ = eval_setup(config, test_mode="test")
    model = pipeline.model
    p = model.gauss_params
    leaves = {
        "means": p["means"].detach().clone(),
        "quats": p["quats"].detach().clone(),
        "scales": torch.exp(p["scales"].detach()),
        "opacities": torch.sigmoid(p["opacities"].detach()).squeeze(-1),
        "colors": (SH_C0 * p["features_dc"].detach() + 0.5).clamp_min(0.0),
    }
    dataset = getattr(pipeline.datamanager, "train_dataset", None) or pipeline.datamanager.eval_dataset
    cameras = dataset.cameras.to(model.device)
    views = []
    for i in range(len(cameras)):
        cam = cameras[i : i + 1]
        views.append((camera_to_world_to_viewmat(cam.camera_to_worlds.float()), cam.get_intrinsics_matrices().float(),
                      int(cam.width.item()), int(cam.height.item())))
    return leaves, views, float(model._near_plane)


def render(fn, leaves, view, near_plane: float):
    from gsplat.rendering import rasterization

    viewmat, K, w, h = view
    inputs = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    fn = rasterization if fn == "gsplat" else rasterization_tight_tiles
    img, alpha, meta = fn(**inputs, viewmats=viewmat, Ks=K, width=w, height=h, packed=False, near_plane=near_plane,
                          far_plane=1e10)
    weights = torch.linspace(0.5, 1.5, img.numel(), device=img.device).reshape(img.shape)
    ((img * weights).sum() + alpha.sum()).backward()
    return img.detach(), alpha.detach(), {k: v.grad for k, v in inputs.items()}, int(meta["flatten_ids"].numel())


def time_ms(fn, leaves, views, near_plane: float, reps: int) -> float:
    """Median ms of forward + backward over `reps` renders cycling through the views."""
    for view in views[:3]:
        render(fn, leaves, view, near_plane)
    times = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        render(fn, leaves, views[r % len(views)], near_plane)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(torch.tensor(times).median())


def check(name: str, leaves, views, near_plane: float, reps: int) -> Dict:
    img_diff = alpha_diff = 0.0
    grad_rel: Dict[str, float] = {}
    pairs = [0, 0]
    for view in views[: min(len(views), 8)]:
        img, alpha, grads, n_pairs = render("gsplat", leaves, view, near_plane)
        img_t, alpha_t, grads_t, n_pairs_t = render("tight", leaves, view, near_plane)
        img_diff = max(img_diff, float((img_t - img).abs().max()))
        alpha_diff = max(alpha_diff, float((alpha_t - alpha).abs().max()))
        for k in grads:
            rel = float((grads_t[k] - grads[k]).norm() / grads[k].norm().clamp_min(1e-30))
            grad_rel[k] = max(grad_rel.get(k, 0.0), rel)
        pairs[0] += n_pairs
        pairs[1] += n_pairs_t
    return {
        "scene": name,
        "gaussians": int(leaves["means"].shape[0]),
        "size": f"{views[0][2]}x{views[0][3]}",
        "max_img_diff": img_diff,
        "max_alpha_diff": alpha_diff,
        "grad_rel": grad_rel,
        "tile_pairs_gsplat": pairs[0],
        "tile_pairs_tight": pairs[1],
        "ms_gsplat": time_ms("gsplat", leaves, views, near_plane, reps),
        "ms_tight": time_ms("tight", leaves, views, near_plane, reps),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, action="append", default=[],
                        help="config.yml of a trained splat-ext run (repeatable)")
    parser.add_argument("--gaussians", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--img-tol", type=float, default=5e-3,
                        help="one pair flipped at the 1/255 cut changes its pixel by up to about 1/255")
    parser.add_argument("--grad-tol", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2

    rows = []
    for i, n in enumerate(args.gaussians):
        leaves, views = random_scene(n, args.size, seed=i)
        rows.append(check(f"random {n}", leaves, views, 0.01, args.reps))
    for config in args.load_config:
        leaves, views, near_plane = trained_scene(config)
        rows.append(check(str(config.parent.parent.parent.name), leaves, views, near_plane, args.reps))

    ok = True
    print("| scene | Gaussians | size | max image diff | max alpha diff | max grad rel err | tile pairs gsplat -> "
          "tight | fwd+bwd ms gsplat -> tight |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        worst = max(r["grad_rel"].values())
        ok &= r["max_img_diff"] <= args.img_tol and r["max_alpha_diff"] <= args.img_tol and worst <= args.grad_tol
        print(f"| {r['scene']} | {r['gaussians']} | {r['size']} | {r['max_img_diff']:.2e} | {r['max_alpha_diff']:.2e} | "
              f"{worst:.2e} | {r['tile_pairs_gsplat']:,} -> {r['tile_pairs_tight']:,} "
              f"({r['tile_pairs_tight'] / max(r['tile_pairs_gsplat'], 1):.2f}x) | {r['ms_gsplat']:.2f} -> "
              f"{r['ms_tight']:.2f} ({r['ms_tight'] / r['ms_gsplat']:.2f}x) |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "img_tol": args.img_tol, "grad_tol": args.grad_tol,
                                        "device": torch.cuda.get_device_name(), "pass": ok}, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
