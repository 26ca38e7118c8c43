"""Command line: generate the procedural multi-object dataset.

    splat-ext-objects --output-dir data/splat-ext-objects --num-train 2000 --num-heldout 100 --views 24 --resolution 128
    python -m nerfstudio_splat_ext.generative.data.cli --num-train 10 --num-heldout 2

Rerunning the same command resumes (objects already written are skipped). ``--workers N`` renders
with N processes on the CPU, one torch thread each (the tracer's per-step tensors are small, so
processes scale where threads do not). Several machines or GPUs can share the work:
``--num-shards 4 --shard-index i`` (e.g. one per GPU with ``--device cuda:i``).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

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
    workers: int = 1
    """Processes rendering this shard on the CPU, each with num_threads torch threads (0: one per CPU core).
    Only for the CPU: several processes on one GPU are slower than one (its launches contend)."""
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


def _log(msg: str) -> None:  # a module function, not a lambda: spawned workers must unpickle it
    print(msg, flush=True)


def _generate_shard(config: ObjectsConfig, device: torch.device, shard_index: int, num_shards: int) -> Dict:
    return generate_dataset(
        config.output_dir,
        config.dataset_spec(),
        device=device,
        overwrite=config.overwrite,
        log=_log,
        shard_index=shard_index,
        num_shards=num_shards,
        num_threads=config.num_threads,
    )


def _generate_with_workers(config: ObjectsConfig, device: torch.device, workers: int) -> Dict:
    """Worker w of shard s renders shard s + num_shards * w of num_shards * workers: together, exactly shard s."""
    shards = [config.shard_index + config.num_shards * w for w in range(workers)]
    jobs = [(config, device, shard, config.num_shards * workers) for shard in shards]
    # spawn, not fork: a forked child would inherit the parent's torch thread pools mid-state
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results: List[Dict] = pool.starmap(_generate_shard, jobs)
    return {key: sum(r[key] for r in results) for key in ("generated", "skipped", "seconds", "render_seconds")}


def main(config: ObjectsConfig) -> Dict:
    device = resolve_device(config.device)
    workers = config.workers if config.workers > 0 else multiprocessing.cpu_count()
    if workers > 1 and device.type != "cpu":
        raise ValueError(
            f"--workers {workers} needs --device cpu: several processes on one GPU are slower than one "
            "(use --num-shards / --shard-index with one process per GPU instead)"
        )
    config.dataset_spec().validate()  # fail here, not once per worker
    print(
        f"[splat-ext-objects] {config.output_dir}: {config.num_train} train + {config.num_heldout} held-out objects, "
        f"{config.views} views at {config.resolution}x{config.resolution} on {device}"
        + (f" ({workers} processes)" if workers > 1 else ""),
        flush=True,
    )
    t0 = time.perf_counter()
    if workers > 1:
        stats = _generate_with_workers(config, device, workers)
    else:
        stats = _generate_shard(config, device, config.shard_index, config.num_shards)
    dt = time.perf_counter() - t0
    # per object: wall time over all processes (what 2000 objects will take), not one process's render time
    per = dt / max(stats["generated"], 1)
    print(
        f"[splat-ext-objects] done in {dt:.1f} s: {stats['generated']} generated ({per:.2f} s/object of wall time), "
        f"{stats['skipped']} already there",
        flush=True,
    )
    return stats


def entrypoint() -> None:
    """Console script entry point."""
    main(tyro.cli(ObjectsConfig, prog="splat-ext-objects"))


if __name__ == "__main__":
    entrypoint()
