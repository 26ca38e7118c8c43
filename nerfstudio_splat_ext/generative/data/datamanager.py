"""Multi-object datamanager: batches of objects, each with one source view and K target views.

For feed-forward single-image-to-3D models (a Splatter-Image-style teacher, a diffusion student):
per training step it yields ``B`` objects, each with one source view (the model's input) and ``K``
other views of the same object (supervision), as tensors on the datamanager's device::

    cameras, batch = datamanager.next_train(step)
    cameras                      nerfstudio Cameras of shape [B, 1 + K]: [:, 0] source, [:, 1:] targets
    batch["source_image"]        [B, H, W, 4] float in [0, 1], straight RGB + alpha
    batch["source_c2w"]          [B, 4, 4] OpenGL camera-to-world
    batch["source_intrinsics"]   [B, 4] fx, fy, cx, cy (pixels)
    batch["target_images"]       [B, K, H, W, 4]
    batch["target_c2w"]          [B, K, 4, 4]
    batch["target_intrinsics"]   [B, K, 4]
    batch["object_index"]        [B] long, index into the split's dataset
    batch["source_view"]         [B] long, batch["target_views"] [B, K] long (view indices on disk)
    batch["object_ids"]          list of B str
    batch["points"], batch["point_rgb"]   [B, P, 3] (only with load_points=True; P fixed per dataset)

The choice of objects and views is a pure function of ``(seed, step)``: objects are drawn epoch by
epoch from seeded permutations (every object once per epoch), views uniformly without replacement.
So a resumed run sees the same batches. Evaluation (``next_eval``, ``next_eval_image``,
``fixed_indices_eval_dataloader``) reads the held-out split only.

Any layout of :mod:`.loaders` works: ``<data>/<split>/<object>/`` folders of our generated format
(``index.json`` gives the order and completeness), SRN, or Blender-format objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn import Parameter

from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.datamanagers.base_datamanager import DataManager, DataManagerConfig
from nerfstudio.data.scene_box import SceneBox

from nerfstudio_splat_ext.generative.data.generator import list_split, read_index
from nerfstudio_splat_ext.generative.data.loaders import (
    ObjectCameras,
    ObjectViews,
    list_objects,
    load_images,
    load_points,
    read_cameras,
    to_views,
)

_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclass
class MultiObjectDataManagerConfig(DataManagerConfig):
    """Batches of (source view, K target views) of many objects."""

    _target: Type = field(default_factory=lambda: MultiObjectDataManager)
    data: Optional[Path] = Path("data/splat-ext-objects")
    """Dataset root: holds one folder per split (``train``/``heldout``), each with one folder per object."""
    format: Literal["auto", "splat-ext-objects", "srn", "blender"] = "auto"
    """Layout of the object folders (auto: detected per object)."""
    train_split: str = "train"
    eval_split: str = "heldout"
    """Evaluation uses this split only (held-out objects)."""
    batch_size: int = 8
    """Objects per training step."""
    eval_batch_size: int = 8
    """Objects per ``next_eval`` call."""
    num_target_views: int = 4
    """K: target views per object."""
    targets_include_source: bool = False
    """Whether the source view may also be drawn as a target."""
    eval_source_view: int = 0
    """Source view of ``next_eval_image`` / ``fixed_indices_eval_dataloader`` (its targets: all other views)."""
    seed: int = 0
    """Seed of the object / view choices."""
    max_train_objects: int = -1
    """Use only the first N training objects (-1: all)."""
    max_eval_objects: int = -1
    """Use only the first N held-out objects (-1: all)."""
    cache_images: bool = True
    """Keep each decoded image (uint8) in CPU memory after its first use (2000 objects x 24 views at 128^2: 3.1 GB)."""
    load_points: bool = False
    """Add the objects' surface points and colours (generated format) to the batches."""
    require_complete: bool = True
    """Refuse a generated dataset whose index lists objects that are not on disk yet (False: use those present)."""


