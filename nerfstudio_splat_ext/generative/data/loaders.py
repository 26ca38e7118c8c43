"""Loaders of multi-view object datasets into one in-memory structure, :class:`ObjectViews`.

Supported layouts (``format=`` argument; ``"auto"`` detects it from the files):

``splat-ext-objects`` (ours, :mod:`.generator`)
    ``<object>/cameras.json`` (fx, fy, cx, cy, width, height, frames[file_path, transform_matrix =
    OpenGL camera-to-world]), ``<object>/rgba/NNN.png``, ``<object>/points.npz`` (xyz, rgb, normals).

``srn`` (ShapeNet-SRN cars / chairs of Sitzmann et al., as read by pixelNeRF and Splatter Image)
    ``<object>/rgb/000000.png ..`` and ``<object>/pose/000000.txt ..`` matched by file stem, and
    ``<object>/intrinsics.txt``. Assumed, as in SRN's ``data_util.parse_intrinsics``:

    - ``intrinsics.txt`` line 1 ``f cx cy 0`` (pixels, so ``fx = fy = f``), line 2 the grid
      barycentre, line 3 a scale / near plane, line 4 ``height width`` of the resolution that
      ``f, cx, cy`` refer to (if it differs from the PNGs, the intrinsics are rescaled to the PNG
      size), optional line 5 ``1`` when the poses are world-to-camera (default: camera-to-world);
    - each pose file holds 16 numbers (a 4x4 matrix, row-major, any line breaks; 12 = 3x4 also
      accepted) in the OpenCV camera convention (``+x`` right, ``+y`` down, ``+z`` forward). It is
      converted to OpenGL by ``c2w_gl = c2w_cv @ diag(1, -1, -1, 1)`` (as pixelNeRF does);
    - the images are RGB on a white background (RGBA PNGs use their alpha): alpha is 0 where a
      pixel is pure white (255, 255, 255), else 1.

``blender`` (one NeRF-synthetic-style folder per object)
    ``<object>/transforms.json`` with ``camera_angle_x`` (or nerfstudio's ``fl_x``/``fl_y``/``cx``/
    ``cy``) and ``frames[file_path, transform_matrix]`` (OpenGL camera-to-world; ``file_path``
    relative to the folder, ``.png`` appended when it has no extension). RGBA images.

``gso`` (zero123 / EscherNet renders, e.g. ``../shared/data/gso_elephant``)
    ``render_mvs_25/model/NNN.png`` (RGBA, straight alpha) with ``NNN.npy``: 3x4 float64
    world-to-camera ``[R|t]`` in the Blender camera convention (looks along ``-z``, ``+y`` up, i.e.
    OpenGL): ``c2w = [R^T | -R^T t]``. The intrinsics are not stored: zero123's Blender script uses
    a 35 mm lens on a 32 mm sensor, so the FOV is ``2 atan(16/35)`` = 49.13 degrees (horizontal =
    vertical for square images) with the principal point at the centre. This is checked in the tests
    by visual-hull consistency: a hull carved from views 0-9 with this FOV re-projects onto the
    masks of views 10-24 with a clearly higher IoU than with 39.6 or 60 degrees.

All cameras are returned as OpenGL camera-to-world matrices (nerfstudio convention: the camera looks
along its ``-z``, ``+y`` up, ``+x`` right) with pinhole intrinsics in pixels, the pixel ``(i, j)``
covering ``[i, i+1] x [j, j+1]`` (so ``cx = W/2`` is the image centre).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from nerfstudio_splat_ext.generative.data.generator import ZERO123_CAMERA_ANGLE_X

Format = Literal["auto", "splat-ext-objects", "srn", "blender", "gso"]
FORMATS: Tuple[str, ...] = ("splat-ext-objects", "srn", "blender", "gso")

GSO_CAMERA_ANGLE_X = ZERO123_CAMERA_ANGLE_X
"""Assumed FOV of the zero123 / EscherNet GSO renders (35 mm lens, 32 mm sensor): 49.13 degrees."""

OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])
"""Right-multiplying a camera-to-world matrix by this flips the camera's y and z axes (OpenCV <-> OpenGL)."""


# ---------------------------------------------------------------------------------------------
# in-memory structures
# ---------------------------------------------------------------------------------------------


