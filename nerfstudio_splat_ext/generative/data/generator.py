"""Procedural multi-object dataset: many seeded objects, each rendered from many views, with surface points.

Every object is a seeded SDF object of :mod:`.shapes` (six shape families, eight primitive kinds,
seven solid textures), normalised to the unit ball, rendered by the analytic sphere tracer of
:mod:`nerfstudio_splat_ext.synth.renderer` (independent of Gaussians) and sampled on its surface.

On-disk layout (``docs/generative_data.md`` has the details)::

    <root>/
        index.json                  format, generator version, render settings, per split: seed range + object ids
        train/<object_id>/          object_id = f"{seed:08d}"
            rgba/000.png .. 023.png     RGBA uint8, straight alpha (alpha = pixel coverage), background RGBA 0
            cameras.json                intrinsics + per-view camera-to-world 4x4 (OpenGL / nerfstudio convention)
            points.npz                  xyz float32 [P,3], rgb float32 [P,3] (albedo), normals float32 [P,3]
        heldout/<object_id>/ ...

Objects are selected by seed: split ``train`` holds seeds ``train_seed_start + [0, num_train)``,
``heldout`` holds ``heldout_seed_start + [0, num_heldout)``; the two ranges must not overlap (checked).
An object depends only on its seed and the render settings, so growing ``num_train`` later adds
objects without changing the existing ones.

Cameras: ``views`` centres on the sphere of radius ``camera_radius`` (default 2.6) around the
origin, all looking at the origin with world +z as image up. The centres follow a Fibonacci spiral
over the zone of elevations ``[min_elevation_deg, max_elevation_deg]`` (default -30..75 degrees),
equal-area in height, with a per-object seeded azimuth phase and height jitter; the view order is
then shuffled (seeded), so view 0 is at a random elevation. Pinhole with horizontal and vertical
FOV ``camera_angle_x`` (default ``2 atan(16/35)`` = 49.13 degrees, the FOV of zero123 / GSO renders)
and the principal point at the image centre. At radius 2.6 the unit ball spans 91% of the image
width, so objects are always fully visible.

Writing is atomic per object (a temporary folder renamed into place) and resumable: objects whose
folder is already there are skipped. Several processes (e.g. one per GPU) can share the work with
``shard_index`` / ``num_shards``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nerfstudio_splat_ext.generative.data.shapes import ObjectScene, build_object, sample_surface
from nerfstudio_splat_ext.synth.renderer import (
    RenderSettings,
    camera_rays,
    focal_from_angle,
    sdf_normals,
    shade,
    sphere_trace,
    to_uint8,
)
from nerfstudio_splat_ext.synth.writer import look_at

FORMAT_NAME = "splat-ext-objects"
FORMAT_VERSION = 1
GENERATOR_VERSION = 1
"""Bumped whenever the generated objects would change for the same settings."""

ZERO123_CAMERA_ANGLE_X = 2.0 * math.atan(16.0 / 35.0)
"""49.13 degrees: Blender camera with a 35 mm lens on a 32 mm sensor, as in zero123's renders (and GSO's)."""

SPLITS = ("train", "heldout")
_CAMERA_SEED_TAG = 0xCA3E7A
_POINTS_SEED_TAG = 0x9017


@dataclass
class ObjectRenderSpec:
    """Everything that changes an object's files for a given seed (stored in ``index.json``)."""

    views: int = 24
    """Views per object."""
    resolution: int = 128
    """Image width and height in pixels."""
    supersample: int = 2
    """Anti-aliasing: s x s rays per pixel (alpha is their coverage)."""
    camera_radius: float = 2.6
    """Distance of every camera centre from the origin."""
    camera_angle_x: float = ZERO123_CAMERA_ANGLE_X
    """Horizontal (= vertical) field of view in radians."""
    min_elevation_deg: float = -30.0
    """Lowest camera elevation above the xy-plane."""
    max_elevation_deg: float = 75.0
    """Highest camera elevation (the look-at frame with up = +z degenerates at the pole)."""
    num_points: int = 8192
    """Surface points saved per object."""
    extent: float = 1.0
    """Objects are normalised so that their farthest surface point is at this distance from the origin."""

    def focal(self) -> float:
        return focal_from_angle(self.resolution, self.camera_angle_x)

    def to_json(self) -> Dict:
        return {"generator_version": GENERATOR_VERSION, **asdict(self)}


