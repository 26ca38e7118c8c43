"""Command line: one image (and optionally its camera) -> 3D Gaussians as an Inria-layout .ply and a turntable.

    splat-ext-image-to-3d --load-config outputs/x/splat-ext-image/run/config.yml --image chair.png --output-dir out
    splat-ext-image-to-3d --load-config <run>/config.yml --image a.png b.png --camera-json cameras.json

Works with any trained run whose model has ``predict_gaussians`` (the teacher ``splat-ext-image`` and the
student ``splat-ext-diffusion``). Only the model is rebuilt from the run's ``config.yml`` and latest checkpoint,
so the training data need not be on this machine.

Camera: without ``--camera-json`` the image is taken to be a view of the generated data's convention: camera
at ``--radius`` (2.6) from the origin at ``--elevation-deg``, looking at the origin with world +z up, horizontal
FOV ``--fov-deg`` (49.13, zero123 / GSO), principal point at the image centre. A camera JSON is either one camera
``{"transform_matrix": 4x4 OpenGL camera-to-world, "fx", "fy", "cx", "cy" | "camera_angle_x", ["width",
"height"]}`` or an object's ``cameras.json`` of the data layer (``frames``: the frame whose file name matches the
image, else ``--view``). Intrinsics are rescaled when the image size differs from the JSON's width / height.

Outputs per image ``<name>.ply`` (x, y, z, nx, ny, nz, f_dc_0..2, opacity (logit), scale_0..2 (log), rot_0..3) and
``<name>_turntable.png`` (``--turntable-views`` renders around the world z axis at the source camera's distance
and elevation, left to right, the source view first). The time per image (prediction of the Gaussians, after
one warm-up run, averaged over ``--repeats`` runs) is printed and written to ``timing.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import tyro
from PIL import Image
from torch import Tensor

from nerfstudio_splat_ext.generative.data.generator import ZERO123_CAMERA_ANGLE_X
from nerfstudio_splat_ext.generative.pixel_gaussians import PixelGaussians, render_pixel_gaussians
from nerfstudio_splat_ext.generative.runs import load_run_model


# ------------------------------------------------------------------------------------------------ cameras
def look_at_c2w(position: Tensor) -> Tensor:
    """OpenGL camera-to-world [4, 4] at ``position`` looking at the origin, image up towards world +z."""
    back = position / position.norm()
    up_world = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype)
    right = torch.linalg.cross(up_world, back)
    if right.norm() < 1e-8:  # straight above / below: any horizontal right vector
        right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype), back)
    right = right / right.norm()
    up = torch.linalg.cross(back, right)
    c2w = torch.eye(4, dtype=position.dtype)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, position
    return c2w


def default_camera(width: int, height: int, radius: float, elevation_deg: float, fov_deg: float) -> Tuple[Tensor, Tensor]:
    """(c2w [4, 4], intrinsics [4]) of the generated data's convention (see the module docstring)."""
    el = math.radians(elevation_deg)
    position = torch.tensor([radius * math.cos(el), 0.0, radius * math.sin(el)], dtype=torch.float64)
    focal = 0.5 * width / math.tan(0.5 * math.radians(fov_deg))
    return look_at_c2w(position).float(), torch.tensor([focal, focal, 0.5 * width, 0.5 * height])


def camera_from_json(path: Path, image: Path, width: int, height: int, view: int) -> Tuple[Tensor, Tensor]:
    """(c2w [4, 4], intrinsics [4]) from a camera JSON (see the module docstring)."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the camera JSON ({err})") from err
    cam = meta
    if "frames" in meta:
        frames = meta["frames"]
        names = [Path(str(f.get("file_path", ""))).stem for f in frames]
        index = names.index(image.stem) if image.stem in names else view
        if not 0 <= index < len(frames):
            raise ValueError(f"{path}: --view {index} but the file has {len(frames)} frames")
        cam = {**meta, **frames[index]}
    if "transform_matrix" not in cam:
        raise ValueError(f"{path}: needs 'transform_matrix' (4x4 OpenGL camera-to-world) or a 'frames' list")
    c2w = torch.tensor(cam["transform_matrix"], dtype=torch.float32)
    if c2w.shape != (4, 4):
        raise ValueError(f"{path}: transform_matrix must be 4x4, got {tuple(c2w.shape)}")
    src_w, src_h = float(cam.get("width", width)), float(cam.get("height", height))
    if all(k in cam for k in ("fx", "fy")):
        fx, fy = float(cam["fx"]), float(cam["fy"])
        cx, cy = float(cam.get("cx", 0.5 * src_w)), float(cam.get("cy", 0.5 * src_h))
    elif "camera_angle_x" in cam:
        fx = fy = 0.5 * src_w / math.tan(0.5 * float(cam["camera_angle_x"]))
        cx, cy = 0.5 * src_w, 0.5 * src_h
    else:
        raise ValueError(f"{path}: needs intrinsics: 'fx', 'fy' (and 'cx', 'cy') in pixels, or 'camera_angle_x'")
    sx, sy = width / src_w, height / src_h  # the JSON may describe the image at another resolution
    return c2w, torch.tensor([fx * sx, fy * sy, cx * sx, cy * sy], dtype=torch.float32)


def turntable_cameras(c2w: Tensor, num_views: int) -> Tensor:
    """[num_views, 4, 4]: the source camera's position rotated about the world z axis in equal steps (first: the
    source position), each looking at the origin."""
    pos = c2w[:3, 3].double()
    out = []
    for i in range(num_views):
        a = 2.0 * math.pi * i / num_views
        rot = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]],
                           dtype=torch.float64)
        out.append(look_at_c2w(rot @ pos))
    return torch.stack(out).float()


# ------------------------------------------------------------------------------------------------ outputs
def load_image(path: Path, background: Tensor, resolution: Optional[int]) -> Tensor:
    """[H, W, 3] float in [0, 1], RGBA composited on ``background``; resized to ``resolution`` if given."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    img = Image.open(path).convert("RGBA")
    if resolution is not None and img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    rgba = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + background.float().cpu() * (1.0 - alpha)