@dataclass
class ObjectViews:
    """Posed views of one object (all tensors on the same device)."""

    images: Tensor
    """[V, H, W, 4] float32 in [0, 1]: straight (not premultiplied) RGB and alpha = coverage / mask."""
    c2w: Tensor
    """[V, 4, 4] float32 camera-to-world, OpenGL convention (camera looks along -z, +y up)."""
    intrinsics: Tensor
    """[V, 4] float32 ``fx, fy, cx, cy`` in pixels."""
    object_id: str = ""
    source_format: str = ""
    points: Optional[Tensor] = None
    """[P, 3] float32 surface points (world), when the dataset has them."""
    point_rgb: Optional[Tensor] = None
    """[P, 3] float32 albedo of the points in [0, 1]."""
    view_indices: Optional[Tensor] = None
    """[V] long: indices of these views among the object's views on disk."""
    metadata: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[-1] != 4:
            raise ValueError(f"images must be [V, H, W, 4], got {tuple(self.images.shape)}")
        if tuple(self.c2w.shape) != (v, 4, 4):
            raise ValueError(f"c2w must be [{v}, 4, 4], got {tuple(self.c2w.shape)}")
        if tuple(self.intrinsics.shape) != (v, 4):
            raise ValueError(f"intrinsics must be [{v}, 4], got {tuple(self.intrinsics.shape)}")

    @property
    def num_views(self) -> int:
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def to(self, device: torch.device | str) -> "ObjectViews":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            images=self.images.to(device),
            c2w=self.c2w.to(device),
            intrinsics=self.intrinsics.to(device),
            points=move(self.points),
            point_rgb=move(self.point_rgb),
            view_indices=move(self.view_indices),
        )

    def select(self, indices: Sequence[int] | Tensor) -> "ObjectViews":
        idx = torch.as_tensor(indices, dtype=torch.long)
        base = self.view_indices if self.view_indices is not None else torch.arange(self.num_views)
        return replace(
            self,
            images=self.images[idx.to(self.images.device)],
            c2w=self.c2w[idx.to(self.c2w.device)],
            intrinsics=self.intrinsics[idx.to(self.intrinsics.device)],
            view_indices=base[idx.to(base.device)],
        )

    def composite(self, background: Sequence[float] | Tensor = (1.0, 1.0, 1.0)) -> Tensor:
        """[V, H, W, 3] RGB over a constant background colour."""
        bg = torch.as_tensor(background, dtype=self.images.dtype, device=self.images.device)
        a = self.images[..., 3:]
        return self.images[..., :3] * a + bg * (1.0 - a)


