"""Train splat-ext and nerfstudio's splatfacto on one dataset, on the same GPU, for the same number of steps, one
after the other, then evaluate every run with the same code and write a markdown table.

    python benchmarks/bench_splat.py --data ../shared/data/nerf_synthetic_lego --steps 30000 --out-dir bench/lego

Methods: splat-ext (ours), splatfacto (nerfstudio defaults) and splatfacto-tuned (the flags a knowledgeable user
sets for Blender scenes). All use the splat-ext-data dataparser, so the data, the split (Blender test split, or
every 8th frame held out for nerfstudio-layout scenes) and the white compositing of RGBA images are identical.

Training and evaluation can run in separate invocations (--methods / --skip-train), which lets long benchmarks
be split across several commands; finished runs are found again through <out-dir>/runs.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

SPLATFACTO_TUNED = [
    "--pipeline.model.background-color", "white",
    "--pipeline.model.num-random", "100000",
    "--pipeline.model.random-scale", "2.6",
    "--pipeline.model.cull-alpha-thresh", "0.005",
]
# splat-ext with the render-loss contribution strategy, capped at 170k Gaussians (60% of what the adc strategy
# grows on lego).
CONTRIBUTION = ["--pipeline.model.strategy.kind", "contribution", "--pipeline.model.strategy.max-gaussians", "170000"]
# splat-ext with the contribution strategy growing to 290k Gaussians (about what adc grows on lego) by the end of
# densification (step 15k), then thinned to 170k (60% of that) by rendered weight.
THINNED = ["--pipeline.model.strategy.kind", "contribution", "--pipeline.model.strategy.max-gaussians", "290000",
           "--pipeline.model.strategy.final-gaussians", "170000"]
# The same with the budget's ramp ending at 7.5k steps (the default until eb7b6cf: what the "splat-ext-thin" rows of
# BENCHMARKS.md ran before it), at 12k, and at 15k (the default since, spelled out).
THINNED_RAMP_7K5 = [*THINNED, "--pipeline.model.strategy.budget-ramp-until", "7500"]
THINNED_RAMP_12K = [*THINNED, "--pipeline.model.strategy.budget-ramp-until", "12000"]
THINNED_RAMP_15K = [*THINNED, "--pipeline.model.strategy.budget-ramp-until", "15000"]
# gsplat's 3-sigma tile lists instead of the opacity-aware ones (render/tight_tiles.py): the same render, more pairs.
THREE_SIGMA_TILES = ["--pipeline.model.tight-tile-bounds", "False"]
METHODS: Dict[str, List[str]] = {
    "splat-ext": ["splat-ext"],
    "splat-ext-3sigma": ["splat-ext", *THREE_SIGMA_TILES],
    "splat-ext-contribution": ["splat-ext", *CONTRIBUTION],
    "splat-ext-thin": ["splat-ext", *THINNED],
    "splat-ext-thin-ramp7k5": ["splat-ext", *THINNED_RAMP_7K5],
    "splat-ext-thin-ramp12k": ["splat-ext", *THINNED_RAMP_12K],
    "splat-ext-thin-ramp15k": ["splat-ext", *THINNED_RAMP_15K],
    "splat-ext-thin-3sigma": ["splat-ext", *THINNED, *THREE_SIGMA_TILES],
    "splatfacto": ["splatfacto"],
    "splatfacto-tuned": ["splatfacto", *SPLATFACTO_TUNED],
}

# Runs the nerfstudio trainer in a child process and reports its peak GPU memory at exit.
TRAIN_WRAPPER = r"""
import time
phases = {"wrapper_start": time.time()}  # wall-clock marks; the parent turns them into a per-phase breakdown
import atexit, json, os, sys, torch
phases["torch_imported"] = time.time()
from offline_lpips import patch_offline_lpips
patch_offline_lpips()
from nerfstudio.engine.trainer import Trainer
from nerfstudio.scripts.train import entrypoint
phases["nerfstudio_imported"] = time.time()

