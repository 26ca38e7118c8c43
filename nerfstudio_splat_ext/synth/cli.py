"""Command line: generate the procedural default dataset (Blender format).

    splat-ext-synth --output-dir data/splat-ext-synth --seed 0
    python -m nerfstudio_splat_ext.synth --num-train 100 --resolution 200
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from nerfstudio_splat_ext.synth.scene import SceneSpec
from nerfstudio_splat_ext.synth.writer import DatasetSpec, write_dataset


@dataclass
class SynthConfig:
    """Render a seeded procedural object from many views as a Blender-format dataset
    (load it with nerfstudio's blender-data dataparser)."""

    output_dir: Path = Path("data/splat-ext-synth")
    """Folder to write (transforms_{train,val,test}.json, {train,val,test}/r_*.png)."""
    num_train: int = 100
    """Number of training views."""
    num_val: int = 10
    """Number of validation views."""
    num_test: int = 25
    """Number of test views."""
    resolution: int = 200
    """Image width and height in pixels."""
    seed: int = 0
    """Seed of the procedural object."""
    supersample: int = 2
    """Anti-aliasing: s x s rays per pixel."""
    overwrite: bool = False
    """Regenerate even if the folder already holds a complete dataset with the same settings."""

    def dataset_spec(self) -> DatasetSpec:
        return DatasetSpec(
            scene=SceneSpec(seed=self.seed),
            num_train=self.num_train,
            num_val=self.num_val,
            num_test=self.num_test,
            resolution=self.resolution,
            supersample=self.supersample,
        )


def main(config: SynthConfig) -> Path:
    """Generate (or reuse) the dataset of ``config``; returns its folder."""
    spec = config.dataset_spec()
    t0 = time.perf_counter()
    with torch.no_grad():
        written = write_dataset(config.output_dir, spec, overwrite=config.overwrite, log=print)
    path = config.output_dir.resolve()
    if written:
        print(f"[splat-ext-synth] wrote {path} in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"[splat-ext-synth] {path} already holds this dataset (use --overwrite to regenerate)")
    return path


def entrypoint() -> None:
    """Console script entry point."""
    main(tyro.cli(SynthConfig, prog="splat-ext-synth"))


if __name__ == "__main__":
    entrypoint()
