"""nerfstudio's full-image datamanager (splat-ext) with a cheaper training batch.

FullImageDatamanager.next_train slices its Cameras and moves the slice to the device on every step: a tensor
dataclass rebuilt field by field, about 0.4 ms of host time per step on lego (BENCHMARKS.md), where a splat-ext
step is paced by the host until the model has grown. The images are already cached (on the GPU by default); here
each training camera is sliced once, and every step hands out a shallow copy of it, so a model that reassigns a
camera's fields (e.g. `rescale_output_resolution`) leaves the cached one as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig


@dataclass
class SplatExtImageDataManagerConfig(FullImageDatamanagerConfig):
    _target: Type = field(default_factory=lambda: SplatExtImageDataManager)


class SplatExtImageDataManager(FullImageDatamanager):
    _single_train_cameras: Optional[List[Cameras]] = None

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """The next training image (same order and data as the parent's) and its camera, with `cam_idx` metadata."""
        image_idx = self.train_unseen_cameras.pop(0)
        if len(self.train_unseen_cameras) == 0:
            self.train_unseen_cameras = self.sample_train_cameras()
        # The images first: nerfstudio caches (and undistorts) them on first access and only then updates the
        # cameras' intrinsics and sizes, which _train_camera slices.
        data = dict(self.cached_train[image_idx])
        data["image"] = data["image"].to(self.device)  # a no-op for images cached on the GPU
        return self._train_camera(image_idx), data

    def _train_camera(self, index: int) -> Cameras:
        if self._single_train_cameras is None:
            cameras = self.train_cameras
            assert len(cameras.shape) == 1, "Assumes single batch dimension"
            self._single_train_cameras = [cameras[i : i + 1].to(self.device) for i in range(cameras.shape[0])]
        camera = copy.copy(self._single_train_cameras[index])
        camera.metadata = {**(camera.metadata or {}), "cam_idx": index}
        return camera
