"""Adaptive density control (ADC) of 3D Gaussian Splatting.

Kerbl, Kopanas, Leimkuehler, Drettakis, "3D Gaussian Splatting for Real-Time Radiance
Field Rendering", SIGGRAPH 2023, Algorithm 1; optional AbsGS absolute gradients
(Ye et al. 2024).

Usage per training iteration::

    strategy.step_pre_backward(params, optimizers, state, step, info)
    loss.backward()
    ...optimizer steps...
    stats = strategy.step_post_backward(params, optimizers, state, step, info)

``info`` is the dict returned by the rasteriser (gsplat layout): ``means2d`` [C,N,2]
(pixel coordinates, a non-leaf tensor whose gradient is retained), ``radii`` [C,N]
(pixels; [C,N,2] is also accepted and reduced by max), ``width``, ``height``,
``n_cameras``. Packed mode (``means2d`` [nnz,2], ``radii`` [nnz], ``gaussian_ids``
[nnz]) is supported with ``packed=True``.

Gradient normalisation (same convention as gsplat's default strategy): the pixel-space
gradient of ``means2d`` is converted to a gradient w.r.t. NDC coordinates
(x_ndc in [-1,1] <-> x_pix = (x_ndc + 1) * W / 2, so dL/dx_ndc = dL/dx_pix * W / 2;
same with H for y) and multiplied by ``n_cameras`` to undo the averaging of the loss
over a batch of cameras. With this, the paper's threshold 0.0002 applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, MutableMapping, Optional

import torch

from nerfstudio_splat_ext.cuda.view_stats import accumulate_view_stats

from . import ops

__all__ = ["ADCStrategy"]

_REQUIRED_SHAPES = {
    "means": (3,),
    "scales": (3,),
    "quats": (4,),
}


@dataclass
class ADCStrategy:
    """Clone / split / prune / opacity-reset schedule of the original 3DGS paper."""

    refine_start_iter: int = 500
    """Refine only at steps strictly after this one."""
    refine_stop_iter: int = 15_000
    """No statistics, refinement or opacity reset from this step on."""
    refine_every: int = 100
    """Refine every this many steps."""
    reset_every: int = 3000
    """Reset opacities every this many steps (before ``refine_stop_iter``)."""
    pause_refine_after_reset: Optional[int] = None
    """Skip refinement for this many steps after an opacity reset (the reset step
    included). ``None`` means ``refine_every``."""
    grad_threshold: float = 0.0002
    """Densify Gaussians whose average NDC view-space gradient norm exceeds this."""
    absgrad: bool = False
    """Use the absolute view-space gradients (AbsGS); needs ``means2d.absgrad``."""
    absgrad_threshold: float = 0.0008
    """Threshold used instead of ``grad_threshold`` when ``absgrad``."""
    dense_percent: float = 0.01
    """Clone if max scale <= dense_percent * scene_extent, else split."""
    prune_opacity: float = 0.005
    """Prune Gaussians with opacity below this."""
    prune_scale_world: float = 0.1
    """After the first reset, prune if max scale > prune_scale_world * scene_extent."""
    prune_screen_size_px: Optional[float] = None
    """After the first reset, prune if the max screen radius (pixels) seen since the
    last refinement exceeds this (the paper uses 20). ``None`` (default) disables it: on
    lego at 800x800, 30k steps on one H200 GPU, pruning at 20 px gave 27.75 dB test PSNR with
    74k Gaussians, disabling it 32.91 dB with 274k (BENCHMARKS.md)."""
    reset_at_refine_start: Optional[bool] = None
    """Also reset opacities at ``refine_start_iter``. None: only with a white background, as the 3DGS reference
    code does (random initial Gaussians that learned to imitate the white background would otherwise survive as
    floaters that hide the object in novel views)."""
    reset_opacity_value: float = 0.01
    """Opacities are clamped to at most this value at each reset."""
    n_split: int = 2
    """Number of children of a split Gaussian."""
    scale_divisor: float = 1.6
    """Children scales = parent scales / scale_divisor."""
    max_gaussians: Optional[int] = None
    """Never grow beyond this many Gaussians (largest gradients win)."""
    verbose: bool = False

    # ------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------

    def initialize_state(
        self,
        scene_extent: float = 1.0,
        *,
        scene_scale: Optional[float] = None,
        white_background: bool = False,
    ) -> Dict[str, Any]:
        """Fresh strategy state. Per-Gaussian accumulators are created lazily (their
        size follows the parameters through every grow / prune op). ``scene_scale``
        is accepted as an alias of ``scene_extent`` (gsplat's keyword)."""
        if scene_scale is not None:
            scene_extent = scene_scale
        reset_at_start = self.reset_at_refine_start
        if reset_at_start is None:
            reset_at_start = bool(white_background)
        return {
            "scene_extent": float(scene_extent),
            "reset_at_refine_start": reset_at_start,
            "grad2d": None,  # [N] summed NDC gradient norms
            "count": None,  # [N] number of views where the Gaussian was visible
            "max_radii2d": None,  # [N] max radius / max(width, height)
            "image_size": None,  # max(width, height) of the last update (pixels)
            "n_resets": 0,
        }

    def check_sanity(
        self,
        params: Mapping[str, torch.nn.Parameter],
        optimizers: Mapping[str, torch.optim.Optimizer],
    ) -> None:
        """Raise ``ValueError`` if params / optimizers do not follow the expected
        layout (see module docstring of :mod:`.ops`)."""
        missing = [k for k in ("means", "scales", "quats", "opacities") if k not in params]
        if missing:
            raise ValueError(f"params is missing required entries {missing}")
        n = ops.num_gaussians(params)
        for name, p in params.items():
            if not isinstance(p, torch.nn.Parameter):
                raise ValueError(f"params['{name}'] must be an nn.Parameter, got {type(p)}")
            if p.dim() < 1 or p.shape[0] != n:
                raise ValueError(
                    f"params['{name}'] has shape {tuple(p.shape)}; all params must share "
                    f"the first dimension N={n}"
                )
        for name, tail in _REQUIRED_SHAPES.items():
            if tuple(params[name].shape[1:]) != tail:
                raise ValueError(
                    f"params['{name}'] must have shape [N,{','.join(map(str, tail))}], "
                    f"got {tuple(params[name].shape)}"
                )
        if tuple(params["opacities"].shape[1:]) not in ((), (1,)):
            raise ValueError(
                f"params['opacities'] must have shape [N,1] or [N], "
                f"got {tuple(params['opacities'].shape)}"
            )
        if "features_dc" in params and params["features_dc"].shape[-1] != 3:
            raise ValueError(
                f"params['features_dc'] must have shape [N,3], "
                f"got {tuple(params['features_dc'].shape)}"
            )
        if "features_rest" in params and (
            params["features_rest"].dim() != 3 or params["features_rest"].shape[-1] != 3
        ):
            raise ValueError(
                f"params['features_rest'] must have shape [N,K,3], "
                f"got {tuple(params['features_rest'].shape)}"
            )
        for name, p in params.items():
            if name not in optimizers:
                raise ValueError(f"no optimizer for params['{name}']")
            opt = optimizers[name]
            groups = opt.param_groups
            if len(groups) != 1 or len(groups[0]["params"]) != 1:
                raise ValueError(
                    f"optimizers['{name}'] must have exactly one param group with exactly "
                    f"one parameter (got {len(groups)} group(s) with "
                    f"{[len(g['params']) for g in groups]} parameter(s))"
                )
            if groups[0]["params"][0] is not p:
                raise ValueError(
                    f"optimizers['{name}'] does not hold params['{name}'] itself"
                )

    # ------------------------------------------------------------------------------
    # per-step hooks
    # ------------------------------------------------------------------------------

    def step_pre_backward(
        self,
        params: Mapping[str, torch.nn.Parameter],
        optimizers: Mapping[str, torch.optim.Optimizer],
        state: Dict[str, Any],
        step: int,
        info: Dict[str, Any],
    ) -> None:
        """Ask autograd to keep the view-space gradient of ``means2d``."""
        if "means2d" not in info:
            raise KeyError("info must contain 'means2d' (the projected 2D means)")
        info["means2d"].retain_grad()

    def step_post_backward(
        self,
        params: MutableMapping[str, torch.nn.Parameter],
        optimizers: Mapping[str, torch.optim.Optimizer],
        state: Dict[str, Any],
        step: int,
        info: Dict[str, Any],
        packed: bool = False,
    ) -> Dict[str, int]:
        """Accumulate statistics and refine / reset on schedule.

        Returns ``{"n_cloned", "n_split", "n_pruned", "n_total"}`` when it refined this
        step, else an empty dict.
        """
        if step >= self.refine_stop_iter:
            return {}

        self._update_state(params, state, info, packed)

        stats: Dict[str, int] = {}
        if self._is_refine_step(step):
            stats = self._refine(params, optimizers, state, step)

        if (step > 0 and step % self.reset_every == 0) or (
            step == self.refine_start_iter and state.get("reset_at_refine_start", False)
        ):
            ops.reset_opacity(params, optimizers, state, value=self.reset_opacity_value)
            state["n_resets"] = int(state.get("n_resets", 0)) + 1
        return stats

    # ------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------

    def _pause(self) -> int:
        if self.pause_refine_after_reset is None:
            return self.refine_every
        return self.pause_refine_after_reset

    def _is_refine_step(self, step: int) -> bool:
        if step <= self.refine_start_iter or step >= self.refine_stop_iter:
            return False
        if step % self.refine_every != 0:
            return False
        if step >= self.reset_every and step % self.reset_every < self._pause():
            return False
        return True

    @torch.no_grad()
    def _update_state(
        self,
        params: Mapping[str, torch.nn.Parameter],
        state: Dict[str, Any],
        info: Dict[str, Any],
        packed: bool,
    ) -> None:
        for key in ("means2d", "radii", "width", "height", "n_cameras"):
            if key not in info:
                raise KeyError(f"info is missing '{key}'")
        means2d = info["means2d"]
        grads = getattr(means2d, "absgrad", None) if self.absgrad else means2d.grad
        if grads is None:
            raise RuntimeError(
                "info['means2d'] has no "
                + ("absgrad (rasterize with absgrad=True)" if self.absgrad else "grad")
                + "; call step_pre_backward before loss.backward()"
            )
        grads = grads.detach()
        width, height = float(info["width"]), float(info["height"])
        n_cameras = float(info["n_cameras"])
        scale_x, scale_y = width / 2.0 * n_cameras, height / 2.0 * n_cameras

        radii = info["radii"].detach()
        n = ops.num_gaussians(params)
        if packed:
            if radii.dim() == 2:  # [nnz, 2]
                radii = radii.max(dim=-1).values
            gs_ids = info["gaussian_ids"].reshape(-1).long()
            grads = grads.reshape(-1, 2)
            radii = radii.reshape(-1)
        else:
            if radii.dim() == grads.dim():  # [C, N, 2] radii (newer gsplat)
                radii = radii.max(dim=-1).values
            if grads.dim() == 2:  # single camera without batch dim
                grads, radii = grads.unsqueeze(0), radii.unsqueeze(0)
            if grads.shape[1] != n or radii.shape[1] != n:
                raise ValueError(
                    f"info has gradients for {grads.shape[1]} Gaussians / radii for "
                    f"{radii.shape[1]}, but params hold {n}"
                )
            gs_ids = None  # [C, N]: entries already sit at their Gaussian's index
        device = grads.device
        for key in ("grad2d", "count", "max_radii2d"):
            v = state.get(key)
            if v is None:
                state[key] = torch.zeros(n, device=device, dtype=torch.float32)
            elif v.shape[0] != n:
                raise RuntimeError(
                    f"strategy state '{key}' tracks {v.shape[0]} Gaussians but params "
                    f"hold {n}; params were changed outside of the strategy ops"
                )
        image_size = max(width, height)
        state["image_size"] = image_size
        if gs_ids is None:
            accumulate_view_stats(grads, radii, scale_x, scale_y, 1.0 / image_size, state["grad2d"], state["count"],
                                  state["max_radii2d"])
        else:
            # Packed: entries are (camera, Gaussian) pairs of visible Gaussians only.
            visible = (radii > 0).float()
            norms = torch.hypot(grads[..., 0] * scale_x, grads[..., 1] * scale_y).float() * visible
            radii_frac = radii.float() * visible / image_size
            state["grad2d"].index_add_(0, gs_ids, norms)
            state["count"].index_add_(0, gs_ids, visible)
            state["max_radii2d"].scatter_reduce_(0, gs_ids, radii_frac, reduce="amax", include_self=True)

    @torch.no_grad()
    def _refine(
        self,
        params: MutableMapping[str, torch.nn.Parameter],
        optimizers: Mapping[str, torch.optim.Optimizer],
        state: Dict[str, Any],
        step: int,
    ) -> Dict[str, int]:
        n_before = ops.num_gaussians(params)
        n_cloned = n_split = 0
        if state.get("grad2d") is not None:
            n_cloned, n_split = self._grow(params, optimizers, state, step)
        n_pruned = self._prune(params, optimizers, state, step)
        n_total = ops.num_gaussians(params)
        self._reset_accumulators(params, state)
        if self.verbose:
            print(
                f"[ADC] step {step}: {n_before} -> {n_total} Gaussians "
                f"(cloned {n_cloned}, split {n_split}, pruned {n_pruned})"
            )
        return {
            "n_cloned": n_cloned,
            "n_split": n_split,
            "n_pruned": n_pruned,
            "n_total": n_total,
        }

    def _grow(self, params, optimizers, state, step):
        extent = state["scene_extent"]
        avg_grad = state["grad2d"] / state["count"].clamp_min(1.0)
        threshold = self.absgrad_threshold if self.absgrad else self.grad_threshold
        high = avg_grad > threshold
        max_scale = torch.exp(params["scales"].detach()).amax(dim=-1)
        small = max_scale <= self.dense_percent * extent
        is_clone = high & small
        is_split = high & ~small

        if self.max_gaussians is not None:
            is_clone, is_split = self._apply_budget(
                avg_grad, is_clone, is_split, ops.num_gaussians(params)
            )

        n_cloned = ops.duplicate(params, optimizers, state, is_clone)
        # clones are appended at the end and are never split in the same step
        is_split = torch.cat(
            [is_split, is_split.new_zeros(ops.num_gaussians(params) - is_split.shape[0])]
        )
        n_split_sel = int(is_split.sum().item())
        ops.split(
            params,
            optimizers,
            state,
            is_split,
            n_split=self.n_split,
            scale_divisor=self.scale_divisor,
        )
        return n_cloned, n_split_sel

    def _apply_budget(self, avg_grad, is_clone, is_split, n):
        budget = max(int(self.max_gaussians) - n, 0)
        cost = is_clone.long() + is_split.long() * (self.n_split - 1)
        if int(cost.sum().item()) <= budget:
            return is_clone, is_split
        candidates = torch.nonzero(is_clone | is_split, as_tuple=True)[0]
        order = torch.argsort(avg_grad[candidates], descending=True, stable=True)
        candidates = candidates[order]
        keep = candidates[torch.cumsum(cost[candidates], dim=0) <= budget]
        allowed = torch.zeros_like(is_clone)
        allowed[keep] = True
        return is_clone & allowed, is_split & allowed

    def _prune(self, params, optimizers, state, step) -> int:
        opac = torch.sigmoid(params["opacities"].detach().reshape(-1))
        is_prune = opac < self.prune_opacity
        if step > self.reset_every:
            extent = state["scene_extent"]
            max_scale = torch.exp(params["scales"].detach()).amax(dim=-1)
            is_prune |= max_scale > self.prune_scale_world * extent
            radii = state.get("max_radii2d")
            if (
                self.prune_screen_size_px is not None
                and radii is not None
                and state.get("image_size")
            ):
                is_prune |= radii * state["image_size"] > self.prune_screen_size_px
        return ops.remove(params, optimizers, state, is_prune)

    @staticmethod
    def _reset_accumulators(params, state) -> None:
        n = ops.num_gaussians(params)
        device = params["means"].device
        for key in ("grad2d", "count", "max_radii2d"):
            state[key] = torch.zeros(n, device=device, dtype=torch.float32)
