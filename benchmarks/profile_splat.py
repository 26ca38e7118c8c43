"""Where one `splat-ext` training step spends its time (GPU), against the floor of gsplat rasterization alone.

Builds the method's trainer in this process, trains --warmup steps, then on the same Gaussians:
  1. nerfstudio's own training loop (Trainer.train: writers, callbacks, logging; no evaluation, no checkpoint)
     for --steps steps: ms per step as a user's run sees it;
  2. the same number of bare steps (callbacks + train_iteration, as the loop calls them);
  3. the same again with a CUDA synchronisation around each stage (datamanager, render forward, metrics, loss,
     backward, optimizers, schedulers, the strategy's after-step callback), so the stages add up to the step;
  4. the floor: gsplat's rasterization forward + backward alone, same Gaussians, same SH degree, every training view
     in turn; the step / floor ratio is issue 3's "step time <= 2x rasterization" criterion;
  5. optionally (--torch-profile N) N steps under torch.profiler: GPU busy time and kernel launches per step.

    python benchmarks/profile_splat.py --data ../shared/data/nerf_synthetic_lego --out profile_splat.json \
        [--load-dir RUN/nerfstudio_models] [--flags "--pipeline.model.strategy.kind contribution"]

Without --load-dir the default --flags stand in for the end of a lego run: 300k random Gaussians, full SH degree
from step 300, no refinement and no densification statistics. With --load-dir (a finished run's checkpoint folder) the profile runs on its Gaussians.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_nerf import build_trainer, sync, sync_sites, timed, torch_profile, trainer_step  # noqa: E402

END_OF_RUN_FLAGS = (
    "--pipeline.model.num-random 300000 --pipeline.model.sh-degree-interval 100 "
    "--pipeline.model.strategy.refine-start-iter 1000000000 --pipeline.model.strategy.refine-stop-iter 0"
)


def raster_floor(model, datamanager, reps: int) -> float:
    """ms of gsplat rasterization forward + backward (gradients for every Gaussian input), averaged over the
    training views, with the model's Gaussians activated once outside the timed region."""
    from nerfstudio_splat_ext.models.splat_ext import camera_to_world_to_viewmat
    from nerfstudio_splat_ext.render.backend import get_rasterizer

    _, rasterization = get_rasterizer(model.config.render_backend, model.device)  # gsplat on GPU

    p = model.gauss_params
    leaves = [
        p["means"].detach().clone(),
        p["quats"].detach().clone(),
        torch.exp(p["scales"].detach()),
        torch.sigmoid(p["opacities"].detach()).squeeze(-1),
        torch.cat([p["features_dc"].detach()[:, None], p["features_rest"].detach()], dim=1),
    ]
    for t in leaves:
        t.requires_grad_(True)
    cameras = datamanager.train_dataset.cameras.to(model.device)
    views = []
    for i in range(len(cameras)):
        cam = cameras[i : i + 1]
        views.append((camera_to_world_to_viewmat(cam.camera_to_worlds.float().to(model.device)), cam.get_intrinsics_matrices().float().to(model.device),
                      int(cam.width.item()), int(cam.height.item())))
    background = model.background_color.to(model.device)

    def once(view):
        viewmat, K, w, h = view
        render, alpha, _ = rasterization(*leaves, viewmats=viewmat, Ks=K, width=w, height=h, packed=False,
                                         near_plane=model._near_plane, far_plane=1e10, sh_degree=model.config.sh_degree,
                                         rasterize_mode=model.config.rasterize_mode)
        rgb = render + (1.0 - alpha) * background
        rgb.sum().backward()

    for view in views[:5]:
        once(view)
    sync()
    t0 = time.perf_counter()
    for r in range(reps):
        once(views[r % len(views)])
    sync()
    return 1000.0 * (time.perf_counter() - t0) / reps