class MultiObjectDataset(torch.utils.data.Dataset):
    """The objects of one split: cameras indexed up front, images decoded on demand (and cached)."""

    def __init__(
        self,
        object_dirs: Sequence[Path],
        format: str = "auto",
        cache_images: bool = True,
        load_points: bool = False,
        extent: float = 1.0,
    ) -> None:
        if len(object_dirs) == 0:
            raise ValueError("a multi-object dataset needs at least one object folder")
        self.object_dirs = [Path(d) for d in object_dirs]
        self.object_cameras: List[ObjectCameras] = [read_cameras(d, format) for d in self.object_dirs]  # type: ignore
        first = self.object_cameras[0]
        for cams, d in zip(self.object_cameras, self.object_dirs):
            if (cams.width, cams.height) != (first.width, first.height):
                raise ValueError(
                    f"{d}: images are {cams.width}x{cams.height} but {self.object_dirs[0]} has "
                    f"{first.width}x{first.height}; all objects of a dataset must share one resolution"
                )
            if load_points and cams.points_path is None:
                raise FileNotFoundError(f"{d} has no points.npz; set load_points=False or regenerate the object")
        self.width, self.height = first.width, first.height
        self.cache_images = cache_images
        self.load_points = load_points
        self._images: Dict[Tuple[int, int], Tensor] = {}
        self._points: Dict[int, Tuple[Tensor, Tensor]] = {}
        self.scene_box = SceneBox(aabb=torch.tensor([[-extent] * 3, [extent] * 3], dtype=torch.float32))
        self.metadata: Dict = {}

    def __len__(self) -> int:
        return len(self.object_cameras)

    @property
    def object_ids(self) -> List[str]:
        return [c.object_id for c in self.object_cameras]

    def num_views(self, index: int) -> int:
        return self.object_cameras[index].num_views

    def images(self, index: int, views: Sequence[int]) -> Tensor:
        """uint8 [n, H, W, 4] of the given views of object ``index``."""
        cams = self.object_cameras[index]
        missing = [int(v) for v in views if (index, int(v)) not in self._images]
        if missing:
            loaded = torch.from_numpy(load_images(cams, missing))
            if not self.cache_images:
                got = dict(zip(missing, loaded))
                return torch.stack([got[int(v)] for v in views])
            for v, img in zip(missing, loaded):
                self._images[(index, v)] = img
        return torch.stack([self._images[(index, int(v))] for v in views])

    def points(self, index: int) -> Tuple[Tensor, Tensor]:
        if index not in self._points:
            path = self.object_cameras[index].points_path
            if path is None:
                raise FileNotFoundError(f"{self.object_dirs[index]} has no points.npz")
            self._points[index] = load_points(path)
        return self._points[index]

    def __getitem__(self, index: int) -> ObjectViews:
        cams = self.object_cameras[index]
        views = list(range(cams.num_views))
        out = to_views(cams, self.images(index, views), views, with_points=False)
        if self.load_points and cams.points_path is not None:
            out.points, out.point_rgb = self.points(index)
        return out


def _split_object_dirs(root: Path, split: str, require_complete: bool) -> List[Path]:
    root = Path(root)
    if (root / "index.json").is_file():
        index = read_index(root)
        if split in index["splits"]:
            return list_split(root, split, require_complete)
    return list_objects(root / split)


def _extent(root: Path) -> float:
    try:
        return float(read_index(root)["settings"].get("extent", 1.0))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 1.0


