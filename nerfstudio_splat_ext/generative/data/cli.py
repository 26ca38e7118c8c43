"""Command line: generate the procedural multi-object dataset.

    splat-ext-objects --output-dir data/splat-ext-objects --num-train 2000 --num-heldout 100 --views 24 --resolution 128
    python -m nerfstudio_splat_ext.generative.data.cli --num-train 10 --num-heldout 2

Rerunning the same command resumes (objects already written are skipped). Several processes can
share the work: ``--num-shards 4 --shard-index i`` (e.g. one per GPU with ``--device cuda:i``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch
import tyro

from nerfstudio_splat_ext.generative.data.generator import (
    ZERO123_CAMERA_ANGLE_X,
    ObjectDatasetSpec,
    ObjectRenderSpec,
    generate_dataset,
)


@dataclass
class ObjectsConfig:
    """Render many seeded procedural objects (train / held-out: disjoint seed ranges) with cameras and points."""

    output_dir: Path = Path("data/splat-ext-objects")
    """Dataset root (index.json, train/<id>/, heldout/<id>/)."""
    num_train: int = 2000
    """Training objects: seeds train_seed_start + [0, num_train)."""
    num_heldout: int = 100
    """Held-out objects: seeds heldout_seed_start + [0, num_heldout)."""
    views: int = 24
    """Views per object."""
    resolution: int = 128
    """Image width and height."""
    supersample: int = 2
    """Anti-aliasing: s x s rays per pixel."""
    num_points: int = 8192
    """Surface points per object (points.npz)."""
    camera_radius: float = 2.6
    """Camera distance from the origin (objects fit the unit ball)."""
    fov_deg: float = math.degrees(ZERO123_CAMERA_ANGLE_X)
    """Field of view in degrees (default: zero123 / GSO renders, 49.13)."""
    min_elevation_deg: float = -30.0
    max_elevation_deg: float = 75.0
    train_seed_start: int = 0
    heldout_seed_start: int = 10_000_000
    device: str = "auto"
    """Torch device for rendering: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    num_threads: int = 1
    """Torch CPU threads (ignored on GPU)."""
    shard_index: int = 0
    num_shards: int = 1
    """Split the objects between several processes (object k goes to shard k % num_shards)."""
    overwrite: bool = False
    """Regenerate objects that are already there (needed to change the render settings of a root)."""

    def dataset_spec(self) -> ObjectDatasetSpec:
        return ObjectDatasetSpec(
            render=ObjectRenderSpec(
                views=self.views,
                resolution=self.resolution,
                supersample=self.supersample,
                camera_radius=self.camera_radius,
                camera_angle_x=math.radians(self.fov_deg),
                min_elevation_deg=self.min_elevation_deg,
                max_elevation_deg=self.max_elevation_deg,
                num_points=self.num_points,
            ),
            num_train=self.num_train,
            num_heldout=self.num_heldout,
            train_seed_start=self.train_seed_start,
            heldout_seed_start=self.heldout_seed_start,
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(config: ObjectsConfig) -> Dict:
    device = resolve_device(config.device)
    spec = config.dataset_spec()
    print(
        f"[splat-ext-objects] {config.output_dir}: {config.num_train} train + {config.num_heldout} held-out objects, "
        f"{config.views} views at {config.resolution}x{config.resolution} on {device}",
        flush=True,
    )
    t0 = time.perf_counter()
    stats = generate_dataset(
        config.output_dir,
        spec,
        device=device,
        overwrite=config.overwrite,
        log=lambda msg: print(msg, flush=True),
        shard_index=config.shard_index,
        num_shards=config.num_shards,
        num_threads=config.num_threads,
    )
    dt = time.perf_counter() - t0
    per = stats["seconds"] / max(stats["generated"], 1)
    print(
        f"[splat-ext-objects] done in {dt:.1f} s: {stats['generated']} generated ({per:.2f} s/object), "
        f"{stats['skipped']} already there",
        flush=True,
    )
    return stats


def entrypoint() -> None:
    """Console script entry point."""
    main(tyro.cli(ObjectsConfig, prog="splat-ext-objects"))


if __name__ == "__main__":
    entrypoint()
