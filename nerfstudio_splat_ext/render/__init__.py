"""Rendering backends of splat-ext (see backend.py)."""

from nerfstudio_splat_ext.render.backend import RenderBackend, get_rasterizer, resolve_backend

__all__ = ["RenderBackend", "get_rasterizer", "resolve_backend"]