def write_ply(gaussians: PixelGaussians, path: Path, b: int = 0) -> int:
    """Writes item ``b`` as an Inria 3DGS binary .ply; returns the number of Gaussians."""
    from plyfile import PlyData, PlyElement

    arrays = gaussians.to_ply_arrays(b)
    n = len(next(iter(arrays.values())))
    vertex = np.empty(n, dtype=[(name, "f4") for name in arrays])
    for name, values in arrays.items():
        vertex[name] = values
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    return n


@dataclass
class ImageTo3DConfig:
    """One image -> 3D Gaussians (.ply) and a turntable render, with a model trained by splat-ext-image (or the
    diffusion student)."""

    load_config: Path
    """config.yml of the trained run."""
    image: List[Path]
    """Input image(s) (PNG; RGBA is composited on the model's background)."""
    output_dir: Path = Path("image-to-3d")
    camera_json: Optional[Path] = None
    """Camera of the image(s) (see the module docstring); default: the generated data's convention."""
    view: int = 0
    """Frame of a cameras.json with frames, when no frame's file name matches the image."""
    checkpoint: Optional[Path] = None
    """Checkpoint to load (default: the run's latest)."""
    resolution: Optional[int] = None
    """Resize the image(s) to this square size first (e.g. the training resolution)."""
    radius: float = 2.6
    elevation_deg: float = 20.0
    fov_deg: float = math.degrees(ZERO123_CAMERA_ANGLE_X)
    turntable_views: int = 8
    repeats: int = 5
    """Timed predictions per image (after one warm-up)."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: ImageTo3DConfig) -> Dict:
    device = torch.device(cfg.device)
    model = load_run_model(cfg.load_config, cfg.checkpoint, cfg.device)
    background = getattr(model, "background", torch.ones(3)).to(device)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for image_path in cfg.image:
        rgb = load_image(image_path, background, cfg.resolution)
        h, w = rgb.shape[:2]
        if cfg.camera_json is not None:
            c2w, intr = camera_from_json(cfg.camera_json, Path(image_path), w, h, cfg.view)
        else:
            c2w, intr = default_camera(w, h, cfg.radius, cfg.elevation_deg, cfg.fov_deg)
        src, c2w, intr = rgb[None].to(device), c2w[None].to(device), intr[None].to(device)
        with torch.no_grad():
            gaussians = model.predict_gaussians(src, c2w, intr)  # warm-up (kernels, caches)
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(max(1, cfg.repeats)):
                gaussians = model.predict_gaussians(src, c2w, intr)
            _synchronize(device)
            ms = 1000.0 * (time.perf_counter() - start) / max(1, cfg.repeats)
            ring = turntable_cameras(c2w[0].cpu(), cfg.turntable_views).to(device)
            frames, _ = render_pixel_gaussians(
                gaussians,
                ring[None],
                intr[:, None].expand(1, cfg.turntable_views, 4),
                w,
                h,
                background,
                backend=getattr(model.config, "render_backend", "auto"),
                reference_tile_size=getattr(model.config, "reference_tile_size", 1),
            )
        stem = Path(image_path).stem
        ply = cfg.output_dir / f"{stem}.ply"
        n = write_ply(gaussians, ply)
        strip = torch.cat(list(frames[0].clamp(0, 1)), dim=1)  # [H, V * W, 3]
        turntable = cfg.output_dir / f"{stem}_turntable.png"
        Image.fromarray((strip.cpu().numpy() * 255.0 + 0.5).astype(np.uint8)).save(turntable)
        print(f"{image_path}: {n} Gaussians -> {ply}, turntable {turntable}; {ms:.2f} ms per image on {device}")
        results.append({"image": str(image_path), "ply": str(ply), "turntable": str(turntable), "gaussians": n,
                        "ms_per_image": ms})
    mean_ms = float(np.mean([r["ms_per_image"] for r in results]))
    summary = {"device": str(device), "repeats": cfg.repeats, "ms_per_image": mean_ms, "images": results}
    (cfg.output_dir / "timing.json").write_text(json.dumps(summary, indent=2))
    print(f"time per image: {mean_ms:.2f} ms (mean over {len(results)} image(s), {cfg.repeats} runs each, {device})")
    return summary


def entrypoint() -> None:
    run(tyro.cli(ImageTo3DConfig))


if __name__ == "__main__":
    entrypoint()