@dataclass
class ObjectDatasetSpec:
    """Which objects to generate and how."""

    render: ObjectRenderSpec = field(default_factory=ObjectRenderSpec)
    num_train: int = 2000
    num_heldout: int = 100
    train_seed_start: int = 0
    heldout_seed_start: int = 10_000_000
    """Held-out seeds start far above the training ones, so the training set can grow without overlap."""

    def seeds(self, split: str) -> range:
        if split == "train":
            return range(self.train_seed_start, self.train_seed_start + self.num_train)
        if split == "heldout":
            return range(self.heldout_seed_start, self.heldout_seed_start + self.num_heldout)
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")

    def validate(self) -> None:
        if self.num_train < 0 or self.num_heldout < 0:
            raise ValueError("num_train and num_heldout must be >= 0")
        if min(self.train_seed_start, self.heldout_seed_start) < 0:
            raise ValueError("seeds must be >= 0")
        a, b = self.seeds("train"), self.seeds("heldout")
        if len(a) and len(b) and a.start < b.stop and b.start < a.stop:
            raise ValueError(
                f"train seeds [{a.start}, {a.stop}) overlap held-out seeds [{b.start}, {b.stop}): "
                "move --heldout-seed-start above the training range"
            )
        r = self.render
        if r.views < 1 or r.resolution < 4 or r.supersample < 1 or r.num_points < 1:
            raise ValueError("views, resolution (>= 4), supersample and num_points must be positive")
        if not 0.0 < r.camera_angle_x < math.pi:
            raise ValueError("camera_angle_x must be in (0, pi) radians")
        if r.camera_radius * math.sin(0.5 * r.camera_angle_x) <= r.extent:
            raise ValueError("camera_radius too small: the unit-ball object would not fit in the view")
        if not -90.0 < r.min_elevation_deg < r.max_elevation_deg < 90.0:
            raise ValueError("need -90 < min_elevation_deg < max_elevation_deg < 90")


def object_id(seed: int) -> str:
    return f"{int(seed):08d}"


# ---------------------------------------------------------------------------------------------
# cameras, rendering, points
# ---------------------------------------------------------------------------------------------


