"""`splat-ext-data`: one dataparser for Blender-format and nerfstudio-format scenes, with input checking.

It detects the layout (transforms_train.json -> Blender, transforms.json -> nerfstudio), checks the files before
nerfstudio touches them, and delegates the parsing to nerfstudio's own Blender / nerfstudio dataparsers. Problems
with the input end the command with one line that names the file and the fix, instead of a traceback from deep
inside a worker thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Set, Type

from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs

from nerfstudio_splat_ext.utils.threads import map_in_threads

Layout = Literal["auto", "blender", "nerfstudio"]


class DatasetError(SystemExit):
    """Bad input data. A SystemExit, so the command line prints just the message (one line) and exits with 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"splat-ext: error: {message}")
        self.message = message

    def __str__(self) -> str:
        return str(self.code)


@dataclass
class SplatExtDataParserConfig(DataParserConfig):
    """Blender (transforms_{train,val,test}.json) or nerfstudio (transforms.json) data, checked before loading."""

    _target: Type = field(default_factory=lambda: SplatExtDataParser)
    data: Path = Path("data/splat-ext-synth")
    """Dataset folder (or its transforms json file)."""
    layout: Layout = "auto"
    """Dataset layout; 'auto' detects it from the files present."""
    alpha_color: Optional[str] = "white"
    """Background that RGBA images are composited on (also the model's background with background_color=auto)."""
    eval_interval: int = 8
    """nerfstudio layout: hold out every eval_interval-th frame for evaluation."""
    downscale_factor: Optional[int] = None
    """nerfstudio layout: use the images_N folder (None: nerfstudio's automatic choice)."""
    load_3D_points: bool = True
    """Use the SfM points (ply_file_path in transforms.json) to initialise the Gaussians when present."""
    check_images: bool = True
    """Decode every image of the split once up front, so a corrupt file is reported by name."""


def _read_transforms(path: Path) -> Dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix or regenerate the file") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object with a 'frames' list, found {type(meta).__name__}")
    frames = meta.get("frames")
    if not isinstance(frames, list) or len(frames) == 0:
        raise DatasetError(f"{path}: has no frames; it needs a non-empty 'frames' list of {{file_path, transform_matrix}}")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise DatasetError(f"{path}: frame {i} needs 'file_path' and 'transform_matrix'")
        matrix = frame["transform_matrix"]
        if not (isinstance(matrix, list) and len(matrix) in (3, 4) and all(isinstance(r, list) and len(r) == 4 for r in matrix)):
            raise DatasetError(f"{path}: frame {i} ('{frame['file_path']}') has a transform_matrix that is not 4x4")
    return meta


def _check_image(path: Path) -> None:
    _check_image_exists(path)
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decodes the whole file: truncated or corrupt data fails here
    except Exception as err:
        raise DatasetError(f"{path}: corrupt or unreadable image ({type(err).__name__}: {err}); replace or remove this file") from None


class SplatExtDataParser(DataParser):
    config: SplatExtDataParserConfig

    def __init__(self, config: SplatExtDataParserConfig) -> None:
        super().__init__(config)
        self._checked_images: Set[Path] = set()  # a nerfstudio-layout dataset lists every frame for each split

    def _dataset_dir(self) -> Path:
        data = Path(self.config.data)
        if not data.exists():
            raise DatasetError(
                f"{data}: dataset path does not exist; pass --data DIR with transforms.json or transforms_train.json "
                "(or run splat-ext-synth to generate the default scene)"
            )
        return data.parent if data.is_file() else data

    def _layout(self, root: Path) -> Literal["blender", "nerfstudio"]:
        if self.config.layout != "auto":
            return self.config.layout  # type: ignore[return-value]
        if (root / "transforms_train.json").exists():
            return "blender"
        if (root / "transforms.json").exists():
            return "nerfstudio"
        raise DatasetError(
            f"{root}: no transforms_train.json (Blender layout) or transforms.json (nerfstudio layout) found in this folder"
        )

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        root = self._dataset_dir()
        layout = self._layout(root)
        if layout == "blender":
            outputs = self._parse_blender(root, split)
        else:
            outputs = self._parse_nerfstudio(root, split)
        metadata = dict(outputs.metadata)
        if outputs.alpha_color is not None:
            metadata["background_color"] = outputs.alpha_color.clone()
        metadata["dataset_layout"] = layout
        outputs.metadata = metadata
        return outputs

    def _check_images(self, paths: List[Path]) -> None:
        # Before nerfstudio's parsers run: they open the first image themselves and fail with a bare traceback.
        # Each file once per parser, decoded in parallel; the first bad file in dataset order is the one reported.
        todo = [path for path in dict.fromkeys(paths) if path not in self._checked_images]
        for path in todo:
            _check_image_exists(path)
        if self.config.check_images:
            map_in_threads(_check_image, todo)
        self._checked_images.update(todo)

    def _parse_blender(self, root: Path, split: str) -> DataparserOutputs:
        from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

        transforms = root / f"transforms_{split}.json"
        if not transforms.exists():
            raise DatasetError(f"{transforms}: missing; a Blender-layout dataset needs transforms_train/val/test.json")
        meta = _read_transforms(transforms)
        if "camera_angle_x" not in meta:
            raise DatasetError(f"{transforms}: missing 'camera_angle_x' (horizontal field of view in radians)")
        self._check_images([root / (frame["file_path"].replace("./", "") + ".png") for frame in meta["frames"]])
        parser = BlenderDataParserConfig(data=root, alpha_color=self.config.alpha_color).setup()
        return parser.get_dataparser_outputs(split=split)

    def _parse_nerfstudio(self, root: Path, split: str) -> DataparserOutputs:
        from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

        transforms = root / "transforms.json"
        meta = _read_transforms(transforms)
        missing = [k for k in ("fl_x", "fl_y", "cx", "cy", "w", "h") if k not in meta and k not in meta["frames"][0]]
        if missing:
            raise DatasetError(f"{transforms}: missing camera intrinsics {missing} (top level or per frame)")
        self._check_images([root / frame["file_path"] for frame in meta["frames"]])
        load_points = self.config.load_3D_points and "ply_file_path" in meta and (root / meta["ply_file_path"]).exists()
        parser = NerfstudioDataParserConfig(
            data=root,
            eval_mode="interval",
            eval_interval=self.config.eval_interval,
            downscale_factor=self.config.downscale_factor,
            load_3D_points=load_points,
        ).setup()
        outputs = parser.get_dataparser_outputs(split=split)
        # A background colour only means something for images with an alpha channel; photographs keep the model's
        # own default (black), as the 3DGS reference does for real scenes.
        has_alpha = _has_alpha(root / meta["frames"][0]["file_path"])
        if self.config.alpha_color is not None and outputs.alpha_color is None and has_alpha:
            from nerfstudio.utils.colors import get_color

            outputs.alpha_color = get_color(self.config.alpha_color)
        return outputs


def _has_alpha(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    except OSError:
        return False


def _check_image_exists(path: Path) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: image listed in the transforms file does not exist")


__all__: List[str] = ["DatasetError", "SplatExtDataParser", "SplatExtDataParserConfig"]
