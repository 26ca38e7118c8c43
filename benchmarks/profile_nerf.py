"""Where one `splat-ext-nerf` training step spends its time (GPU), and how many samples a ray costs.

Builds the method's trainer in this process, trains --warmup steps (the occupancy grid settles), then:
  1. times --steps plain steps (nerfstudio's train_iteration plus the grid callback): steps/s and rays/s;
  2. times the same number of steps again with a CUDA synchronisation around each stage (datamanager, ray
     marching through the grid, the gradient-free density pass, the network with gradients, compositing and loss,
     backward + optimizer, grid update), so the stages add up to the step;
  3. reports samples per ray: marched in occupied cells, and kept after the density pass.

    python benchmarks/profile_nerf.py --data ../shared/data/nerf_synthetic_lego --out profile_nerf.json \
        [--flags "--pipeline.model.alpha-thre 0"]

--flags are ns-train flags of the method (parsed by tyro against its config).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections import defaultdict
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(totals, name, fn):
    """fn wrapped so that its time, between two CUDA synchronisations, adds to totals[name]."""
    def wrapper(*a, **k):
        sync()
        t = time.perf_counter()
        out = fn(*a, **k)
        sync()
        totals[name] += time.perf_counter() - t
        return out

    return wrapper


def trainer_step(trainer, i: int) -> None:
    """One training step as nerfstudio's loop runs it: callbacks before, the iteration, callbacks after."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    trainer.pipeline.train()
    for callback in trainer.callbacks:
        callback.run_callback_at_location(i, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.train_iteration(i)
    for callback in trainer.callbacks:
        callback.run_callback_at_location(i, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)


def build_trainer(data: Path, flags: str, out_dir: Path, base=None):
    """The trainer of `base` (default: splat-ext-nerf's config) with ns-train `flags`, set up in this process."""
    import tyro
    from nerfstudio_splat_ext.method_configs import splat_ext_nerf_trainer_config

    base = base if base is not None else splat_ext_nerf_trainer_config()
    argv = ["--data", str(data), "--output-dir", str(out_dir), "--vis", "tensorboard", *shlex.split(flags)]
    config = tyro.cli(type(base), args=argv, default=base)
    config.set_timestamp()
    config.pipeline.datamanager.data = config.data
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def torch_profile(step, first: int, n: int, table_path: Path) -> dict:
    """Records n steps: wall time, summed GPU kernel time (busy) and the ops that take it, to tell a step bound
    by the GPU from one bound by kernel launches and host synchronisations."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(first, first + n):
            step(i)
        sync()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in kernels)
    averages = prof.key_averages()
    key = "device_time_total" if hasattr(averages[0], "device_time_total") else "cuda_time_total"
    table_path.write_text(
        averages.table(sort_by=key, row_limit=45) + "\n\n" + averages.table(sort_by="cpu_time_total", row_limit=45)
    )
    launches = sum(1 for e in prof.events() if "cudaLaunchKernel" in e.name or "cuLaunchKernel" in e.name)
    syncs = sum(1 for e in prof.events() if "Synchronize" in e.name)
    return {
        "steps": n,
        "wall_ms_per_step": 1000.0 * wall / n,
        "gpu_kernel_ms_per_step": busy_us / 1000.0 / n,
        "kernels_per_step": len(kernels) / n,
        "launch_calls_per_step": launches / n,
        "sync_calls_per_step": syncs / n,
        "ops_table": str(table_path),
    }


def sync_sites(step, first: int, n: int) -> dict:
    """Runs n steps with torch's CUDA sync debug mode on and counts, per Python call site (file:line), the
    operations that made the host wait for the GPU."""
    import warnings
    from collections import Counter

    sites: Counter = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(first, first + n):
                step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return {site: count / n for site, count in sites.most_common(25)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("profile_nerf.json"))
    parser.add_argument("--warmup", type=int, default=1500, help="steps before measuring (grid settles)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--flags", default="", help="ns-train flags of splat-ext-nerf")
    parser.add_argument("--label", default="default")
    parser.add_argument("--sync-sites", type=int, default=0,
                        help="also run this many steps in CUDA sync debug mode: host synchronisations per call site")
    parser.add_argument("--torch-profile", type=int, default=0,
                        help="also record this many steps with torch.profiler: GPU busy time per step and the top ops")
    args = parser.parse_args()

    from nerfstudio_splat_ext.model_components import occupancy_grid as grid_module

    trainer = build_trainer(args.data, args.flags, Path("/tmp/profile_nerf_runs"))
    model = trainer.pipeline.model
    rays_per_step = trainer.config.pipeline.datamanager.train_num_rays_per_batch

    def step(i: int) -> None:
        trainer_step(trainer, i)

    t0 = time.time()
    for i in range(args.warmup):
        step(i)
    sync()
    warmup_s = time.time() - t0

    # 1. plain steps
    graphs = model._graphed_fine
    captures_before = graphs.captures if graphs is not None else 0
    sync()
    t0 = time.time()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    sync()
    plain_s = (time.time() - t0) / args.steps
    captures_timed = (graphs.captures if graphs is not None else 0) - captures_before

    # 2. the same with synchronised stage timers (monkeypatched wrappers)
    totals = defaultdict(float)
    counts = defaultdict(float)

    dm = trainer.pipeline.datamanager
    dm.next_train = timed(totals, "datamanager", dm.next_train)
    grid = model.occupancy_grid
    orig_sample = grid.sample

    def sample(*a, **k):
        sigma_fn = k.get("sigma_fn")
        if sigma_fn is not None:
            def counted(x, d):
                counts["marched"] += x.shape[0]
                return timed(totals, "density pass", sigma_fn)(x, d)
            k["sigma_fn"] = counted
        out = orig_sample(*a, **k)
        counts["kept"] += out.ray_indices.numel()
        counts["rays"] += out.num_rays
        return out

    grid.sample = timed(totals, "marching + density pass", sample)
    model._fine_forward = timed(totals, "network with gradients (forward)", model._fine_forward)
    grid.update = timed(totals, "grid update", grid.update)
    model.get_outputs = timed(totals, "get_outputs (all)", model.get_outputs)
    step_total = 0.0
    for i in range(args.warmup + args.steps, args.warmup + 2 * args.steps):
        sync()
        t = time.perf_counter()
        step(i)
        sync()
        step_total += time.perf_counter() - t
    n = args.steps
    stages = {k: 1000.0 * v / n for k, v in totals.items()}
    stages["marching (grid only)"] = stages.get("marching + density pass", 0.0) - stages.get("density pass", 0.0)
    stages["compositing + loss + backward + optimizer + rest"] = (
        1000.0 * step_total / n - stages.get("datamanager", 0.0) - stages.get("get_outputs (all)", 0.0)
        - stages.get("grid update", 0.0)
    )
    stages["compositing (get_outputs minus marching and network)"] = (
        stages.get("get_outputs (all)", 0.0) - stages.get("marching + density pass", 0.0)
        - stages.get("network with gradients (forward)", 0.0)
    )
    result = {
        "label": args.label,
        "flags": args.flags,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "rays_per_step": rays_per_step,
        "warmup_steps": args.warmup,
        "warmup_s": warmup_s,
        "plain_ms_per_step": 1000.0 * plain_s,
        "plain_rays_per_s": rays_per_step / plain_s,
        "synced_ms_per_step": 1000.0 * step_total / n,
        "stages_ms": stages,
        "marched_samples_per_ray": counts["marched"] / max(counts["rays"], 1),
        "kept_samples_per_ray": counts["kept"] / max(counts["rays"], 1),
        "occupied_fraction": grid.occupied_fraction(),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        "cuda_graph_captures": graphs.captures if graphs is not None else 0,
        "cuda_graph_captures_in_plain_steps": captures_timed,
    }
    if args.torch_profile:
        result["torch_profile"] = torch_profile(step, args.warmup + 2 * args.steps, args.torch_profile,
                                                args.out.with_suffix(".ops.txt"))
    if args.sync_sites:
        first = args.warmup + 2 * args.steps + args.torch_profile
        result["syncs_per_step_by_site"] = sync_sites(step, first, args.sync_sites)
    print(json.dumps(result, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