# Optional wall-clock budget (BENCH_TIME_BUDGET_S): training stops at the first step after the budget, counted from
# the first training step (set-up excluded), and the last finished step is checkpointed for evaluation.
budget = float(os.environ.get("BENCH_TIME_BUDGET_S", "0") or 0)
clock = {"t0": None, "steps": 0, "last": 0}
# Every 500 steps: (step, seconds since the first step, Gaussians): the count curve (issue 3) and where in the run the
# time goes. The count is a tensor's length on the host: reading it waits for nothing.
progress = []
def _record(trainer, step):
    model = getattr(trainer.pipeline, "model", None)
    count = getattr(model, "num_points", None)
    progress.append((step, round(time.time() - clock["t0"], 3), int(count) if count is not None else None))
class _BudgetSpent(Exception):
    pass
def _budgeted(iteration):
    def train_iteration(step):
        if clock["t0"] is None:
            clock["t0"] = time.time()
        if budget and time.time() - clock["t0"] > budget:
            raise _BudgetSpent()
        if step % 500 == 0:
            _record(iteration.__self__, step)
        out = iteration(step)
        clock["steps"] += 1
        clock["last"] = step
        return out
    return train_iteration
_setup = Trainer.setup
def setup(self, *args, **kwargs):
    phases["setup_start"] = time.time()
    _setup(self, *args, **kwargs)
    phases["setup_end"] = time.time()
Trainer.setup = setup

