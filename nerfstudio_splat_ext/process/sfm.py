"""Photos or a video to a nerfstudio dataset with pycolmap only (no `colmap` or `ffmpeg` binaries, no downloads).

Stages: copy images (EXIF orientation applied) -> SIFT features (one shared OPENCV camera, size capped for CPUs) ->
matching (exhaustive for small sets, sequential for video frames) -> incremental mapping -> keep the largest model ->
bundle adjustment that also refines the principal point -> `colmap/sparse/0`, `transforms.json` with distortion and
`sparse_pc.ply` (nerfstudio's writers), and `images_2/4/8` pyramids.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
Matcher = Literal["auto", "exhaustive", "sequential"]


class ProcessError(SystemExit):
    """A one-line, user-facing error (exits with status 2, no traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message
        print(f"splat-ext-process: error: {message}", flush=True)


@dataclass
class SfmReport:
    num_images: int
    num_registered: int
    num_models: int
    mean_reprojection_error: float
    num_points: int
    seconds: float

    @property
    def registered_fraction(self) -> float:
        return self.num_registered / max(self.num_images, 1)


def _log(message: str) -> None:
    print(f"[splat-ext-process] {message}", flush=True)


def copy_images(sources: List[Path], image_dir: Path) -> List[str]:
    """Copy images into image_dir with their EXIF orientation applied (COLMAP ignores the tag). Returns the names."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, src in enumerate(sources):
        try:
            with Image.open(src) as img:
                upright = ImageOps.exif_transpose(img)
                if upright.mode not in ("RGB", "L"):
                    upright = upright.convert("RGB")
                dst = image_dir / src.name
                upright.save(dst, quality=95) if dst.suffix.lower() in (".jpg", ".jpeg") else upright.save(dst)
        except (UnidentifiedImageError, OSError) as err:
            raise ProcessError(f"{src}: not a readable image ({err}); remove or replace it") from None
        names.append(src.name)
        if (i + 1) % 25 == 0 or i + 1 == len(sources):
            _log(f"copied {i + 1}/{len(sources)} images")
    return names


def list_images(folder: Path) -> List[Path]:
    if not folder.exists():
        raise ProcessError(f"{folder}: does not exist; pass the folder that holds your photos with --data")
    if not folder.is_dir():
        raise ProcessError(f"{folder}: is not a folder; pass the folder that holds your photos with --data")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) < 3:
        raise ProcessError(f"{folder}: found {len(images)} images ({', '.join(sorted(IMAGE_SUFFIXES))}); need >= 3")
    return images


def extract_video_frames(video: Path, image_dir: Path, num_frames: int) -> List[str]:
    """Evenly spaced frames of a video, decoded with OpenCV (no ffmpeg binary)."""
    import cv2

    if not video.is_file():
        raise ProcessError(f"{video}: does not exist; pass a video file with --data")
    cap = cv2.VideoCapture(str(video))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if not cap.isOpened() or total <= 0:
        raise ProcessError(f"{video}: OpenCV cannot decode this video; convert it to H.264 MP4 or extract frames")
    wanted = sorted({round(i * (total - 1) / max(num_frames - 1, 1)) for i in range(min(num_frames, total))})
    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for k, index in enumerate(wanted):
        cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = cap.read()
        if not ok:
            continue
        name = f"frame_{k:05d}.jpg"
        cv2.imwrite(str(image_dir / name), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
        names.append(name)
        if (k + 1) % 25 == 0 or k + 1 == len(wanted):
            _log(f"extracted {k + 1}/{len(wanted)} frames")
    cap.release()
    if len(names) < 3:
        raise ProcessError(f"{video}: only {len(names)} frames could be decoded")
    return names


def run_sfm(
    image_dir: Path,
    colmap_dir: Path,
    matcher: Matcher = "auto",
    max_image_size: int = 1600,
    num_threads: int = -1,
    progress: Callable[[str], None] = _log,
) -> SfmReport:
    """SIFT + matching + incremental mapping + bundle adjustment; writes the largest model to colmap_dir/sparse/0."""
    import pycolmap

    start = time.time()
    num_images = len([p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    if colmap_dir.exists():
        shutil.rmtree(colmap_dir)  # a stale database would mix old and new features
    colmap_dir.mkdir(parents=True)
    database = colmap_dir / "database.db"

    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = max_image_size
    extraction.num_threads = num_threads
    extraction.use_gpu = False
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "OPENCV"
    progress(f"extracting SIFT features from {num_images} images (max side {max_image_size} px)")
    pycolmap.extract_features(
        database, image_dir, camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
        extraction_options=extraction, device=pycolmap.Device.cpu,
    )

    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = num_threads
    matching.use_gpu = False
    if matcher == "auto":
        matcher = "exhaustive" if num_images <= 300 else "sequential"
    progress(f"matching features ({matcher})")
    if matcher == "exhaustive":
        pycolmap.match_exhaustive(database, matching_options=matching, device=pycolmap.Device.cpu)
    else:
        pycolmap.match_sequential(database, matching_options=matching, device=pycolmap.Device.cpu)

    progress("incremental mapping")
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.num_threads = num_threads
    models: Dict[int, "pycolmap.Reconstruction"] = pycolmap.incremental_mapping(
        database, image_dir, colmap_dir / "mapping", options=mapping
    )
    if not models:
        raise ProcessError(
            f"{image_dir}: no reconstruction: the photos do not overlap enough (take more, with ~70% overlap)"
        )
    best = max(models.values(), key=lambda r: r.num_reg_images())

    progress(f"bundle adjustment of the largest model ({best.num_reg_images()} images), refining the principal point")
    ba = pycolmap.BundleAdjustmentOptions()
    ba.refine_principal_point = True
    pycolmap.bundle_adjustment(best, ba)

    sparse = colmap_dir / "sparse" / "0"
    sparse.mkdir(parents=True)
    best.write_binary(str(sparse))
    shutil.rmtree(colmap_dir / "mapping", ignore_errors=True)
    return SfmReport(
        num_images=num_images,
        num_registered=best.num_reg_images(),
        num_models=len(models),
        mean_reprojection_error=float(best.compute_mean_reprojection_error()),
        num_points=best.num_points3D(),
        seconds=time.time() - start,
    )


def write_pyramid(image_dir: Path, levels: int = 3) -> None:
    """images_2, images_4, ... (what nerfstudio's automatic downscale looks for)."""
    from PIL import Image

    names = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for level in range(1, levels + 1):
        factor = 2**level
        out = image_dir.parent / f"{image_dir.name}_{factor}"
        out.mkdir(exist_ok=True)
        for path in names:
            with Image.open(path) as img:
                size = (max(1, img.width // factor), max(1, img.height // factor))
                img.resize(size, Image.BICUBIC).save(out / path.name)
        _log(f"wrote {out.name} ({len(names)} images)")


def write_transforms(colmap_dir: Path, output_dir: Path) -> int:
    """transforms.json (OPENCV intrinsics and distortion, nerfstudio's axis convention) and sparse_pc.ply."""
    from nerfstudio.process_data.colmap_utils import colmap_to_json

    return colmap_to_json(recon_dir=colmap_dir / "sparse" / "0", output_dir=output_dir)


def process(
    output_dir: Path,
    images: Optional[List[Path]] = None,
    video: Optional[Path] = None,
    num_frames: int = 150,
    matcher: Matcher = "auto",
    max_image_size: int = 1600,
    num_downscales: int = 3,
) -> SfmReport:
    image_dir = output_dir / "images"
    if image_dir.exists():
        shutil.rmtree(image_dir)
    if video is not None:
        extract_video_frames(video, image_dir, num_frames)
        matcher = "sequential" if matcher == "auto" else matcher
    else:
        copy_images(images or [], image_dir)
    report = run_sfm(image_dir, output_dir / "colmap", matcher=matcher, max_image_size=max_image_size)
    write_transforms(output_dir / "colmap", output_dir)
    if num_downscales > 0:
        write_pyramid(image_dir, num_downscales)
    _log(
        f"registered {report.num_registered}/{report.num_images} images in the largest of {report.num_models} "
        f"model(s); {report.num_points} points; mean reprojection error {report.mean_reprojection_error:.3f} px; "
        f"{report.seconds:.0f} s"
    )
    if report.registered_fraction < 0.9:
        _log(
            f"WARNING: only {100 * report.registered_fraction:.0f}% of the images registered; the unregistered ones "
            "are left out of transforms.json (more overlap between photos helps)"
        )
    if report.num_models > 1:
        _log(f"WARNING: the reconstruction split into {report.num_models} models; only the largest is used")
    _log(f"dataset written to {output_dir}: train with  ns-train splat-ext --data {output_dir}")
    return report