def python_profile(trainer, first: int, n: int, path: Path) -> dict:
    """n steps of nerfstudio's loop under cProfile: where the host's time goes (the functions with the most time
    of their own, and cumulatively), for a step that the host, not the GPU, paces."""
    import cProfile
    import io
    import pstats

    trainer._start_step = first
    trainer.config.max_num_iterations = n
    profiler = cProfile.Profile()
    sync()
    t0 = time.perf_counter()
    profiler.enable()
    trainer.train()
    sync()
    profiler.disable()
    wall = time.perf_counter() - t0
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(60)
    path.write_text(out.getvalue())
    return {"steps": n, "wall_ms_per_step_under_cprofile": 1000.0 * wall / n, "table": str(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("profile_splat.json"))
    parser.add_argument("--load-dir", type=Path, default=None, help="a finished run's nerfstudio_models folder")
    parser.add_argument("--flags", default=None, help=f"ns-train flags of splat-ext (default without --load-dir: "
                        f"{END_OF_RUN_FLAGS!r})")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--floor-reps", type=int, default=200)
    parser.add_argument("--label", default="default")
    parser.add_argument("--torch-profile", type=int, default=0)
    parser.add_argument("--sync-sites", type=int, default=0)
    parser.add_argument("--cprofile", type=int, default=0, help="also run this many loop steps under cProfile")
    args = parser.parse_args()

    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    from nerfstudio_splat_ext.method_configs import splat_ext_trainer_config

    flags = args.flags if args.flags is not None else ("" if args.load_dir else END_OF_RUN_FLAGS)
    if args.load_dir is not None:
        flags += f" --load-dir {args.load_dir}"
    # No evaluation or checkpoints inside the timed loop; a long run so that schedules do not end inside it.
    flags += " --steps-per-eval-image 1000000000 --steps-per-eval-batch 1000000000 --steps-per-eval-all-images 1000000000"
    flags += " --steps-per-save 1000000000 --max-num-iterations 1000000000"
    trainer = build_trainer(args.data, flags, Path("/tmp/profile_splat_runs"), base=splat_ext_trainer_config())
    model = trainer.pipeline.model
    first = trainer._start_step

    def step(i: int) -> None:
        trainer_step(trainer, i)

    t0 = time.time()
    for i in range(first, first + args.warmup):
        step(i)
    sync()
    warmup_s = time.time() - t0
    at = first + args.warmup
    gaussians = model.num_points

    # 1. nerfstudio's loop
    trainer._start_step = at
    trainer.config.max_num_iterations = args.steps
    trainer._after_train = lambda: None  # no final checkpoint inside the timing
    sync()
    t0 = time.perf_counter()
    trainer.train()
    sync()
    loop_ms = 1000.0 * (time.perf_counter() - t0) / args.steps
    at += args.steps

    # 2. bare steps
    sync()
    t0 = time.perf_counter()
    for i in range(at, at + args.steps):
        step(i)
    sync()
    bare_ms = 1000.0 * (time.perf_counter() - t0) / args.steps
    at += args.steps

    # 3. synchronised stages
    totals: dict = defaultdict(float)
    dm = trainer.pipeline.datamanager
    optimizers = trainer.optimizers
    originals = {
        (dm, "next_train"): dm.next_train,
        (model, "get_outputs"): model.get_outputs,
        (model, "get_metrics_dict"): model.get_metrics_dict,
        (model, "get_loss_dict"): model.get_loss_dict,
        (optimizers, "optimizer_scaler_step_some"): optimizers.optimizer_scaler_step_some,
        (optimizers, "scheduler_step_all"): optimizers.scheduler_step_all,
        (optimizers, "zero_grad_some"): optimizers.zero_grad_some,
    }
    names = {"next_train": "datamanager", "get_outputs": "render forward (get_outputs)", "get_metrics_dict": "metrics",
             "get_loss_dict": "loss forward", "optimizer_scaler_step_some": "optimizers",
             "scheduler_step_all": "schedulers", "zero_grad_some": "zero_grad"}
    for (obj, attr), fn in originals.items():
        setattr(obj, attr, timed(totals, names[attr], fn))
    tensor_backward = torch.Tensor.backward
    torch.Tensor.backward = timed(totals, "backward", tensor_backward)

    def staged_step(i: int) -> None:
        trainer.pipeline.train()
        for callback in trainer.callbacks:
            callback.run_callback_at_location(i, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        trainer.train_iteration(i)
        sync()
        t = time.perf_counter()
        for callback in trainer.callbacks:
            callback.run_callback_at_location(i, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        sync()
        totals["strategy (after-step callbacks)"] += time.perf_counter() - t

    step_total = 0.0
    try:
        for i in range(at, at + args.steps):
            sync()
            t = time.perf_counter()
            staged_step(i)
            sync()
            step_total += time.perf_counter() - t
    finally:
        torch.Tensor.backward = tensor_backward
        for (obj, attr), fn in originals.items():
            setattr(obj, attr, fn)
    at += args.steps
    stages = {k: 1000.0 * v / args.steps for k, v in totals.items()}
    stages["rest (Python between stages)"] = 1000.0 * step_total / args.steps - sum(stages.values())

    # 4. the floor
    model.train()
    floor_ms = raster_floor(model, dm, args.floor_reps)
    result = {
        "label": args.label,
        "flags": flags,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "first_step": first,
        "warmup_steps": args.warmup,
        "warmup_s": warmup_s,
        "gaussians": gaussians,
        "image_hw": list(model.last_size),
        "nerfstudio_loop_ms_per_step": loop_ms,
        "bare_ms_per_step": bare_ms,
        "synced_ms_per_step": 1000.0 * step_total / args.steps,
        "stages_ms": stages,
        "raster_floor_ms": floor_ms,
        "loop_over_floor": loop_ms / floor_ms,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
    }
    if args.torch_profile:
        result["torch_profile"] = torch_profile(step, at, args.torch_profile, args.out.with_suffix(".ops.txt"))
        at += args.torch_profile
    if args.sync_sites:
        result["syncs_per_step_by_site"] = sync_sites(step, at, args.sync_sites)
        at += args.sync_sites
    if args.cprofile:
        result["cprofile"] = python_profile(trainer, at, args.cprofile, args.out.with_suffix(".cprofile.txt"))
    print(json.dumps(result, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