# GPU time of splat-ext's contribution passes (issue 3: at most 10% of training time), from CUDA events recorded
# around each pass: no synchronisation inside the loop.
contribution_events = []
try:
    from nerfstudio_splat_ext.strategy.contribution import ContributionStrategy
    _accumulate = ContributionStrategy._accumulate_contribution
    def _timed_accumulate(self, *args, **kwargs):
        if not torch.cuda.is_available():
            return _accumulate(self, *args, **kwargs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = _accumulate(self, *args, **kwargs)
        end.record()
        contribution_events.append((start, end))
        return out
    ContributionStrategy._accumulate_contribution = _timed_accumulate
except ImportError:
    pass
_train = Trainer.train
def train(self):
    # Wrap this trainer's own train_iteration (a subclass may override nerfstudio's): the instance attribute is what
    # the training loop calls.
    self.train_iteration = _budgeted(self.train_iteration)
    try:
        _train(self)
    except _BudgetSpent:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.save_checkpoint(clock["last"])
    phases["first_step"] = clock["t0"]
    phases["train_end"] = time.time()
    seconds = phases["train_end"] - clock["t0"] if clock["t0"] else 0.0
    if contribution_events:
        torch.cuda.synchronize()
    passes_s = sum(a.elapsed_time(b) for a, b in contribution_events) / 1000.0
    if clock["t0"]:
        _record(self, clock["last"] + 1)
    print("BENCH_STEPS " + json.dumps({"steps": clock["steps"], "train_loop_s": seconds,
                                       "contribution_passes": len(contribution_events),
                                       "contribution_gpu_s": passes_s, "progress": progress}), flush=True)
Trainer.train = train

def _report():  # registered before training starts: runs after the exit handlers that training registers
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print("BENCH_PEAK_MEM " + json.dumps(peak), flush=True)
    phases["exit_handlers_done"] = time.time()
    print("BENCH_PHASES " + json.dumps(phases), flush=True)
atexit.register(_report)
sys.argv = ["ns-train"] + sys.argv[1:]
entrypoint()
"""


# Imports what every ns-train imports (nerfstudio, its plugins, gsplat's compiled extension) once before any run is
# timed: on a fresh host the first process also pays for reading the files from disk and writing Python's bytecode
# caches, which would otherwise be charged to whichever method happens to train first. It also loads our two CUDA
# extensions from this copy of the code: torch's JIT cache rebuilds an extension whose sources moved (the build
# file names them by path), 11 s for the fused SSIM and 28 s for the contribution kernel on one H100 GPU, and that
# build would otherwise fall inside the first training loop that uses them.
WARM_UP = (
    "import torch; from nerfstudio.configs.method_configs import all_methods; import nerfstudio.scripts.train; "
    "from gsplat.cuda._backend import _C; "
    "from nerfstudio_splat_ext.losses.fused_ssim import fused_ssim_extension; fused_ssim_extension(); "
    "from nerfstudio_splat_ext.cuda.contribution import load_contribution_extension; load_contribution_extension()"
)


def warm_up(short_runs: Sequence[Callable[[], object]] = ()) -> None:
    """Imports and extensions (WARM_UP), then ``short_runs``: a few steps of every method, each in its own process:
    the first process of each kind also reads the data and the modules that only a training run imports (writers,
    dataparsers, the benchmark's own wrapper) from disk and compiles their bytecode, which the timed runs would
    otherwise pay for in whichever method trains first. (It did not remove the 13-21 s spread of the import phase
    between processes on one host: BENCHMARKS 00000000000000000.)"""
    t0 = time.time()
    subprocess.run([sys.executable, "-c", WARM_UP], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for run in short_runs:
        run()
    print(f"[bench] imports, extensions and short runs warmed up in {time.time() - t0:.0f} s (not counted)", flush=True)


def train(
    method: str,
    data: Path,
    steps: int,
    out_dir: Path,
    extra: List[str],
    label: str = "",
    method_args: Optional[List[str]] = None,
    time_budget_s: float = 0.0,
    dataparser: Optional[List[str]] = None,
    gpu: Optional[int] = None,
) -> dict:
    """Train one method in a child ns-train. ``method_args``: the method name and its own flags (default: METHODS);
    ``time_budget_s`` > 0 stops training after that many seconds of training steps; ``dataparser``: the dataparser
    subcommand and its flags (default splat-ext-data); ``gpu``: train on that GPU only (CUDA_VISIBLE_DEVICES)."""
    method_args = method_args or METHODS[method]
    timestamp = label or method
    cmd = [
        sys.executable, "-c", TRAIN_WRAPPER,
        *method_args[:1],
        "--data", str(data),
        "--output-dir", str(out_dir / "runs"),
        "--experiment-name", "bench",
        "--timestamp", timestamp,
        "--vis", "tensorboard",
        "--max-num-iterations", str(steps),
        # Same for every method: no periodic evaluation during training, one checkpoint at the end.
        "--steps-per-eval-image", str(10 * steps),
        "--steps-per-eval-batch", str(10 * steps),
        "--steps-per-eval-all-images", str(10 * steps),
        "--steps-per-save", str(steps),
        "--viewer.quit-on-train-completion", "True",
        *method_args[1:],
        *extra,
        *(dataparser or ["splat-ext-data"]),
    ]
    print(f"[bench] training {method}: {' '.join(cmd[3:])}", flush=True)
    log_path = out_dir / f"train-{timestamp}.log"
    with open(log_path, "w") as log_file:  # streamed, so a run cut short still leaves its progress behind
        # benchmarks/ on the path of the child, for offline_lpips
        bench_dir = str(Path(__file__).resolve().parent)
        env = dict(os.environ, BENCH_TIME_BUDGET_S=str(time_budget_s), PYTHONPATH=os.pathsep.join(filter(None, [bench_dir, os.environ.get("PYTHONPATH")])))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        t0 = time.time()
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
        t_end = time.time()
    wall = t_end - t0
    log = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} training failed (see {log_path}):\n{log[-3000:]}")
    peak, loop, marks = 0, {}, {}
    for line in log.splitlines():
        if line.startswith("BENCH_PHASES "):
            marks = json.loads(line.split(" ", 1)[1])
        if line.startswith("BENCH_PEAK_MEM "):
            peak = int(json.loads(line.split(" ", 1)[1]))
        if line.startswith("BENCH_STEPS "):
            loop = json.loads(line.split(" ", 1)[1])
    config = out_dir / "runs" / "bench" / method_args[0] / timestamp / "config.yml"
    return {
        "method": method,
        "config": str(config),
        "train_wall_s": wall,
        "peak_gpu_mem_bytes": peak,
        "steps": loop.get("steps", steps),
        "train_loop_s": loop.get("train_loop_s"),
        "contribution_passes": loop.get("contribution_passes", 0),
        "contribution_gpu_s": loop.get("contribution_gpu_s", 0.0),
        "progress_step_seconds_gaussians": loop.get("progress", []),
        "phases_s": phase_breakdown(marks, t0, t_end),
    }


def phase_breakdown(marks: dict, t_start: float, t_end: float) -> dict:
    """Seconds per phase of one ns-train child, from its wall-clock marks and the parent's start and end times:
    where the time outside the training loop goes."""
    order = ["wrapper_start", "torch_imported", "nerfstudio_imported", "setup_start", "setup_end", "first_step",
             "train_end", "exit_handlers_done"]
    names = ["interpreter_start", "import_torch", "import_nerfstudio_and_plugins", "parse_and_build_config",
             "trainer_setup", "setup_to_first_step", "training_loop", "after_loop_and_exit_handlers", "interpreter_teardown"]
    times = [t_start] + [marks.get(k) for k in order] + [t_end]
    if any(t is None for t in times):
        return {}
    return {name: round(b - a, 3) for name, a, b in zip(names, times[:-1], times[1:])}


def evaluate(run: dict, side_by_side: dict) -> dict:
    import torch
    from nerfstudio.utils.eval_utils import eval_setup

    from nerfstudio_splat_ext.losses.ssim import ssim
    from nerfstudio_splat_ext.utils.lpips import LazyLPIPS

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from offline_lpips import patch_offline_lpips

    lpips_offline = patch_offline_lpips()
    _, pipeline, _, _ = eval_setup(Path(run["config"]), test_mode="test")
    model = pipeline.model
    model.eval()
    lpips = LazyLPIPS()
    psnrs, ssims, lpipss = [], [], []
    # The datamanager's cached eval images are undistorted (fox has OpenCV distortion) and its cameras carry the
    # matching intrinsics; gsplat renders pinhole cameras, so both sides must come from there.
    with torch.no_grad():
        for idx, (camera, data) in enumerate(pipeline.datamanager.fixed_indices_eval_dataloader):
            distortion = camera.distortion_params
            if distortion is None or not bool(torch.any(distortion != 0)):
                # no undistortion happened: composite the RGBA file in float, as the 3DGS evaluation does
                image = pipeline.datamanager.eval_dataset.get_image_float32(idx)
            else:
                image = data["image"]
                image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            gt = image[..., :3].to(model.device)
            outputs = model.get_outputs_for_camera(camera)
            pred = outputs["rgb" if "rgb" in outputs else "rgb_fine"].clamp(0, 1)  # vanilla-nerf names it rgb_fine
            mse = torch.mean((pred - gt) ** 2).item()
            psnrs.append(-10 * math.log10(max(mse, 1e-12)))
            a, b = gt.permute(2, 0, 1)[None], pred.permute(2, 0, 1)[None]
            ssims.append(ssim(a, b, padding="valid").item())
            value = None if lpips_offline else lpips(a, b)
            if value is not None:
                lpipss.append(value)
            if idx == 0:
                side_by_side[run["method"]] = pred.cpu()
                side_by_side["ground truth"] = gt.cpu()
    n = len(psnrs)
    mean = sum(psnrs) / n
    std = math.sqrt(sum((p - mean) ** 2 for p in psnrs) / n)
    return {
        **run,
        "test_views": n,
        "psnr": mean,
        "psnr_std": std,
        "psnr_per_view": psnrs,
        "ssim": sum(ssims) / n,
        "lpips": (sum(lpipss) / len(lpipss)) if lpipss else None,
        "lpips_note": None if lpipss else (lpips.skipped_reason or "LPIPS skipped: AlexNet weights unavailable offline"),
        "num_gaussians": int(model.num_points) if hasattr(model, "num_points") else None,
    }


def train_methods(methods: List[str], gpus: Optional[List[int]], train_one, runs: dict, runs_file: Path) -> None:
    """``train_one(method, gpu) -> run`` for every method: one after the other, or at the same time with method i
    alone on GPU ``gpus[i]``; runs.json is rewritten as each run finishes."""
    from concurrent.futures import ThreadPoolExecutor

    def job(index_method):
        index, method = index_method
        return method, train_one(method, None if gpus is None else gpus[index])

    with ThreadPoolExecutor(max_workers=1 if gpus is None else len(methods)) as pool:
        for method, run in pool.map(job, enumerate(methods)):
            runs[method] = run
            runs_file.write_text(json.dumps(runs, indent=2))


def write_results(results: List[dict], table: str, out_dir: Path) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(table + "\n")
    print(table, flush=True)


def evaluate_in_child(run: dict, gpu: int, result_path: Path) -> subprocess.Popen:
    """Starts evaluate(run) in a child process on one GPU; it writes the result dict to result_path."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from bench_splat import evaluate; "
        "r = evaluate(json.loads(sys.argv[2]), {}); Path(sys.argv[3]).write_text(json.dumps(r))"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
    return subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parent), json.dumps(run),
                             str(result_path)], env=env)


