"""Density-control strategies side by side on the CPU: lego at 100x100, the 3DGS schedule compressed to --steps.

Trains `splat-ext` with the adc strategy, then the contribution strategy (with and without filling its budget)
capped at --cap-fraction of adc's final Gaussian count, and reports ns-eval's test PSNR / SSIM and the counts:

    python benchmarks/strategy_cpu.py --data ../shared/data/nerf_synthetic_lego --out-dir /tmp/strategy_cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from nerfstudio_splat_ext.method_configs import short_schedule_flags

BIN = Path(sys.executable).parent


def train_and_eval(name: str, data: Path, out: Path, steps: int, flags: list, num_random: int) -> dict:
    cmd = [str(BIN / "ns-train"), "splat-ext", "--data", str(data), "--output-dir", str(out), "--experiment-name",
           "cpu", "--timestamp", name, *short_schedule_flags(steps, num_random=num_random), "--machine.device-type", "cpu",
           "--vis", "tensorboard", "--steps-per-eval-image", str(10 * steps), "--steps-per-eval-all-images",
           str(10 * steps), "--steps-per-save", str(steps), "--pipeline.datamanager.camera-res-scale-factor", "0.125",
           *flags]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.time() - t0
    metrics = out / f"eval-{name}.json"
    subprocess.run([str(BIN / "ns-eval"), "--load-config", str(out / "cpu" / "splat-ext" / name / "config.yml"),
                    "--output-path", str(metrics)], check=True, capture_output=True, text=True)
    results = json.loads(metrics.read_text())["results"]
    row = {"variant": name, "psnr": results["psnr"], "ssim": results["ssim"],
           "num_gaussians": int(results["num_gaussians"]), "train_wall_s": wall, "flags": flags}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--cap-fraction", type=float, default=0.6)
    parser.add_argument("--num-random", type=int, default=5000,
                        help="initial random points (below the contribution cap, so that only growth is compared)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [train_and_eval("adc", args.data, args.out_dir, args.steps, [], args.num_random)]
    cap = int(args.cap_fraction * rows[0]["num_gaussians"])
    contribution = ["--pipeline.model.strategy.kind", "contribution", "--pipeline.model.strategy.max-gaussians", str(cap)]
    for fill in (True, False):
        name = "contribution-fill" if fill else "contribution-gradient-gated"
        rows.append(train_and_eval(name, args.data, args.out_dir, args.steps,
                                   [*contribution, "--pipeline.model.strategy.fill-budget", str(fill)], args.num_random))
    (args.out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    print("| variant | test PSNR | SSIM | Gaussians | train wall |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['num_gaussians']:,} | {r['train_wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
