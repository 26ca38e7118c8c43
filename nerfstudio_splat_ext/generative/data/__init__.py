"""Data of the generative (single-image-to-3D) models.

* :mod:`.shapes`: seeded procedural objects (six shape families of SDF primitives, solid textures);
* :mod:`.generator`: renders many of them into the ``splat-ext-objects`` format (CLI: :mod:`.cli`);
* :mod:`.loaders`: reads that format, ShapeNet-SRN, per-object Blender folders and zero123 / GSO renders
  into one structure, :class:`ObjectViews`;
* :mod:`.datamanager`: a nerfstudio DataManager yielding batches of (source view, K target views) per object.

``docs/generative_data.md`` describes the on-disk format and the camera conventions. Submodules are
imported lazily here (the datamanager pulls in nerfstudio).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ObjectDatasetSpec": "generator",
    "ObjectRenderSpec": "generator",
    "generate_dataset": "generator",
    "generate_object": "generator",
    "ObjectViews": "loaders",
    "ObjectCameras": "loaders",
    "load_object": "loaders",
    "load_generated_object": "loaders",
    "load_srn_object": "loaders",
    "load_blender_object": "loaders",
    "load_gso_object": "loaders",
    "MultiObjectDataManager": "datamanager",
    "MultiObjectDataManagerConfig": "datamanager",
    "MultiObjectDataset": "datamanager",
    "build_object": "shapes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
