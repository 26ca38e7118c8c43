"""Train splat-ext-nerf, nerfstudio's vanilla-nerf and splat-ext on one dataset for the same wall-clock budget of
training steps (set-up excluded), one after the other, then evaluate all with the same code (bench_splat.evaluate)
and write a markdown table: test PSNR / SSIM, training rays per second, steps, wall time.

    python benchmarks/bench_nerf.py --data ../shared/data/nerf_synthetic_lego --budget-s 540 --out-dir bench/nerf

With --gpus 0 1 2 the methods train (and are evaluated) at the same time, each alone on its own GPU, so the
benchmark takes one budget of wall-clock time instead of three.

Rays per second: steps x rays per step / seconds of training steps; for splat-ext a step renders one whole image,
so its rays per step are that image's pixels. All methods read the data through splat-ext-data.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_splat import evaluate, evaluate_in_child, train, train_methods, write_results  # noqa: E402

METHODS: Dict[str, List[str]] = {
    "splat-ext-nerf": ["splat-ext-nerf"],
    "vanilla-nerf": ["vanilla-nerf"],
    "splat-ext": ["splat-ext"],
}


def rays_per_step(config_path: Path) -> int:
    """Rays one training step consumes, read back from the run's saved config."""
    import yaml
    from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig

    config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    datamanager = config.pipeline.datamanager
    if isinstance(datamanager, FullImageDatamanagerConfig):
        from nerfstudio.utils.eval_utils import eval_setup

        _, pipeline, _, _ = eval_setup(config_path, test_mode="test")
        cameras = pipeline.datamanager.train_dataset.cameras
        return int(cameras.width[0].item() * cameras.height[0].item())
    return int(datamanager.train_num_rays_per_batch)


def markdown(results: List[dict]) -> str:
    rows = [
        "| method | test PSNR (std) | SSIM | train rays / s | steps | training s | process wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['method']} | {r['psnr']:.2f} ({r['psnr_std']:.2f}) | {r['ssim']:.4f} | {r['rays_per_s']:,.0f} | "
            f"{r['steps']:,} | {r['train_loop_s']:.0f} | {r['train_wall_s']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds of training steps per method")
    parser.add_argument("--max-steps", type=int, default=1_000_000, help="upper bound on steps (the budget stops first)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--skip-train", action="store_true", help="only evaluate the runs listed in runs.json")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--flags", action="append", default=[], metavar="METHOD=FLAGS",
                        help="extra ns-train flags for one method, e.g. splat-ext-nerf='--pipeline.model.fast-path off'")
    parser.add_argument("--gpus", type=int, nargs="+", default=None,
                        help="run the methods concurrently, method i alone on GPU gpus[i] (as many GPUs as methods)")
    args = parser.parse_args()
    if args.gpus is not None and len(args.gpus) < len(args.methods):
        parser.error(f"--gpus needs one GPU per method ({len(args.methods)})")

    per_method = {m: [] for m in METHODS}
    for item in args.flags:
        name, flags = item.split("=", 1)
        per_method[name] += shlex.split(flags)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs_file = args.out_dir / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    def train_one(method: str, gpu) -> dict:
        # splat-ext's schedule is 30k steps (it may finish inside the budget); the NeRFs run until the budget.
        steps = min(args.max_steps, 30_000) if method == "splat-ext" else args.max_steps
        run = train(method, args.data, steps, args.out_dir, per_method[method], method_args=METHODS[method],
                    time_budget_s=args.budget_s, gpu=gpu)
        print(f"[bench] {method}: {run['steps']} steps in {run['train_loop_s']:.0f} s", flush=True)
        return run

    if not args.skip_train:
        train_methods(args.methods, args.gpus, train_one, runs, runs_file)
    if args.skip_eval:
        return
    evaluated = [m for m in METHODS if m in runs]
    if args.gpus is None:
        by_method = {m: evaluate(runs[m], {}) for m in evaluated}
    else:
        if len(args.gpus) < len(evaluated):
            parser.error(f"--gpus needs one GPU per evaluated run ({len(evaluated)})")
        children = {m: evaluate_in_child(runs[m], args.gpus[i], args.out_dir / f"eval-{m}.json") for i, m in enumerate(evaluated)}
        for m, child in children.items():
            if child.wait() != 0:
                raise RuntimeError(f"evaluation of {m} failed")
        by_method = {m: json.loads((args.out_dir / f"eval-{m}.json").read_text()) for m in evaluated}
    results = []
    for method in evaluated:
        result = by_method[method]
        result["rays_per_s"] = runs[method]["steps"] * rays_per_step(Path(runs[method]["config"])) / max(
            runs[method]["train_loop_s"] or 1e-9, 1e-9)
        results.append(result)
    write_results(results, markdown(results), args.out_dir)


if __name__ == "__main__":
    main()
