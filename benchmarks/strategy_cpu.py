"""Density-control strategies side by side on the CPU: lego at 100x100, the 3DGS schedule compressed to --steps.

For each seed, trains `splat-ext` with the adc strategy, then the contribution strategy capped at --cap-fraction of
adc's final Gaussian count (with --gradient-gated also without filling its budget), and reports ns-eval's test
PSNR / SSIM and the counts:

    python benchmarks/strategy_cpu.py --data ../shared/data/nerf_synthetic_lego --out-dir /tmp/strategy_cpu --seeds 0 1

--refine-every: the 30k-step schedule refines 145 times; compressed to 1500 steps with the 3DGS interval of 100
steps it refines only 8 times, and a strategy regrowing after the prune at the first refinement then spends half
of the densification far below its budget. 50 (16 refinements) is the default here.
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


def train_and_eval(name: str, data: Path, out: Path, steps: int, flags: list, num_random: int,
                   seed: int = 42) -> dict:
    cmd = [str(BIN / "ns-train"), "splat-ext", "--data", str(data), "--output-dir", str(out), "--experiment-name",
           "cpu", "--timestamp", name, *short_schedule_flags(steps, num_random=num_random), "--machine.device-type", "cpu",
           "--vis", "tensorboard", "--steps-per-eval-image", str(10 * steps), "--steps-per-eval-all-images",
           str(10 * steps), "--steps-per-save", str(steps), "--pipeline.datamanager.camera-res-scale-factor", "0.125",
           "--machine.seed", str(seed), *flags]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.time() - t0
    metrics = out / f"eval-{name}.json"
    subprocess.run([str(BIN / "ns-eval"), "--load-config", str(out / "cpu" / "splat-ext" / name / "config.yml"),
                    "--output-path", str(metrics)], check=True, capture_output=True, text=True)
    results = json.loads(metrics.read_text())["results"]
    row = {"variant": name, "seed": seed, "psnr": results["psnr"], "ssim": results["ssim"],
           "num_gaussians": int(results["num_gaussians"]), "train_wall_s": wall, "flags": flags}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--cap-fraction", type=float, default=0.6)
    parser.add_argument("--num-random", type=int, default=5000, help="initial random points")
    parser.add_argument("--refine-every", type=int, default=50, help="refinement interval in steps (see above)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--gradient-gated", action="store_true",
                        help="also run the contribution strategy without fill_budget")
    parser.add_argument("--variants", nargs="+", choices=["capped", "thin"], default=["capped"],
                        help="capped: the contribution strategy capped at --cap-fraction of adc's count all run; thin: "
                        "capped at adc's count, then thinned to --cap-fraction of it after densification")
    parser.add_argument("--thin-window", type=int, default=100, help="steps of the thinning window")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common = ["--pipeline.model.strategy.refine-every", str(args.refine_every)]
    rows = []
    for seed in args.seeds:
        adc = train_and_eval(f"adc-s{seed}", args.data, args.out_dir, args.steps, common, args.num_random, seed)
        rows.append(adc)
        cap = int(args.cap_fraction * adc["num_gaussians"])
        contribution = [*common, "--pipeline.model.strategy.kind", "contribution",
                        "--pipeline.model.strategy.max-gaussians", str(cap)]
        fills = ((True, False) if args.gradient_gated else (True,)) if "capped" in args.variants else ()
        for fill in fills:
            name = ("contribution" if fill else "contribution-gradient-gated") + f"-s{seed}"
            rows.append(train_and_eval(name, args.data, args.out_dir, args.steps,
                                       [*contribution, "--pipeline.model.strategy.fill-budget", str(fill)],
                                       args.num_random, seed))
        if "thin" in args.variants:
            thin = [*common, "--pipeline.model.strategy.kind", "contribution",
                    "--pipeline.model.strategy.max-gaussians", str(adc["num_gaussians"]),
                    "--pipeline.model.strategy.final-gaussians", str(cap),
                    "--pipeline.model.strategy.thin-window", str(args.thin_window)]
            rows.append(train_and_eval(f"contribution-thin-s{seed}", args.data, args.out_dir, args.steps, thin,
                                       args.num_random, seed))
    (args.out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    print("| variant | seed | test PSNR | SSIM | Gaussians | train wall |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['num_gaussians']:,} "
              f"| {r['train_wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