def object_camera_poses(seed: int, spec: ObjectRenderSpec) -> np.ndarray:
    """Camera-to-world matrices (views, 4, 4), OpenGL convention, all looking at the origin."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _CAMERA_SEED_TAG]))
    n = int(spec.views)
    z_lo = math.sin(math.radians(spec.min_elevation_deg))
    z_hi = math.sin(math.radians(spec.max_elevation_deg))
    golden_angle = math.pi * (3.0 - math.sqrt(5.0))
    i = np.arange(n, dtype=np.float64)
    z = z_hi - (z_hi - z_lo) * (i + rng.uniform()) / n
    phi = rng.uniform(0.0, 2.0 * math.pi) + golden_angle * i
    rho = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    pos = spec.camera_radius * np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=-1)
    pos = pos[rng.permutation(n)]  # view 0 at a random elevation
    return np.stack([look_at(p) for p in pos])


@torch.no_grad()
def render_views(
    scene: ObjectScene,
    c2ws: Tensor | np.ndarray,
    width: int,
    height: int,
    camera_angle_x: float,
    settings: Optional[RenderSettings] = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Render several views at once; float32 (V, H, W, 4) straight-alpha RGBA on the CPU.

    Same result as :func:`synth.renderer.render_view` per view, but the rays of several views are
    traced together (fewer, larger tensor ops: faster on CPU, much faster on GPU).
    """
    settings = settings or RenderSettings()
    device = torch.device(device)
    c2ws = torch.as_tensor(np.asarray(c2ws) if isinstance(c2ws, np.ndarray) else c2ws, dtype=torch.float32)
    s = max(1, int(settings.supersample))
    focal = focal_from_angle(width, camera_angle_x)
    hit_eps_per_t = settings.hit_pixel_fraction / (focal * s)
    bound = scene.bounding_radius() + 1e-2
    per_view = width * height * s * s
    views_per_chunk = max(1, settings.chunk_size // per_view)
    out = []
    for v0 in range(0, c2ws.shape[0], views_per_chunk):
        rays = [camera_rays(c, width, height, camera_angle_x, s) for c in c2ws[v0 : v0 + views_per_chunk]]
        origins = torch.stack([o for o, _ in rays]).reshape(-1, 3).to(device)
        dirs = torch.stack([d for _, d in rays]).reshape(-1, 3).to(device)
        t, hit = sphere_trace(scene, origins, dirs, settings, hit_eps_per_t, bound)
        rgb = torch.zeros(origins.shape[0], 3, dtype=torch.float32, device=device)
        hidx = torch.nonzero(hit).squeeze(-1)
        if hidx.numel() > 0:
            rgb[hidx] = shade(scene, origins[hidx] + t[hidx, None] * dirs[hidx], settings)
        nv = len(rays)
        rgb = rgb.reshape(nv, height, width, s * s, 3)
        hitf = hit.reshape(nv, height, width, s * s).float()
        count = hitf.sum(-1)
        color = rgb.sum(-2) / count.clamp(min=1.0)[..., None]  # straight colour of the covered part
        out.append(torch.cat([color, (count / (s * s))[..., None]], dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def object_surface_points(
    scene: ObjectScene, seed: int, num_points: int, device: torch.device | str = "cpu"
) -> Dict[str, np.ndarray]:
    """Seeded surface samples: xyz, albedo rgb and unit normals, float32 (num_points, 3) each."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), _POINTS_SEED_TAG]).generate_state(1)[0]))
    xyz = sample_surface(scene, num_points, gen, device=device, band=0.03, radius=scene.bounding_radius())
    rgb = scene.albedo(xyz)
    normals = sdf_normals(scene, xyz, 1e-3)
    return {k: v.float().cpu().numpy() for k, v in (("xyz", xyz), ("rgb", rgb), ("normals", normals))}


# ---------------------------------------------------------------------------------------------
# one object on disk
# ---------------------------------------------------------------------------------------------


def cameras_json(seed: int, split: str, scene: ObjectScene, c2ws: np.ndarray, spec: ObjectRenderSpec) -> Dict:
    f = spec.focal()
    return {
        "format": f"{FORMAT_NAME}/cameras",
        "version": FORMAT_VERSION,
        "object_id": object_id(seed),
        "seed": int(seed),
        "split": split,
        "family": scene.family,
        "primitives": [p.kind for p in scene.primitives],
        "generator_version": GENERATOR_VERSION,
        "convention": "opengl",  # camera-to-world; camera looks along -z, +y up, +x right; world +z up
        "width": spec.resolution,
        "height": spec.resolution,
        "fx": f,
        "fy": f,
        "cx": 0.5 * spec.resolution,
        "cy": 0.5 * spec.resolution,
        "camera_angle_x": spec.camera_angle_x,
        "camera_radius": spec.camera_radius,
        "frames": [{"file_path": f"rgba/{i:03d}.png", "transform_matrix": c2w.tolist()} for i, c2w in enumerate(c2ws)],
    }


def is_object_complete(obj_dir: Path, spec: ObjectRenderSpec) -> bool:
    """True when ``obj_dir`` holds all files of an object (a cheap check: names and counts, not contents)."""
    if not (obj_dir / "cameras.json").is_file() or not (obj_dir / "points.npz").is_file():
        return False
    return all((obj_dir / "rgba" / f"{i:03d}.png").is_file() for i in range(spec.views))


def generate_object(
    seed: int,
    split: str,
    split_dir: Path,
    spec: ObjectRenderSpec,
    device: torch.device | str = "cpu",
) -> Dict:
    """Render one object and move it into ``split_dir / object_id`` atomically. Returns a summary."""
    split_dir = Path(split_dir)
    oid = object_id(seed)
    final = split_dir / oid
    tmp = split_dir / f".tmp-{oid}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "rgba").mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        scene = build_object(seed, extent=spec.extent)
        c2ws = object_camera_poses(seed, spec)
        images = render_views(
            scene,
            torch.from_numpy(c2ws).float(),
            spec.resolution,
            spec.resolution,
            spec.camera_angle_x,
            RenderSettings(supersample=spec.supersample),
            device,
        )
        t_render = time.perf_counter() - t0
        points = object_surface_points(scene, seed, spec.num_points, device)
        for i, img in enumerate(images):
            Image.fromarray(to_uint8(img)).save(tmp / "rgba" / f"{i:03d}.png")
        np.savez(tmp / "points.npz", **points)
        (tmp / "cameras.json").write_text(json.dumps(cameras_json(seed, split, scene, c2ws, spec), indent=1))
        if final.exists():  # incomplete or overwritten: swap it out, then delete it
            trash = split_dir / f".old-{oid}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "object_id": oid,
        "family": scene.family,
        "seconds": time.perf_counter() - t0,
        "render_seconds": t_render,
        "coverage": float(images[..., 3].mean()),
    }


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------


def read_index(root: Path) -> Dict:
    """Parse ``<root>/index.json`` with an error that names the file and the fix."""
    path = Path(root) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a {FORMAT_NAME} dataset (generate one with splat-ext-objects)"
        )
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun splat-ext-objects on {root} to rewrite it") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME or "splits" not in index:
        raise ValueError(
            f"{path} is not a {FORMAT_NAME} index (no 'format': '{FORMAT_NAME}' / 'splits'); rerun splat-ext-objects"
        )
    return index


def _write_json_atomic(path: Path, data: Dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _index_json(spec: ObjectDatasetSpec) -> Dict:
    splits = {}
    for split in SPLITS:
        seeds = spec.seeds(split)
        splits[split] = {"seed_start": seeds.start, "count": len(seeds), "object_ids": [object_id(s) for s in seeds]}
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "settings": spec.render.to_json(), "splits": splits}


def generate_dataset(
    root: Path,
    spec: ObjectDatasetSpec,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    log: Optional[Callable[[str], None]] = None,
    shard_index: int = 0,
    num_shards: int = 1,
    num_threads: Optional[int] = 1,
    splits: Sequence[str] = SPLITS,
) -> Dict:
    """Generate (or complete) the dataset in ``root``; returns counts and timings.

    Complete objects already in ``root`` are skipped unless ``overwrite``. Settings that change the
    objects must match the ``index.json`` already there (else a ValueError says how to proceed);
    the object counts may differ (the index is rewritten with the new counts).

    ``num_threads`` torch threads are used on the CPU (None: leave torch's setting): one is the
    default, as the compacted sphere tracer's per-step tensors are small.
    """
    spec.validate()
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards (got {shard_index}, {num_shards})")
    log = log or (lambda msg: None)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if (root / "index.json").is_file():
        old = read_index(root)
        if old.get("settings") != json.loads(json.dumps(spec.render.to_json())) and not overwrite:
            raise ValueError(
                f"{root / 'index.json'} was written with other render settings ({old.get('settings')}); "
                "use another --output-dir, the same settings, or --overwrite to regenerate every object"
            )
    _write_json_atomic(root / "index.json", _index_json(spec))

    previous_threads = torch.get_num_threads()
    if num_threads and num_threads > 0 and torch.device(device).type == "cpu":
        torch.set_num_threads(num_threads)
    stats = {"generated": 0, "skipped": 0, "seconds": 0.0, "render_seconds": 0.0}
    try:
        todo = [(split, seed) for split in splits for seed in spec.seeds(split)]
        todo = [item for k, item in enumerate(todo) if k % num_shards == shard_index]
        t_start = time.perf_counter()
        for k, (split, seed) in enumerate(todo):
            split_dir = root / split
            split_dir.mkdir(exist_ok=True)
            oid = object_id(seed)
            for stale in split_dir.glob(f".tmp-{oid}-*"):  # left by an interrupted run
                shutil.rmtree(stale, ignore_errors=True)
            if not overwrite and is_object_complete(split_dir / oid, spec.render):
                stats["skipped"] += 1
                continue
            info = generate_object(seed, split, split_dir, spec.render, device)
            stats["generated"] += 1
            stats["seconds"] += info["seconds"]
            stats["render_seconds"] += info["render_seconds"]
            avg = stats["seconds"] / stats["generated"]
            eta = avg * (len(todo) - k - 1)
            log(
                f"[{FORMAT_NAME}] {split} {k + 1}/{len(todo)} {oid} {info['family']:9s} {info['seconds']:.2f} s "
                f"(mean {avg:.2f} s/object, ETA {eta / 60:.1f} min)"
            )
        stats["wall_seconds"] = time.perf_counter() - t_start
    finally:
        torch.set_num_threads(previous_threads)
    return stats


def list_split(root: Path, split: str, require_complete: bool = True) -> List[Path]:
    """Object folders of a split of a generated dataset, in index order.

    Raises with the fix (rerun the generator, which resumes) when objects listed in ``index.json``
    are missing, unless ``require_complete`` is False (then only the present ones are returned).
    """
    root = Path(root)
    index = read_index(root)
    if split not in index["splits"]:
        raise KeyError(f"{root / 'index.json'} has no split {split!r}; it has {sorted(index['splits'])}")
    ids = index["splits"][split]["object_ids"]
    dirs = [root / split / oid for oid in ids]
    present = [d for d in dirs if (d / "cameras.json").is_file()]
    if require_complete and len(present) != len(dirs):
        raise FileNotFoundError(
            f"{root / split}: {len(dirs) - len(present)} of {len(dirs)} objects listed in index.json are missing "
            f"(first: {next(d.name for d in dirs if d not in present)}); run splat-ext-objects again with the same "
            "arguments to finish it (it resumes)"
        )
    return present
