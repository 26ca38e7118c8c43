"""Where a training step of the single-image teacher (splat-ext-image) goes, stage by stage, on one GPU.

    python benchmarks/profile_objects.py --data data/splat-ext-objects --steps 30 [--json out.json]

Builds the default teacher (8 objects x (source + 4 targets) at 128x128), renders the batch in one rasterizer call
or in one per object, and times, with a device synchronisation around each: the U-Net forward, decoding the map, rendering,
the loss, the backward pass and the Adam step. Medians over --steps steps after 5 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from nerfstudio.data.scene_box import SceneBox

from nerfstudio_splat_ext.generative.data.datamanager import MultiObjectDataManagerConfig
from nerfstudio_splat_ext.generative.pipeline import composite
from nerfstudio_splat_ext.generative.pixel_gaussians import decode_gaussian_map, render_pixel_gaussians
from nerfstudio_splat_ext.models.splat_ext_image import SplatExtImageModelConfig


def profile(data: Path, one_call: bool, steps: int, device: str) -> dict:
    dm = MultiObjectDataManagerConfig(data=data, batch_size=8, num_target_views=4).setup(device=device)
    model = SplatExtImageModelConfig(lpips_loss_weight=0.0).setup(
        scene_box=SceneBox(torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=0, metadata={}
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict = {k: [] for k in ("data", "unet", "decode", "render", "loss", "backward", "adam", "step")}
    for step in range(steps + 5):
        sync(); t0 = time.perf_counter(); marks = [t0]

        def mark():
            sync(); marks.append(time.perf_counter())

        _, batch = dm.next_train(step); mark()
        src = composite(batch["source_image"], model.background)
        canonical = model.predict_canonical(src, batch["source_c2w"], batch["source_intrinsics"]); mark()
        g = decode_gaussian_map(canonical, batch["source_c2w"], batch["source_intrinsics"], model.map_config); mark()
        c2w = torch.cat([batch["source_c2w"][:, None], batch["target_c2w"]], 1)
        intr = torch.cat([batch["source_intrinsics"][:, None], batch["target_intrinsics"]], 1)
        gt = torch.cat([src[:, None], composite(batch["target_images"], model.background)], 1)
        rgb, _ = render_pixel_gaussians(g, c2w, intr, src.shape[2], src.shape[1], model.background, one_call=one_call)
        mark()
        loss = torch.nn.functional.mse_loss(rgb, gt); mark()
        opt.zero_grad(); loss.backward(); mark()
        opt.step(); mark()
        if step >= 5:
            for k, a, b in zip(list(times)[:-1], marks[:-1], marks[1:]):
                times[k].append(1e3 * (b - a))
            times["step"].append(1e3 * (marks[-1] - marks[0]))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "ms_median": {}}
    for one_call in (False, True):
        name = f"one_call={one_call}"
        result["ms_median"][name] = profile(args.data, one_call, args.steps, args.device)
        print(name, {k: round(v, 2) for k, v in result["ms_median"][name].items()}, flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