@dataclass
class ObjectCameras:
    """The cameras of one object and where its images are (no pixels loaded)."""

    c2w: Tensor
    """[V, 4, 4] float32, OpenGL convention."""
    intrinsics: Tensor
    """[V, 4] float32 fx, fy, cx, cy (pixels, at the image resolution)."""
    width: int
    height: int
    image_paths: List[Path]
    object_id: str
    source_format: str
    points_path: Optional[Path] = None
    alpha_from_white: bool = False
    """True for RGB images on a white background (SRN): alpha = not pure white."""

    @property
    def num_views(self) -> int:
        return len(self.image_paths)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def read_rgba(path: Path, alpha_from_white: bool = False) -> np.ndarray:
    """An image as uint8 [H, W, 4]; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} is missing; re-download / re-generate this object")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):  # 16-bit greyscale
                arr = (np.asarray(im, dtype=np.float64) / 257.0).round().astype(np.uint8)
                im = Image.fromarray(arr)
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            rgba = np.asarray(im.convert("RGBA"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {path} ({e}); the file is corrupt: re-download / re-generate it") from e
    if not has_alpha and alpha_from_white:
        rgba = rgba.copy()
        rgba[..., 3] = np.where((rgba[..., :3] == 255).all(-1), 0, 255)
    return rgba


def _read_json(path: Path, what: str) -> Dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a {what} object folder")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-generate / re-download this object") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _matrix(value, path: Path, where: str, shape: Tuple[int, int] = (4, 4)) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {where} is not a numeric matrix ({e})") from e
    if m.shape != shape or not np.isfinite(m).all():
        raise ValueError(f"{path}: {where} must be a finite {shape[0]}x{shape[1]} matrix, got shape {m.shape}")
    return m


def _image_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} is missing; re-download / re-generate this object") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {path} ({e}); the file is corrupt: re-download / re-generate it") from e


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem)]


# ---------------------------------------------------------------------------------------------
# per-format camera readers
# ---------------------------------------------------------------------------------------------


def _cameras_generated(obj_dir: Path) -> ObjectCameras:
    path = obj_dir / "cameras.json"
    meta = _read_json(path, "splat-ext-objects")
    try:
        w, h = int(meta["width"]), int(meta["height"])
        k = [float(meta[key]) for key in ("fx", "fy", "cx", "cy")]
        frames = meta["frames"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: missing or bad key {e}; needs width, height, fx, fy, cx, cy, frames") from e
    if not frames:
        raise ValueError(f"{path} lists no frames")
    c2w = np.stack(
        [_matrix(f.get("transform_matrix"), path, f"frames[{i}].transform_matrix") for i, f in enumerate(frames)]
    )
    paths = [obj_dir / f["file_path"] for f in frames]
    points = obj_dir / "points.npz"
    return ObjectCameras(
        torch.from_numpy(c2w).float(),
        torch.tensor([k] * len(frames), dtype=torch.float32),
        w,
        h,
        paths,
        str(meta.get("object_id", obj_dir.name)),
        "splat-ext-objects",
        points if points.is_file() else None,
    )


def _read_srn_intrinsics(path: Path) -> Tuple[float, float, float, Optional[Tuple[int, int]], bool]:
    """(f, cx, cy, (height, width) or None, poses_are_world2cam) of an SRN ``intrinsics.txt``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an SRN object folder needs intrinsics.txt (first line 'f cx cy 0')")
    lines = [ln.split() for ln in path.read_text().splitlines()]
    try:
        f, cx, cy = (float(v) for v in lines[0][:3])
    except (IndexError, ValueError) as e:
        raise ValueError(
            f"{path}: first line must be 'f cx cy 0' (pixels), got {lines[0] if lines else 'nothing'}"
        ) from e
    size = None
    if len(lines) >= 4 and len(lines[3]) >= 2:
        try:
            size = (int(float(lines[3][0])), int(float(lines[3][1])))
        except ValueError:
            size = None
    world2cam = False
    if len(lines) >= 5 and lines[4]:
        try:
            world2cam = bool(int(float(lines[4][0])))
        except ValueError:
            world2cam = False
    return f, cx, cy, size, world2cam


def _read_srn_pose(path: Path) -> np.ndarray:
    try:
        vals = np.array([float(v) for v in path.read_text().split()], dtype=np.float64)
    except ValueError as e:
        raise ValueError(
            f"{path}: a pose file must hold 16 numbers (4x4 camera-to-world, OpenCV convention): {e}"
        ) from e
    if vals.size == 12:
        vals = np.concatenate([vals, [0.0, 0.0, 0.0, 1.0]])
    if vals.size != 16 or not np.isfinite(vals).all():
        raise ValueError(f"{path}: a pose file must hold 16 finite numbers (4x4 matrix), found {vals.size}")
    return vals.reshape(4, 4)