def write_side_by_side(images: dict, order: List[str], path: Path, size: int = 256) -> None:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    tiles = []
    for name in order:
        if name in images:
            img = images[name].permute(2, 0, 1)[None]
            width = round(size * img.shape[-1] / img.shape[-2])  # keep the aspect ratio (fox is portrait)
            tiles.append(F.interpolate(img, size=(size, width), mode="area")[0])
    if tiles:
        strip = torch.cat(tiles, dim=2).permute(1, 2, 0).clamp(0, 1)
        Image.fromarray((strip.numpy() * 255).round().astype("uint8")).save(path)


def contribution_share(run: dict) -> str:
    passes, gpu_s, loop_s = run.get("contribution_passes", 0), run.get("contribution_gpu_s", 0.0), run.get("train_loop_s")
    if not passes or not loop_s:
        return "none"
    return f"{passes}: {gpu_s:.1f} s, {100.0 * gpu_s / loop_s:.1f}%"


def markdown(results: List[dict]) -> str:
    rows = ["| method | test PSNR (std) | SSIM | LPIPS | train wall time | Gaussians | peak GPU memory | contribution passes (GPU time, share of the loop) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lpips = r.get("lpips")
        lp = f"{lpips:.4f}" if lpips is not None and lpips == lpips else "n/a (weights offline)"  # None or NaN
        rows.append(
            f"| {r['method']} | {r['psnr']:.2f} ({r['psnr_std']:.2f}) | {r['ssim']:.4f} | {lp} | {r['train_wall_s']:.0f} s | "
            f"{r['num_gaussians']:,} | {r['peak_gpu_mem_bytes'] / 2**30:.2f} GiB | {contribution_share(r)} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--skip-train", action="store_true", help="only evaluate the runs listed in runs.json")
    parser.add_argument("--skip-eval", action="store_true", help="only train (evaluate in a later invocation)")
    parser.add_argument("--image", type=Path, default=None, help="side-by-side PNG of test view 0")
    parser.add_argument("--ours", default="", help="flags for splat-ext only (one quoted string)")
    parser.add_argument("--dataparser", default="splat-ext-data",
                        help="dataparser subcommand and its flags (one quoted string), e.g. 'splat-ext-llff'")
    parser.add_argument("--gpus", type=int, nargs="+", default=None,
                        help="train the methods concurrently, method i alone on GPU gpus[i] (when wall times are not compared)")
    parser.add_argument("--warm-up-steps", type=int, default=20,
                        help="steps of an untimed run of every method before the timed ones (0: imports only)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every ns-train")
    args = parser.parse_args()
    if args.gpus is not None and len(args.gpus) < len(args.methods):
        parser.error(f"--gpus needs one GPU per method ({len(args.methods)})")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs_file = args.out_dir / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    def train_one(method: str, gpu: Optional[int], steps: int = args.steps, out_dir: Path = args.out_dir) -> dict:
        ours = shlex.split(args.ours) if method == "splat-ext" else []
        run = train(method, args.data, steps, out_dir, [*ours, *args.extra],
                    dataparser=shlex.split(args.dataparser), gpu=gpu)
        print(f"[bench] {method}: trained in {run['train_wall_s']:.0f} s; phases (s): {json.dumps(run['phases_s'])}", flush=True)
        return run

    if not args.skip_train:
        short_runs = []
        if args.warm_up_steps > 0:
            (args.out_dir / "warm_up").mkdir(exist_ok=True)
            short_runs = [functools.partial(train_one, m, None, args.warm_up_steps, args.out_dir / "warm_up")
                          for m in args.methods]
        warm_up(short_runs)
        train_methods(args.methods, args.gpus, train_one, runs, runs_file)
    if args.skip_eval:
        return
    side_by_side: dict = {}
    results = [evaluate(runs[m], side_by_side) for m in METHODS if m in runs]
    write_results(results, markdown(results), args.out_dir)
    if args.image is not None:
        write_side_by_side(side_by_side, ["splat-ext", "splatfacto-tuned", "splatfacto", "ground truth"], args.image)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
