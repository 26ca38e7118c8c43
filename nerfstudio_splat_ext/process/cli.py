"""`splat-ext-process`: photos or a video to a nerfstudio dataset with pycolmap (no colmap / ffmpeg binaries).

    splat-ext-process images --data PHOTOS --output-dir DATASET
    splat-ext-process video  --data VIDEO.mp4 --output-dir DATASET --num-frames 150
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import tyro
from typing_extensions import Annotated

from nerfstudio_splat_ext.process.sfm import Matcher, list_images, process


@dataclass
class Images:
    """A folder of photos of one scene."""

    data: Path
    """Folder with the photos (jpg, png, ...)."""
    output_dir: Path
    """Dataset folder to write (images/, colmap/, transforms.json, sparse_pc.ply, images_2/4/8)."""
    matcher: Matcher = "auto"
    """'auto': exhaustive up to 300 images, else sequential."""
    max_image_size: int = 1600
    """Longest side used for SIFT (smaller is faster on CPUs; the dataset keeps full-size images)."""
    num_downscales: int = 3

    def main(self) -> None:
        process(self.output_dir, images=list_images(self.data), matcher=self.matcher,
                max_image_size=self.max_image_size, num_downscales=self.num_downscales)


@dataclass
class Video:
    """A video walking around one scene; evenly spaced frames are used."""

    data: Path
    """Video file (anything OpenCV decodes, e.g. H.264 MP4)."""
    output_dir: Path
    num_frames: int = 150
    matcher: Matcher = "sequential"
    max_image_size: int = 1600
    num_downscales: int = 3

    def main(self) -> None:
        process(self.output_dir, video=self.data, num_frames=self.num_frames, matcher=self.matcher,
                max_image_size=self.max_image_size, num_downscales=self.num_downscales)


Commands = Union[
    Annotated[Images, tyro.conf.subcommand(name="images")],
    Annotated[Video, tyro.conf.subcommand(name="video")],
]


def entrypoint() -> None:
    tyro.cli(Commands).main()


if __name__ == "__main__":
    entrypoint()
