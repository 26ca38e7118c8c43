"""`splat-ext-llff`: forward-facing LLFF scenes (`poses_bounds.npy` + `images/`, `images_4/`, `images_8/` ...).

`poses_bounds.npy` holds one row of 17 numbers per image (in the order of the sorted image file names): the first
15 reshape to a 3x5 matrix, a 3x4 camera-to-world matrix in LLFF's [down, right, back] axis order followed by the
column [H, W, focal] at the original (full) resolution; the last 2 are the near / far depth bounds of the view.

The parser follows NeRF's LLFF loader:
  * axes: [down, right, back] -> nerfstudio / OpenGL [right, up, back], i.e. new columns = [col1, -col0, col2];
  * intrinsics: the focal length is rescaled to the images actually on disk (focal * W_disk / W_orig), the
    principal point is the image centre;
  * recentring (center_poses): the average pose becomes the identity;
  * scaling (scale_by_near_bound): sc = scene_scale / (near_min * 0.75), so the nearest bound maps to ~1/0.75,
    applied to the translations and the bounds;
  * hold-out: images whose index i satisfies i % hold_out_every == 0 are the test / val views, the rest train.

The scene box encloses the camera centres and the points at the near and far bounds on each camera's optical axis
(a forward-facing scene lies in front of the cameras), padded by 10%. When the scene folder holds the COLMAP model the
poses came from (`sparse/0/points3D.bin` or `.txt`), its points seed splat-ext (random init in a box of a
forward-facing scene wastes most Gaussians); LLFF poses keep COLMAP's world frame, so the points take the same
recentring and scaling as the cameras.
Missing files end the command with one line naming the path and the fix (DatasetError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple, Type

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox

from nerfstudio_splat_ext.dataparsers.splat_ext_dataparser import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class LLFFDataParserConfig(DataParserConfig):
    """Forward-facing LLFF data: poses_bounds.npy and images_N folders (NeRF's 'nerf_llff_data' layout)."""

    _target: Type = field(default_factory=lambda: LLFFDataParser)
    data: Path = Path("data/nerf_llff_data/fern")
    """Scene folder holding poses_bounds.npy and the images folders."""
    downscale_factor: int = 8
    """Use the images_N folder (N = downscale_factor), or images/ when 1."""
    hold_out_every: int = 8
    """Every hold_out_every-th image (index % hold_out_every == 0) is a test/val image; the rest train."""
    scale_by_near_bound: bool = True
    """Rescale the scene so that the nearest depth bound maps to ~1/0.75 (NeRF's LLFF convention)."""
    scene_scale: float = 1.0
    """Extra factor multiplied into the scale (1.0: NeRF's scale)."""
    center_poses: bool = True
    """Recentre the poses so that the average camera pose is the identity."""
    load_sfm_points: bool = True
    """Seed points from sparse/0/points3D.(bin|txt) when present (splat-ext initialises from them)."""


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def llff_to_opengl(c2w_llff: np.ndarray) -> np.ndarray:
    """[..., 3, 4] camera-to-world with columns [down, right, back, t] -> columns [right, up, back, t]."""
    return np.concatenate([c2w_llff[..., 1:2], -c2w_llff[..., 0:1], c2w_llff[..., 2:3], c2w_llff[..., 3:4]], axis=-1)


def average_pose(c2w: np.ndarray) -> np.ndarray:
    """NeRF's poses_avg: mean centre, mean viewing (z) axis, mean up (y) axis, orthonormalised. Returns 3x4."""
    centre = c2w[:, :3, 3].mean(0)
    z = _normalize(c2w[:, :3, 2].sum(0))
    up = c2w[:, :3, 1].sum(0)
    x = _normalize(np.cross(up, z))
    y = _normalize(np.cross(z, x))
    return np.stack([x, y, z, centre], axis=1)


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class LLFFDataParser(DataParser):
    """Parses LLFF scenes; see the module docstring."""

    config: LLFFDataParserConfig

    def _locate(self) -> Tuple[Path, Path]:
        root = Path(self.config.data)
        if root.is_file() and root.name == "poses_bounds.npy":
            root = root.parent
        poses_file = root / "poses_bounds.npy"
        if not poses_file.is_file():
            raise DatasetError(
                f"{poses_file}: not found; an LLFF scene folder needs poses_bounds.npy (N x 17, e.g. from LLFF's "
                f"imgs2poses.py) beside its images folders - check --data"
            )
        factor = int(self.config.downscale_factor)
        if factor < 1:
            raise DatasetError(f"downscale_factor must be >= 1, got {factor}")
        folder = root / ("images" if factor == 1 else f"images_{factor}")
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("images"))
            options = []
            for name in present:
                suffix = name[len("images"):]
                if suffix == "":
                    options.append("images (--downscale-factor 1)")
                elif suffix.startswith("_") and suffix[1:].isdigit():
                    options.append(f"{name} (--downscale-factor {suffix[1:]})")
            hint = ", ".join(options) if options else "none"
            raise DatasetError(
                f"{folder}: image folder not found for downscale_factor={factor}; available: {hint} - pass a matching "
                f"--downscale-factor or create {folder.name}/ by downscaling the images"
            )
        return poses_file, folder

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        poses_file, folder = self._locate()
        try:
            raw = np.load(poses_file)
        except Exception as err:  # noqa: BLE001 - any failure to read the file ends with one line
            raise DatasetError(f"{poses_file}: cannot be read as a numpy array ({err})") from None
        if raw.ndim != 2 or raw.shape[1] != 17 or raw.shape[0] == 0:
            raise DatasetError(f"{poses_file}: expected an N x 17 array (3x5 pose-hwf + near/far per image), found shape {tuple(raw.shape)}")
        raw = raw.astype(np.float64)
        num = raw.shape[0]
        files = _image_files(folder)
        if len(files) != num:
            raise DatasetError(
                f"{folder}: has {len(files)} images but {poses_file.name} has {num} poses; the folder must hold exactly "
                f"one image per pose (same order as the sorted file names)"
            )

        mats = raw[:, :15].reshape(num, 3, 5)
        hwf = mats[:, :, 4]  # [N, 3]: H, W, focal at the original resolution
        bounds = raw[:, 15:17].copy()  # [N, 2] near, far
        c2w = llff_to_opengl(mats[:, :, :4])  # [N, 3, 4]

        # intrinsics at the resolution on disk
        from PIL import Image

        with Image.open(files[0]) as im:
            width, height = im.size
        w_orig = hwf[0, 1]
        focal = hwf[:, 2] * (width / w_orig)

        # recentring: world' = inv(avg) @ world
        transform = np.eye(4)
        if self.config.center_poses:
            avg = np.eye(4)
            avg[:3, :] = average_pose(c2w)
            transform = np.linalg.inv(avg)
        c2w_h = np.tile(np.eye(4), (num, 1, 1))
        c2w_h[:, :3, :] = c2w
        c2w = (transform @ c2w_h)[:, :3, :]

        # scaling from the near bound
        scale = float(self.config.scene_scale)
        if self.config.scale_by_near_bound:
            scale = scale / (float(bounds.min()) * 0.75)
        c2w[:, :3, 3] *= scale
        bounds = bounds * scale

        # scene box: camera centres and the points at the near / far bounds on each optical axis, padded by 10%
        centres = c2w[:, :3, 3]
        forward = -c2w[:, :3, 2]  # OpenGL cameras look along -z
        pts = np.concatenate([centres, centres + bounds[:, :1] * forward, centres + bounds[:, 1:] * forward], axis=0)
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.1 * (hi - lo)
        scene_box = SceneBox(aabb=torch.tensor(np.stack([lo - pad, hi + pad]), dtype=torch.float32))

        # split
        every = int(self.config.hold_out_every)
        all_idx = np.arange(num)
        if every <= 0:
            held = np.zeros(num, dtype=bool)
        else:
            held = all_idx % every == 0
        if split == "train":
            indices = all_idx[~held] if held.sum() < num else all_idx
        elif split in ("val", "test"):
            indices = all_idx[held] if held.any() else all_idx
        else:
            raise ValueError(f"unknown dataparser split {split!r}")

        sel = torch.from_numpy(indices)
        focal_t = torch.tensor(focal, dtype=torch.float32)[sel, None]
        cameras = Cameras(
            camera_to_worlds=torch.tensor(c2w, dtype=torch.float32)[sel],
            fx=focal_t,
            fy=focal_t.clone(),
            cx=torch.full_like(focal_t, width / 2.0),
            cy=torch.full_like(focal_t, height / 2.0),
            width=torch.full((len(indices), 1), width, dtype=torch.long),
            height=torch.full((len(indices), 1), height, dtype=torch.long),
            camera_type=CameraType.PERSPECTIVE,
        )
        metadata = {"near_far": torch.tensor(bounds[indices], dtype=torch.float32)}
        if self.config.load_sfm_points:
            metadata.update(self._sfm_points(transform, scale))
        return DataparserOutputs(
            image_filenames=[files[i] for i in indices],
            cameras=cameras,
            alpha_color=None,
            scene_box=scene_box,
            dataparser_scale=scale,
            dataparser_transform=torch.tensor(transform[:3, :], dtype=torch.float32),
            metadata=metadata,
        )

    def _sfm_points(self, transform: np.ndarray, scale: float) -> dict:
        """points3D_xyz / points3D_rgb (the keys splatfacto-style models read) in the parser's frame, or {}."""
        from nerfstudio.data.utils import colmap_parsing_utils as colmap_io

        sparse = Path(self.config.data) / "sparse" / "0"
        try:
            if (sparse / "points3D.bin").exists():
                points = colmap_io.read_points3D_binary(sparse / "points3D.bin")
            elif (sparse / "points3D.txt").exists():
                points = colmap_io.read_points3D_text(sparse / "points3D.txt")
            else:
                return {}
        except Exception as err:  # noqa: BLE001 - a broken file names itself and the way out
            raise DatasetError(
                f"{sparse}: cannot read the COLMAP points ({err}); fix or remove the file, or pass --load-sfm-points False"
            ) from None
        if not points:
            return {}
        xyz = np.stack([p.xyz for p in points.values()]).astype(np.float64)
        rgb = np.stack([p.rgb for p in points.values()]).astype(np.uint8)
        xyz = (transform[:3, :3] @ xyz.T + transform[:3, 3:4]).T * scale
        return {"points3D_xyz": torch.tensor(xyz, dtype=torch.float32), "points3D_rgb": torch.from_numpy(rgb)}