class MultiObjectDataManager(DataManager):
    """Yields per step B objects x (1 source + K target views) for feed-forward object models."""

    config: MultiObjectDataManagerConfig
    train_dataset: MultiObjectDataset
    eval_dataset: MultiObjectDataset

    def __init__(
        self,
        config: MultiObjectDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.test_mode = test_mode
        self.world_size = world_size
        self.local_rank = local_rank
        if config.data is None:
            raise ValueError(
                "MultiObjectDataManagerConfig.data is not set: point it at a dataset root (e.g. from splat-ext-objects)"
            )
        root = Path(config.data)
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset root {root} does not exist; generate one with: splat-ext-objects --output-dir {root}"
            )
        if config.batch_size < 1 or config.eval_batch_size < 1 or config.num_target_views < 1:
            raise ValueError("batch_size, eval_batch_size and num_target_views must be >= 1")
        extent = _extent(root)

        def dataset(split: str, limit: int) -> MultiObjectDataset:
            dirs = _split_object_dirs(root, split, config.require_complete)
            if limit >= 0:
                dirs = dirs[:limit]
            return MultiObjectDataset(dirs, config.format, config.cache_images, config.load_points, extent)

        self.train_dataset = dataset(config.train_split, config.max_train_objects)
        self.eval_dataset = dataset(config.eval_split, config.max_eval_objects)
        overlap = set(self.train_dataset.object_ids) & set(self.eval_dataset.object_ids)
        if overlap and config.train_split != config.eval_split:
            raise ValueError(
                f"held-out objects also in the training split: {sorted(overlap)[:5]}; regenerate with disjoint seeds"
            )
        need = config.num_target_views + (0 if config.targets_include_source else 1)
        for ds in (self.train_dataset, self.eval_dataset):
            for i in range(len(ds)):
                if ds.num_views(i) < need:
                    raise ValueError(
                        f"{ds.object_dirs[i]} has {ds.num_views(i)} views but a sample needs {need} "
                        f"(1 source + num_target_views={config.num_target_views} distinct); lower num_target_views"
                    )
        if (self.eval_dataset.width, self.eval_dataset.height) != (self.train_dataset.width, self.train_dataset.height):
            raise ValueError("train and held-out objects have different image sizes")
        self._perms: Dict[Tuple[int, int], np.ndarray] = {}
        self.eval_image_index = 0
        super().__init__()

    # -- sampling -------------------------------------------------------------------------------

    def _permutation(self, stream: int, epoch: int, n: int) -> np.ndarray:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:  # only the current epochs are needed
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.config.seed, stream, epoch, 0xE90C]).permutation(n)
        return self._perms[key]

    def sample_indices(self, stream: int, step: int, batch_size: int) -> Tuple[List[int], List[int], List[List[int]]]:
        """(objects [B], source views [B], target views [B][K]) of a step: a pure function of (seed, stream, step)."""
        ds = self.train_dataset if stream == _TRAIN_STREAM else self.eval_dataset
        n = len(ds)
        rng = np.random.default_rng([self.config.seed, stream, int(step), 0x5713])
        objects, sources, targets = [], [], []
        for j in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(j, n)
            obj = int(self._permutation(stream, epoch, n)[pos])
            nv = ds.num_views(obj)
            src = int(rng.integers(nv))
            pool = np.arange(nv) if self.config.targets_include_source else np.delete(np.arange(nv), src)
            tgt = [int(v) for v in rng.choice(pool, size=self.config.num_target_views, replace=False)]
            objects.append(obj)
            sources.append(src)
            targets.append(tgt)
        return objects, sources, targets

    def make_batch(
        self,
        dataset: MultiObjectDataset,
        objects: Sequence[int],
        sources: Sequence[int],
        targets: Sequence[Sequence[int]],
    ) -> Tuple[Cameras, Dict]:
        """Cameras [B, 1+K] and the batch dict (see the module docstring) on ``self.device``."""
        k = len(targets[0])
        if any(len(t) != k for t in targets):
            raise ValueError("every object of a batch needs the same number of target views")
        images, c2w, intr = [], [], []
        for obj, src, tgt in zip(objects, sources, targets):
            views = [int(src), *[int(v) for v in tgt]]
            cams = dataset.object_cameras[obj]
            images.append(dataset.images(obj, views))
            c2w.append(cams.c2w[views])
            intr.append(cams.intrinsics[views])
        dev = self.device
        images_t = torch.stack(images).to(dev).float() / 255.0  # uint8 over the bus, float on the device
        c2w_t = torch.stack(c2w).to(dev)
        intr_t = torch.stack(intr).to(dev)
        batch: Dict = {
            "source_image": images_t[:, 0],
            "source_c2w": c2w_t[:, 0],
            "source_intrinsics": intr_t[:, 0],
            "target_images": images_t[:, 1:],
            "target_c2w": c2w_t[:, 1:],
            "target_intrinsics": intr_t[:, 1:],
            "object_index": torch.tensor(list(objects), dtype=torch.long, device=dev),
            "source_view": torch.tensor(list(sources), dtype=torch.long, device=dev),
            "target_views": torch.tensor([list(t) for t in targets], dtype=torch.long, device=dev).reshape(
                len(objects), k
            ),
            "object_ids": [dataset.object_cameras[o].object_id for o in objects],
        }
        if self.config.load_points:
            pts = [dataset.points(o) for o in objects]
            sizes = {p[0].shape[0] for p in pts}
            if len(sizes) != 1:
                raise ValueError(
                    f"objects of a batch have different point counts {sorted(sizes)}; regenerate with one --num-points"
                )
            batch["points"] = torch.stack([p[0] for p in pts]).to(dev)
            batch["point_rgb"] = torch.stack([p[1] for p in pts]).to(dev)
        cameras = Cameras(
            camera_to_worlds=c2w_t[..., :3, :4],
            fx=intr_t[..., 0:1],
            fy=intr_t[..., 1:2],
            cx=intr_t[..., 2:3],
            cy=intr_t[..., 3:4],
            width=dataset.width,
            height=dataset.height,
            camera_type=CameraType.PERSPECTIVE,
        )
        return cameras, batch

    def _full_object(self, index: int) -> Tuple[Cameras, Dict]:
        """A held-out object: the eval source view and all its other views as targets (B = 1)."""
        nv = self.eval_dataset.num_views(index)
        src = self.config.eval_source_view
        if not 0 <= src < nv:
            raise ValueError(f"eval_source_view={src} but {self.eval_dataset.object_dirs[index]} has {nv} views")
        return self.make_batch(self.eval_dataset, [index], [src], [[v for v in range(nv) if v != src]])

    # -- DataManager API ------------------------------------------------------------------------

    def setup_train(self) -> None:
        """Nothing to set up: the training dataset is indexed in the constructor, images load on demand."""

    def setup_eval(self) -> None:
        """Nothing to set up: the held-out dataset is indexed in the constructor."""

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        self.train_count += 1
        return self.make_batch(self.train_dataset, *self.sample_indices(_TRAIN_STREAM, step, self.config.batch_size))

    def next_eval(self, step: int) -> Tuple[Cameras, Dict]:
        """Random held-out objects with random source / target views (seeded by ``step``)."""
        self.eval_count += 1
        return self.make_batch(self.eval_dataset, *self.sample_indices(_EVAL_STREAM, step, self.config.eval_batch_size))

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        """The next held-out object in order (cycling), with all its views."""
        index = self.eval_image_index % len(self.eval_dataset)
        self.eval_image_index += 1
        return self._full_object(index)

    @property
    def fixed_indices_eval_dataloader(self) -> "HeldOutObjects":
        """Every held-out object once, as ``(cameras, batch)`` of :meth:`next_eval_image` (loaded lazily)."""
        return HeldOutObjects(self)

    def get_train_rays_per_batch(self) -> int:
        """Supervised target pixels per training step."""
        return (
            self.config.batch_size * self.config.num_target_views * self.train_dataset.width * self.train_dataset.height
        )

    def get_eval_rays_per_batch(self) -> int:
        return (
            self.config.eval_batch_size
            * self.config.num_target_views
            * self.eval_dataset.width
            * self.eval_dataset.height
        )

    def get_datapath(self) -> Path:
        assert self.config.data is not None
        return Path(self.config.data)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {}


class HeldOutObjects:
    """A lazy sequence over the held-out objects (what nerfstudio's eval loops iterate)."""

    def __init__(self, datamanager: MultiObjectDataManager) -> None:
        self.datamanager = datamanager

    def __len__(self) -> int:
        return len(self.datamanager.eval_dataset)

    def __getitem__(self, index: int) -> Tuple[Cameras, Dict]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.datamanager._full_object(index % len(self))

    def __iter__(self) -> Iterator[Tuple[Cameras, Dict]]:
        for i in range(len(self)):
            yield self[i]
