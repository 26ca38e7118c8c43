"""Time the occupancy grid's marching (model_components/occupancy_grid.py): two-level vs the dense [rays, steps]
table, on a lego-sized batch (8192 rays, 128^3 grid over a +-1.5 box, step = diagonal / 1024) with a synthetic
occupancy of about 1% of the cells. Both give the same samples (tests/test_occupancy_grid.py checks it).

    python benchmarks/march_speed.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from nerfstudio_splat_ext.model_components.occupancy_grid import OccupancyGrid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    box = torch.tensor([[-1.5] * 3, [1.5] * 3], device=device)
    grid = OccupancyGrid(box, resolution=128, warmup_steps=10).to(device)
    half = torch.tensor([0.6, 0.4, 0.5], device=device)
    grid.update(0, lambda p: ((p.abs() < half).all(-1) & ((p * 7).sin().sum(-1) > 0.8)).float() * 5)
    gen = torch.Generator().manual_seed(0)
    origins = torch.nn.functional.normalize(torch.randn(8192, 3, generator=gen), dim=-1) * 4
    targets = (torch.rand(8192, 3, generator=gen) * 2 - 1) * 0.5
    origins, directions = origins.to(device), torch.nn.functional.normalize(targets.to(device) - origins.to(device), dim=-1)
    step = float((box[1] - box[0]).norm()) / 1024
    print(f"occupied cells: {grid.occupied_fraction():.4f}")
    for name in ("two-level", "dense"):
        if name == "dense":
            grid._steps_per_stretch = lambda step_size: 1
        grid.sample(origins, directions, step_size=step, stratified=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            samples = grid.sample(origins, directions, step_size=step, stratified=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / args.repeats * 1000
        print(f"{name}: {ms:.2f} ms per batch, {samples.ray_indices.numel() / 8192:.1f} samples per ray")


if __name__ == "__main__":
    main()
