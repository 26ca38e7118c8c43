"""Procedural default dataset: a seeded SDF object rendered by sphere tracing, written in the
Blender (NeRF-synthetic) format that nerfstudio's ``blender-data`` dataparser reads."""

from nerfstudio_splat_ext.synth.renderer import RenderSettings, render_view
from nerfstudio_splat_ext.synth.scene import ProceduralScene, SceneSpec, build_scene, make_albedo, make_sdf
from nerfstudio_splat_ext.synth.writer import DatasetSpec, camera_poses, camera_positions, write_dataset

__all__ = [
    "DatasetSpec",
    "ProceduralScene",
    "RenderSettings",
    "SceneSpec",
    "build_scene",
    "camera_poses",
    "camera_positions",
    "make_albedo",
    "make_sdf",
    "render_view",
    "write_dataset",
]
