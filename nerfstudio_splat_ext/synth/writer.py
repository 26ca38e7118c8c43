"""Writes a rendered procedural scene as a Blender-format (NeRF-synthetic) dataset.

Layout (loadable unchanged by nerfstudio's ``blender-data`` dataparser)::

    <output_dir>/
        transforms_train.json   {"camera_angle_x": ..., "frames": [{"file_path": "./train/r_0",
        transforms_val.json                                         "transform_matrix": 4x4 c2w}, ...]}
        transforms_test.json
        train/r_0.png ...       RGBA, straight alpha, background RGB 0 alpha 0
        val/r_0.png ...
        test/r_0.png ...
        synth_config.json       generation settings (written last: marks a complete dataset)
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from PIL import Image

from nerfstudio_splat_ext.synth.renderer import RenderSettings, render_view, to_uint8
from nerfstudio_splat_ext.synth.scene import ProceduralScene, SceneSpec, build_scene

GENERATOR_VERSION = 1
"""Bumped whenever the generated images would change for the same settings."""

CAMERA_ANGLE_X = 0.6911112070083618
"""Horizontal field of view of the cameras (the value of the Blender "lego" scene)."""

SPLITS = ("train", "val", "test")

# Per-split phase of the Fibonacci spiral (irrational multiples of a turn, so splits never coincide).
_SPLIT_PHASE = {"train": 0.0, "val": 0.5 * (math.sqrt(5.0) - 1.0) * math.pi, "test": math.sqrt(2.0) * math.pi}
# Per-split offset of the elevation samples, as a fraction of the spacing between them.
_SPLIT_Z_OFFSET = {"train": 0.5, "val": 0.2, "test": 0.8}


@dataclass
class DatasetSpec:
    """Everything that determines the generated dataset."""

    scene: SceneSpec = field(default_factory=SceneSpec)
    num_train: int = 100
    num_val: int = 10
    num_test: int = 25
    resolution: int = 200
    supersample: int = 2
    camera_radius: float = 4.0
    camera_angle_x: float = CAMERA_ANGLE_X
    min_elevation_deg: float = -20.0
    """Cameras span elevations from this (a few views from below) ..."""
    max_elevation_deg: float = 80.0
    """... up to this (not quite the pole: the look-at frame is degenerate there)."""

    def num_views(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def to_json(self) -> Dict:
        return {
            "generator_version": GENERATOR_VERSION,
            "seed": self.scene.seed,
            "scene": {
                "num_primitives": self.scene.num_primitives,
                "extent": self.scene.extent,
                "blend": self.scene.blend,
                "num_colors": self.scene.num_colors,
            },
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_test": self.num_test,
            "resolution": self.resolution,
            "supersample": self.supersample,
            "camera_radius": self.camera_radius,
            "camera_angle_x": self.camera_angle_x,
            "min_elevation_deg": self.min_elevation_deg,
            "max_elevation_deg": self.max_elevation_deg,
        }


def look_at(position: np.ndarray, target: Optional[np.ndarray] = None, up: Optional[np.ndarray] = None) -> np.ndarray:
    """4x4 camera-to-world matrix (OpenGL: camera looks along -z, y up) at ``position``.

    The camera looks at ``target`` (default: the origin) with its image "up" towards world
    ``up`` (default: +z, as in the Blender scenes).
    """
    position = np.asarray(position, dtype=np.float64)
    target = np.zeros(3) if target is None else np.asarray(target, dtype=np.float64)
    up = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, dtype=np.float64)
    z_axis = position - target  # camera -z points at the target
    z_axis /= np.linalg.norm(z_axis)
    x_axis = np.cross(up, z_axis)
    if np.linalg.norm(x_axis) < 1e-8:  # looking straight up / down
        x_axis = np.cross(np.array([0.0, 1.0, 0.0]), z_axis)
    x_axis /= np.linalg.norm(x_axis)
    y_axis = np.cross(z_axis, x_axis)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x_axis, y_axis, z_axis, position
    return c2w


def camera_positions(
    split: str,
    num: int,
    radius: float = 4.0,
    min_elevation_deg: float = -20.0,
    max_elevation_deg: float = 80.0,
) -> np.ndarray:
    """Deterministic Fibonacci-spiral camera centres (num, 3) on a spherical zone, per split.

    The zone spans the given elevations, i.e. the upper hemisphere plus a band below the
    equator. Heights are uniform in z (equal-area), azimuths advance by the golden angle, and
    each split uses its own azimuth phase and height offset, so train / val / test differ.
    """
    if num <= 0:
        return np.zeros((0, 3))
    z_lo = math.sin(math.radians(min_elevation_deg))
    z_hi = math.sin(math.radians(max_elevation_deg))
    golden_angle = math.pi * (3.0 - math.sqrt(5.0))
    i = np.arange(num, dtype=np.float64)
    z = z_hi - (z_hi - z_lo) * (i + _SPLIT_Z_OFFSET[split]) / num
    phi = _SPLIT_PHASE[split] + golden_angle * i
    rho = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    return radius * np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=-1)


def camera_poses(split: str, spec: DatasetSpec) -> List[np.ndarray]:
    """Camera-to-world matrices of a split."""
    pos = camera_positions(
        split, spec.num_views(split), spec.camera_radius, spec.min_elevation_deg, spec.max_elevation_deg
    )
    return [look_at(p) for p in pos]


def _expected_files(output_dir: Path, spec: DatasetSpec) -> List[Path]:
    files = [output_dir / f"transforms_{s}.json" for s in SPLITS]
    for s in SPLITS:
        files += [output_dir / s / f"r_{i}.png" for i in range(spec.num_views(s))]
    return files


def is_complete(output_dir: Path, spec: DatasetSpec) -> bool:
    """True if ``output_dir`` already holds a complete dataset generated with ``spec``."""
    output_dir = Path(output_dir)
    cfg = output_dir / "synth_config.json"
    if not cfg.is_file():
        return False
    try:
        stored = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    if stored != json.loads(json.dumps(spec.to_json())):
        return False
    return all(p.is_file() for p in _expected_files(output_dir, spec))


def write_split(
    output_dir: Path,
    split: str,
    scene: ProceduralScene,
    spec: DatasetSpec,
    settings: Optional[RenderSettings] = None,
) -> int:
    """Render and write one split. Returns the number of views written."""
    settings = settings or RenderSettings(supersample=spec.supersample)
    (output_dir / split).mkdir(parents=True, exist_ok=True)
    frames = []
    for i, c2w in enumerate(camera_poses(split, spec)):
        img = render_view(
            scene,
            torch.from_numpy(c2w).float(),
            spec.resolution,
            spec.resolution,
            spec.camera_angle_x,
            settings,
        )
        Image.fromarray(to_uint8(img)).save(output_dir / split / f"r_{i}.png")
        frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
    meta = {"camera_angle_x": spec.camera_angle_x, "frames": frames}
    (output_dir / f"transforms_{split}.json").write_text(json.dumps(meta, indent=2))
    return len(frames)


@contextmanager
def _torch_threads(num_threads: Optional[int]) -> Iterator[None]:
    if not num_threads or num_threads <= 0:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_dataset(
    output_dir: Path,
    spec: DatasetSpec,
    overwrite: bool = False,
    log: Optional[Callable[[str], None]] = None,
    num_threads: Optional[int] = 1,
) -> bool:
    """Generate the dataset into ``output_dir``.

    Returns False (and writes nothing) if a complete dataset with the same settings is already
    there and ``overwrite`` is False, True after generating it.

    ``num_threads`` torch threads are used while rendering (None: leave torch's setting). One
    thread is the default: the per-step tensors of the compacted sphere tracer are small, so
    intra-op parallelism gains little, and on a busy machine multi-threaded kernels slow down
    by an order of magnitude.
    """
    with _torch_threads(num_threads), torch.no_grad():
        return _write_dataset(Path(output_dir), spec, overwrite, log)


def _write_dataset(
    output_dir: Path,
    spec: DatasetSpec,
    overwrite: bool,
    log: Optional[Callable[[str], None]],
) -> bool:
    log = log or (lambda msg: None)
    if not overwrite and is_complete(output_dir, spec):
        return False
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = output_dir / "synth_config.json"
    if cfg.exists():  # invalidated until the new dataset is complete
        cfg.unlink()
    for split in SPLITS:
        # remove stale frames of a previous, larger dataset
        split_dir = output_dir / split
        if split_dir.is_dir():
            for old in split_dir.glob("r_*.png"):
                old.unlink()

    scene = build_scene(spec.scene)
    settings = RenderSettings(supersample=spec.supersample)
    for split in SPLITS:
        t0 = time.perf_counter()
        n = write_split(output_dir, split, scene, spec, settings)
        dt = time.perf_counter() - t0
        log(
            f"[splat-ext-synth] {split:5s}: {n} views at {spec.resolution}x{spec.resolution} "
            f"in {dt:.1f} s ({dt / max(n, 1):.2f} s/view)"
        )
    cfg.write_text(json.dumps(spec.to_json(), indent=2))
    return True