def _cameras_srn(obj_dir: Path) -> ObjectCameras:
    rgb_dir, pose_dir = obj_dir / "rgb", obj_dir / "pose"
    for d in (rgb_dir, pose_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found: an SRN object folder has rgb/*.png, pose/*.txt and intrinsics.txt")
    images = sorted(rgb_dir.glob("*.png"), key=_natural_key)
    if not images:
        raise FileNotFoundError(f"{rgb_dir} holds no .png images")
    poses = []
    for img in images:
        pose = pose_dir / f"{img.stem}.txt"
        if not pose.is_file():
            raise FileNotFoundError(f"{pose} is missing (every rgb/{img.name} needs pose/{img.stem}.txt)")
        poses.append(_read_srn_pose(pose))
    f, cx, cy, size, world2cam = _read_srn_intrinsics(obj_dir / "intrinsics.txt")
    w, h = _image_size(images[0])
    if size is not None and (size[0] != h or size[1] != w):
        # intrinsics given for another resolution (SRN's data_util rescales the same way)
        sx, sy = w / size[1], h / size[0]
        f, cx, cy = f * sy, cx * sx, cy * sy
    c2w = np.stack(poses)
    if world2cam:
        c2w = np.linalg.inv(c2w)
    c2w = c2w @ OPENCV_TO_OPENGL
    k = torch.tensor([[f, f, cx, cy]] * len(images), dtype=torch.float32)
    return ObjectCameras(torch.from_numpy(c2w).float(), k, w, h, images, obj_dir.name, "srn", alpha_from_white=True)


def _cameras_blender(obj_dir: Path, transforms_name: str = "transforms.json") -> ObjectCameras:
    path = obj_dir / transforms_name
    meta = _read_json(path, "Blender-format")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise ValueError(f"{path}: needs a non-empty 'frames' list of {{file_path, transform_matrix}}")
    images, c2w = [], []
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
            raise ValueError(f"{path}: frames[{i}] needs 'file_path' and 'transform_matrix'")
        p = obj_dir / fr["file_path"]
        if not p.suffix:
            p = p.with_name(p.name + ".png")
        images.append(p)
        c2w.append(_matrix(fr["transform_matrix"], path, f"frames[{i}].transform_matrix"))
    w, h = _image_size(images[0])
    try:
        if "fl_x" in meta:
            fx = float(meta["fl_x"])
            fy = float(meta.get("fl_y", fx))
        elif "camera_angle_x" in meta:
            fx = 0.5 * w / math.tan(0.5 * float(meta["camera_angle_x"]))
            fy = 0.5 * h / math.tan(0.5 * float(meta["camera_angle_y"])) if "camera_angle_y" in meta else fx
        else:
            raise ValueError("needs 'camera_angle_x' (radians) or 'fl_x'")
        cx, cy = float(meta.get("cx", 0.5 * w)), float(meta.get("cy", 0.5 * h))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad intrinsics ({e})") from e
    k = torch.tensor([[fx, fy, cx, cy]] * len(images), dtype=torch.float32)
    return ObjectCameras(torch.from_numpy(np.stack(c2w)).float(), k, w, h, images, obj_dir.name, "blender")


def _gso_view_dir(path: Path) -> Path:
    for cand in (path / "render_mvs_25" / "model", path / "model", path):
        if cand.is_dir() and any(cand.glob("*.npy")):
            return cand
    raise FileNotFoundError(f"{path}: no render_mvs_25/model/*.png + *.npy views found (zero123 / GSO layout)")


def _cameras_gso(obj_dir: Path, camera_angle_x: float = GSO_CAMERA_ANGLE_X) -> ObjectCameras:
    view_dir = _gso_view_dir(obj_dir)
    images = sorted(view_dir.glob("*.png"), key=_natural_key)
    if not images:
        raise FileNotFoundError(f"{view_dir} holds no .png views")
    c2w = []
    for img in images:
        npy = img.with_suffix(".npy")
        if not npy.is_file():
            raise FileNotFoundError(
                f"{npy} is missing (every view {img.name} needs its 3x4 world-to-camera {npy.name})"
            )
        try:
            w2c = _matrix(np.load(npy), npy, "the pose", (3, 4))
        except (OSError, ValueError) as e:
            raise ValueError(f"{npy}: cannot read a 3x4 world-to-camera matrix ({e})") from e
        rot, t = w2c[:, :3], w2c[:, 3]
        m = np.eye(4)
        m[:3, :3] = rot.T
        m[:3, 3] = -rot.T @ t
        c2w.append(m)  # Blender camera axes = OpenGL: no flip
    w, h = _image_size(images[0])
    fx = 0.5 * w / math.tan(0.5 * camera_angle_x)
    k = torch.tensor([[fx, fx, 0.5 * w, 0.5 * h]] * len(images), dtype=torch.float32)  # square pixels
    name = obj_dir.name if view_dir != obj_dir else obj_dir.parent.name
    return ObjectCameras(torch.from_numpy(np.stack(c2w)).float(), k, w, h, images, name, "gso")


def detect_format(obj_dir: Path) -> str:
    """The layout of an object folder (see the module docstring)."""
    obj_dir = Path(obj_dir)
    if not obj_dir.is_dir():
        raise FileNotFoundError(f"object folder {obj_dir} does not exist")
    if (obj_dir / "cameras.json").is_file():
        return "splat-ext-objects"
    if (obj_dir / "transforms.json").is_file():
        return "blender"
    if (obj_dir / "rgb").is_dir() and (obj_dir / "pose").is_dir():
        return "srn"
    try:
        _gso_view_dir(obj_dir)
        return "gso"
    except FileNotFoundError:
        pass
    raise ValueError(
        f"{obj_dir}: cannot tell the dataset layout: expected cameras.json (splat-ext-objects), transforms.json "
        "(Blender), rgb/ + pose/ + intrinsics.txt (SRN) or render_mvs_25/model/*.png + *.npy (GSO / zero123)"
    )


def read_cameras(
    obj_dir: Path, format: Format = "auto", gso_camera_angle_x: float = GSO_CAMERA_ANGLE_X
) -> ObjectCameras:
    """Cameras and image paths of an object folder, without decoding images."""
    obj_dir = Path(obj_dir)
    if not obj_dir.is_dir():
        raise FileNotFoundError(f"object folder {obj_dir} does not exist")
    fmt = detect_format(obj_dir) if format == "auto" else format
    if fmt == "splat-ext-objects":
        return _cameras_generated(obj_dir)
    if fmt == "srn":
        return _cameras_srn(obj_dir)
    if fmt == "blender":
        return _cameras_blender(obj_dir)
    if fmt == "gso":
        return _cameras_gso(obj_dir, gso_camera_angle_x)
    raise ValueError(f"unknown format {format!r}; choose one of {('auto',) + FORMATS}")


def load_images(cams: ObjectCameras, views: Optional[Sequence[int]] = None) -> np.ndarray:
    """uint8 [V, H, W, 4] images of the chosen views (all by default), size-checked."""
    idx = range(cams.num_views) if views is None else views
    out = []
    for i in idx:
        img = read_rgba(cams.image_paths[int(i)], cams.alpha_from_white)
        if img.shape[:2] != (cams.height, cams.width):
            raise ValueError(
                f"{cams.image_paths[int(i)]} is {img.shape[1]}x{img.shape[0]}, the object's other views are "
                f"{cams.width}x{cams.height}; all views of an object must have the same size"
            )
        out.append(img)
    return np.stack(out)


def load_points(path: Path) -> Tuple[Tensor, Tensor]:
    """(xyz, rgb) float32 [P, 3] of a ``points.npz``."""
    try:
        with np.load(path) as data:
            xyz, rgb = data["xyz"], data["rgb"]
    except KeyError as e:
        raise ValueError(f"{path} lacks array {e}; it needs 'xyz' and 'rgb' ([P, 3] each)") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}); delete the object folder and rerun splat-ext-objects") from e
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ValueError(f"{path}: xyz and rgb must both be [P, 3], got {xyz.shape} and {rgb.shape}")
    return torch.from_numpy(np.asarray(xyz, dtype=np.float32)), torch.from_numpy(np.asarray(rgb, dtype=np.float32))


def to_views(
    cams: ObjectCameras,
    images_u8: np.ndarray | Tensor,
    views: Optional[Sequence[int]] = None,
    with_points: bool = True,
) -> ObjectViews:
    idx = torch.arange(cams.num_views) if views is None else torch.as_tensor(list(views), dtype=torch.long)
    images = torch.as_tensor(images_u8).float() / 255.0
    pts = rgb = None
    if with_points and cams.points_path is not None:
        pts, rgb = load_points(cams.points_path)
    return ObjectViews(
        images=images,
        c2w=cams.c2w[idx],
        intrinsics=cams.intrinsics[idx],
        object_id=cams.object_id,
        source_format=cams.source_format,
        points=pts,
        point_rgb=rgb,
        view_indices=idx,
    )


def load_object(
    obj_dir: Path,
    format: Format = "auto",
    views: Optional[Sequence[int]] = None,
    with_points: bool = True,
    gso_camera_angle_x: float = GSO_CAMERA_ANGLE_X,
) -> ObjectViews:
    """Load an object folder of any supported layout (all views, or the listed ones)."""
    cams = read_cameras(obj_dir, format, gso_camera_angle_x)
    return to_views(cams, load_images(cams, views), views, with_points)


def load_generated_object(
    obj_dir: Path, views: Optional[Sequence[int]] = None, with_points: bool = True
) -> ObjectViews:
    return load_object(obj_dir, "splat-ext-objects", views, with_points)


def load_srn_object(obj_dir: Path, views: Optional[Sequence[int]] = None) -> ObjectViews:
    return load_object(obj_dir, "srn", views)


def load_blender_object(obj_dir: Path, views: Optional[Sequence[int]] = None) -> ObjectViews:
    return load_object(obj_dir, "blender", views)


def load_gso_object(
    obj_dir: Path, views: Optional[Sequence[int]] = None, camera_angle_x: float = GSO_CAMERA_ANGLE_X
) -> ObjectViews:
    return load_object(obj_dir, "gso", views, gso_camera_angle_x=camera_angle_x)


def list_objects(collection_dir: Path) -> List[Path]:
    """Object folders of a collection (sorted sub-folders; hidden / temporary ones skipped)."""
    collection_dir = Path(collection_dir)
    if not collection_dir.is_dir():
        raise FileNotFoundError(f"{collection_dir} does not exist (expected a folder with one sub-folder per object)")
    dirs = sorted(d for d in collection_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise FileNotFoundError(f"{collection_dir} holds no object folders")
    return dirs


# ---------------------------------------------------------------------------------------------
# exporters (other tools' layouts; also the fixtures of the loader tests)
# ---------------------------------------------------------------------------------------------


def _to_u8(images: Tensor) -> np.ndarray:
    return (images.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()


def export_srn_object(views: ObjectViews, out_dir: Path, rgba: bool = False) -> Path:
    """Write ``views`` in the SRN layout (RGB on white unless ``rgba``; OpenCV camera-to-world poses)."""
    out_dir = Path(out_dir)
    k = views.intrinsics.cpu().numpy()
    if not np.allclose(k[:, 0], k[:, 1]) or not np.allclose(k, k[:1]):
        raise ValueError(
            "SRN stores one focal length per object: needs fx == fy and the same intrinsics for every view"
        )
    (out_dir / "rgb").mkdir(parents=True, exist_ok=True)
    (out_dir / "pose").mkdir(parents=True, exist_ok=True)
    imgs = _to_u8(views.images if rgba else torch.cat([views.composite((1.0, 1.0, 1.0)), views.images[..., 3:]], -1))
    c2w_cv = views.c2w.double().cpu().numpy() @ OPENCV_TO_OPENGL
    for i in range(views.num_views):
        Image.fromarray(imgs[i] if rgba else imgs[i, ..., :3]).save(out_dir / "rgb" / f"{i:06d}.png")
        (out_dir / "pose" / f"{i:06d}.txt").write_text(" ".join(f"{v:.9g}" for v in c2w_cv[i].reshape(-1)) + "\n")
    f, _, cx, cy = (float(v) for v in k[0])
    (out_dir / "intrinsics.txt").write_text(f"{f} {cx} {cy} 0.\n0. 0. 0.\n1.\n{views.height} {views.width}\n")
    return out_dir


def export_blender_object(views: ObjectViews, out_dir: Path) -> Path:
    """Write ``views`` as a Blender-format folder (``transforms.json`` + RGBA ``images/r_N.png``)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    imgs = _to_u8(views.images)
    k = views.intrinsics.cpu().numpy()
    frames = []
    for i in range(views.num_views):
        Image.fromarray(imgs[i]).save(out_dir / "images" / f"r_{i}.png")
        frames.append(
            {"file_path": f"./images/r_{i}", "transform_matrix": views.c2w[i].double().cpu().numpy().tolist()}
        )
    fx, fy, cx, cy = (float(v) for v in k[0])
    meta: Dict = {"camera_angle_x": 2.0 * math.atan(0.5 * views.width / fx), "frames": frames}
    if not (
        math.isclose(fx, fy, rel_tol=1e-6)
        and math.isclose(cx, 0.5 * views.width)
        and math.isclose(cy, 0.5 * views.height)
    ):
        meta.update({"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy})
    (out_dir / "transforms.json").write_text(json.dumps(meta, indent=1))
    return out_dir
