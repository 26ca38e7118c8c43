"""Density control by render-loss contribution (after DeG, Yan et al., "Generative 3D Gaussians with learned density
control"), on top of the 3DGS schedule of :class:`ADCStrategy`.

Every ``contribution_every`` steps during densification the model hands the strategy what it needs to run the
contribution pass (``cuda/contribution.py``): the rasterizer's projected Gaussians and tile lists, the composited
colours, the background and ``dL/dC``, the gradient of the loss with respect to the rendered image. For each Gaussian
``j`` the pass returns ``delta_loss[j]``, the first-order change of the loss if ``j`` were removed; the strategy sums
it per Gaussian together with the number of passes in which ``j`` covered a pixel. With ``score = sum / passes``:

* prune: Gaussians measured in at least ``min_contribution_views`` passes whose removal lowers the loss by more than
  ``prune_contribution_ratio`` times the mean absolute score of the measured Gaussians, besides the 3DGS opacity /
  size rules. Not simply "score <= 0": the first-order change is proportional to the residual, so a Gaussian that
  fits its pixels well scores about 0 whatever its importance (removing it would raise the loss only at second
  order), and a zero threshold would delete about half of the well-fitted Gaussians at random. With
  ``prune_contribution_z`` the mean must also lie ``z`` standard errors below zero over the passes: under the L1
  term dL/dC is sign(residual), so the score of a well-fitted Gaussian is noise whose spread grows with its size, and
  the ratio test alone removed 20-30% of the Gaussians at every refinement (lego 100x100: 29.45 dB; with z = 2,
  30.42 dB);
* grow: among the Gaussians above the positional-gradient threshold (as in 3DGS), parents are drawn without
  replacement with probability proportional to their (positive) score until the budget is used; with
  ``fill_budget``, what is left of the allowance is drawn the same way from all measured Gaussians with a positive
  score; small parents are cloned, large ones split into children sampled from the parent's 3D Gaussian
  (``ops.split``);
* budget: the number of Gaussians never exceeds ``max_gaussians`` (default: ``budget_growth_factor`` times the
  initial count); the allowance ramps linearly from the initial
  count to the cap between ``refine_start_iter`` and ``budget_ramp_until`` (default: half of densification, all of
  it when the run thins);
* swap: once the allowance stops the gradient candidates from growing, up to ``swap_fraction`` of the Gaussians, the
  least visible ones (smallest blending weight summed over the contribution passes, never a candidate), are removed
  first to make room, so that the fixed budget keeps moving to where the image is not yet fitted.
* thin (``final_gaussians``): densification may grow to ``max_gaussians``, then ends by removing the Gaussians that
  render least: for the ``thin_window`` steps after ``refine_stop_iter`` the pass runs on every step and sums each
  Gaussian's blending weight over the pixels it covers; at the end of the window all but the ``final_gaussians``
  largest sums go, and the rest of the run fine-tunes what is left (pruning by rendered weight after densification,
  as in LightGaussian / Mini-Splatting, keeps the quality of the larger model at a fraction of its size).

With ``kind="adc"`` no contribution is computed and the class behaves exactly like :class:`ADCStrategy` (so one
config field can select either from the command line: ``--pipeline.model.strategy.kind contribution``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Mapping, MutableMapping, Optional

import torch

from . import ops
from .adc import ADCStrategy

__all__ = ["ContributionStrategy"]

_CONTRIBUTION_KEYS = ("contrib_sum", "contrib_sq", "contrib_views", "contrib_weight")


@dataclass
class ContributionStrategy(ADCStrategy):
    """3DGS density control with contribution-based pruning and contribution-weighted growth (``kind``)."""

    kind: Literal["auto", "adc", "contribution"] = "auto"
    """'adc': Kerbl et al.'s gradient heuristics only; 'contribution': also use the render-loss contribution. 'auto':
    the splat-ext model picks 'contribution' for photographs (no background colour) and 'adc' for objects composited
    on a known background (one H200 GPU: fox 7k 31.63 dB vs 29.13 with adc; lego 30k 35.56 vs 35.78, BENCHMARKS.md);
    left unresolved, 'auto' behaves as 'adc'."""
    budget_growth_factor: float = 2.0
    """With kind 'contribution' and no ``max_gaussians``: the budget is this many times the initial count (a
    contribution run always has a budget, so it cannot run out of memory by densifying)."""
    contribution_every: int = 10
    """Run the contribution pass every this many steps while densifying (its cost is about half a rasterization
    forward + backward). On fox at 7k steps (one H200 GPU) every 10th step instead of every 5th cut the training loop
    from 32.8 s to 29.3 s at the same test PSNR (31.58 vs 31.37 dB: BENCHMARKS.md)."""
    prune_contribution_ratio: float = 1.0
    """Prune when removing the Gaussian lowers the loss (first order, mean per pass) by more than this times the
    mean absolute score of the measured Gaussians (a scale-free threshold: scores are in loss units)."""
    prune_contribution_z: Optional[float] = 2.0
    """...and the mean score lies more than this many standard errors (of the per-pass scores) below zero, so that
    only a consistent gain is acted on, not L1 noise. None: the ratio test alone (BENCHMARKS.md 00b, 00b')."""
    min_contribution_views: int = 3
    """Only Gaussians measured in at least this many contribution passes since the last refinement are pruned by
    contribution."""
    fill_budget: bool = True
    """Growth also draws parents below the positional-gradient threshold (probability proportional to a positive
    score) until the allowance is used. Without it, growth gated by the gradient alone left lego at 70k of a 170k
    allowance (BENCHMARKS.md 00b)."""
    budget_ramp_until: Optional[int] = None
    """Step at which the allowance reaches ``max_gaussians``. None: half of ``refine_stop_iter``, or
    ``refine_stop_iter`` itself when the run thins (``final_gaussians``): on lego at 30k steps (one H100 GPU), growing
    to 290k until step 15k instead of 7.5k, then thinning to 170k, gave 36.21 dB in 136 s against 36.11 dB in 156 s:
    fewer Gaussians to render while densifying, the same count at the thinning (BENCHMARKS.md)."""
    swap_fraction: float = 0.3
    """When the allowance stops gradient candidates from growing, first remove up to this fraction of the Gaussians,
    the least visible non-candidates, to make room (0: growth simply stops at the cap). On lego 100x100 it moved
    30.42 dB to 30.79 dB at the same count (seed 1: 30.70); 0.1 gave 30.69, 0.5 30.61."""
    final_gaussians: Optional[int] = None
    """Thin to this many Gaussians at the end of densification (see the module docstring); None: no thinning. On lego
    at 30k steps (one H100 GPU), growing to 290k then thinning to 170k gave 36.13 dB against adc's 35.78 dB with 292k,
    and capped at 170k throughout 35.56-35.62 dB (BENCHMARKS.md)."""
    thin_window: int = 300
    """Steps after ``refine_stop_iter`` over which the thinning weights are summed, one contribution pass per step:
    every training view should come up at least once (nerfstudio's image datamanager draws each view once per epoch)."""

    # ------------------------------------------------------------------ state
    def initialize_state(self, scene_extent: float = 1.0, *, scene_scale: Optional[float] = None,
                         white_background: bool = False) -> Dict[str, Any]:
        state = super().initialize_state(scene_extent, scene_scale=scene_scale, white_background=white_background)
        state.update({"contrib_sum": None, "contrib_views": None, "n_initial": None})
        return state

    def wants_contribution(self, step: int) -> bool:
        """Whether the model should prepare the contribution pass for this step (retain dL/dC, composited colours)."""
        if self.kind != "contribution":
            return False
        if step < self.refine_stop_iter:
            return step % self.contribution_every == 0
        return self._thinning(step)

    def _thinning(self, step: int) -> bool:
        """Whether ``step`` lies in the window whose blending weights decide the thinning."""
        return (
            self.kind == "contribution"
            and self.final_gaussians is not None
            and self.refine_stop_iter <= step < self.refine_stop_iter + self.thin_window
        )

    def budget_at(self, step: int, n_initial: int) -> Optional[int]:
        """How many Gaussians may exist after refining at ``step`` (None: no cap)."""
        if self.kind != "contribution":
            return None if self.max_gaussians is None else int(self.max_gaussians)
        cap = int(self.max_gaussians if self.max_gaussians is not None else self.budget_growth_factor * n_initial)
        ramp_end = self.budget_ramp_until
        if ramp_end is None:
            ramp_end = self.refine_stop_iter if self.final_gaussians is not None else self.refine_stop_iter // 2
        span = max(ramp_end - self.refine_start_iter, 1)
        progress = min(max((step - self.refine_start_iter) / span, 0.0), 1.0)
        start = min(n_initial, cap)
        return int(start + (cap - start) * progress)

    # ------------------------------------------------------------------ hooks
    def step_post_backward(self, params: MutableMapping[str, torch.nn.Parameter],
                           optimizers: Mapping[str, torch.optim.Optimizer], state: Dict[str, Any], step: int,
                           info: Dict[str, Any], packed: bool = False) -> Dict[str, int]:
        if state.get("n_initial") is None:
            state["n_initial"] = ops.num_gaussians(params)
        thinning = self._thinning(step)
        if thinning and step == self.refine_stop_iter:
            self._reset_accumulators(params, state)  # the window's sums start from zero
        if self.kind == "contribution" and (step < self.refine_stop_iter or thinning) and "contribution" in info:
            self._accumulate_contribution(params, state, info["contribution"])
        if thinning and step == self.refine_stop_iter + self.thin_window - 1:
            return self._thin(params, optimizers, state, step)
        return super().step_post_backward(params, optimizers, state, step, info, packed)

    @torch.no_grad()
    def _accumulate_contribution(self, params, state, inputs: Dict[str, Any]) -> None:
        """``inputs``: the keyword arguments of ``render_loss_contribution`` except the tile lists, which may be
        missing (the CPU reference rasterizer does not build them) and are then built here."""
        from nerfstudio_splat_ext.cuda.contribution import isect_lists_reference, render_loss_contribution

        inputs = dict(inputs)
        grad = inputs["grad_colors"]
        if grad is None:
            return  # the rendered image got no gradient this step
        if inputs.get("isect_offsets") is None:
            tile = int(inputs["tile_size"])
            inputs["isect_offsets"], inputs["flatten_ids"] = isect_lists_reference(
                inputs["means2d"], inputs.pop("radii"), inputs.pop("depths"), tile,
                -(-int(inputs["image_width"]) // tile), -(-int(inputs["image_height"]) // tile))
        else:
            inputs.pop("radii", None)
            inputs.pop("depths", None)
        delta, pixels, weight = render_loss_contribution(**inputs)
        n = ops.num_gaussians(params)
        for key in _CONTRIBUTION_KEYS:
            if state.get(key) is None or state[key].shape[0] != n:
                state[key] = torch.zeros(n, device=delta.device, dtype=torch.float32)
        state["contrib_sum"] += delta.float()
        state["contrib_sq"] += delta.float() ** 2
        state["contrib_views"] += (pixels > 0).float()
        state["contrib_weight"] += weight.float()

    def _scores(self, state) -> Optional[torch.Tensor]:
        if state.get("contrib_sum") is None:
            return None
        return state["contrib_sum"] / state["contrib_views"].clamp_min(1.0)

    # ------------------------------------------------------------------ refine
    def _swap_out(self, params, optimizers, state, step) -> int:
        """Remove the least visible Gaussians that stand between the gradient candidates and the cap."""
        n = ops.num_gaussians(params)
        weight = state.get("contrib_weight")
        budget = self.budget_at(step, state.get("n_initial") or n)
        if self.swap_fraction <= 0 or budget is None or weight is None or weight.shape[0] != n:
            return 0
        avg_grad = state["grad2d"] / state["count"].clamp_min(1.0)
        high = avg_grad > (self.absgrad_threshold if self.absgrad else self.grad_threshold)
        k = min(int(self.swap_fraction * n), int(high.sum().item()) * (self.n_split - 1) - max(budget - n, 0))
        if k <= 0:
            return 0
        order = torch.argsort(weight.masked_fill(high, float("inf")), stable=True)
        drop = torch.zeros(n, dtype=torch.bool, device=weight.device)
        drop[order[:k]] = True
        return ops.remove(params, optimizers, state, drop & ~high)

    def _grow(self, params, optimizers, state, step):
        if self.kind != "contribution":
            return super()._grow(params, optimizers, state, step)
        state["n_swapped"] = self._swap_out(params, optimizers, state, step)  # counted as pruned in _prune
        extent = state["scene_extent"]
        avg_grad = state["grad2d"] / state["count"].clamp_min(1.0)
        threshold = self.absgrad_threshold if self.absgrad else self.grad_threshold
        candidates = torch.nonzero(avg_grad > threshold, as_tuple=True)[0]
        n = ops.num_gaussians(params)
        budget = self.budget_at(step, state.get("n_initial") or n)
        room = candidates.numel() * self.n_split if budget is None else max(budget - n, 0)
        # A split adds n_split - 1 Gaussians, a clone one; count every parent as the dearer of the two.
        max_parents = room // max(self.n_split - 1, 1)
        if max_parents <= 0:
            return 0, 0
        scores = self._scores(state)
        n_parents = min(candidates.numel(), max_parents)
        if 0 < n_parents < candidates.numel():
            if scores is None:
                weights = avg_grad[candidates]
            else:
                positive = scores[candidates].clamp_min(0.0)
                # unmeasured or non-positive parents keep a small chance, so growth never stalls
                weights = positive + 1e-3 * positive.mean().clamp_min(1e-12)
            chosen = candidates[torch.multinomial(weights, n_parents, replacement=False)]
        else:
            chosen = candidates[:n_parents]
        selected = torch.zeros(n, dtype=torch.bool, device=avg_grad.device)
        selected[chosen] = True
        if self.fill_budget and budget is not None and scores is not None and n_parents < max_parents:
            # The rest of the allowance: parents drawn in proportion to their contribution (a learned density over
            # space, as in DeG), among measured Gaussians whose removal would raise the loss.
            pool = torch.nonzero(
                (state["contrib_views"] >= self.min_contribution_views) & (scores > 0) & ~selected, as_tuple=True
            )[0]
            k = min(pool.numel(), max_parents - n_parents)
            if k > 0:
                selected[pool[torch.multinomial(scores[pool], k, replacement=False)]] = True
        if not bool(selected.any()):
            return 0, 0
        small = torch.exp(params["scales"].detach()).amax(dim=-1) <= self.dense_percent * extent
        n_cloned = ops.duplicate(params, optimizers, state, selected & small)
        is_split = torch.cat([selected & ~small, selected.new_zeros(ops.num_gaussians(params) - n)])
        n_split = int(is_split.sum().item())
        ops.split(params, optimizers, state, is_split, n_split=self.n_split, scale_divisor=self.scale_divisor)
        return n_cloned, n_split

    def _prune(self, params, optimizers, state, step) -> int:
        removed = super()._prune(params, optimizers, state, step) + state.pop("n_swapped", 0)
        scores = self._scores(state)
        if self.kind != "contribution" or scores is None or scores.shape[0] != ops.num_gaussians(params):
            return removed
        measured = state["contrib_views"] >= self.min_contribution_views
        if not bool(measured.any()):
            return removed
        scale = scores[measured].abs().mean()
        useless = measured & (scores < -self.prune_contribution_ratio * scale)
        if self.prune_contribution_z is not None:
            views = state["contrib_views"].clamp_min(1.0)
            var = (state["contrib_sq"] / views - scores**2).clamp_min(0.0)
            useless &= scores < -self.prune_contribution_z * torch.sqrt(var / views)
        return removed + ops.remove(params, optimizers, state, useless)

    @torch.no_grad()
    def _thin(self, params, optimizers, state, step) -> Dict[str, int]:
        """Keep the ``final_gaussians`` Gaussians with the largest blending weight summed over the window."""
        n = ops.num_gaussians(params)
        weight = state.get("contrib_weight")
        excess = n - int(self.final_gaussians)
        n_thinned = 0
        if excess > 0 and weight is not None and weight.shape[0] == n:
            drop = torch.zeros(n, dtype=torch.bool, device=weight.device)
            drop[torch.argsort(weight, stable=True)[:excess]] = True
            n_thinned = ops.remove(params, optimizers, state, drop)
        for key in _CONTRIBUTION_KEYS:  # no density control follows: free the accumulators
            state[key] = None
        n_total = ops.num_gaussians(params)
        if self.verbose:
            print(f"[contribution] step {step}: thinned {n} -> {n_total} Gaussians by rendered weight")
        return {"n_cloned": 0, "n_split": 0, "n_pruned": n_thinned, "n_total": n_total}

    def _refine(self, params, optimizers, state, step):
        n_before = ops.num_gaussians(params)
        stats = super()._refine(params, optimizers, state, step)
        # Growth is budgeted, so this cannot happen; a start above the cap (more initial points than max_gaussians)
        # is allowed and only stops growth until pruning brings the count under the cap.
        if self.max_gaussians is not None and ops.num_gaussians(params) > max(int(self.max_gaussians), n_before):
            raise RuntimeError("density control grew beyond max_gaussians")
        return stats

    @staticmethod
    def _reset_accumulators(params, state) -> None:
        ADCStrategy._reset_accumulators(params, state)
        n = ops.num_gaussians(params)
        device = params["means"].device
        for key in _CONTRIBUTION_KEYS:
            if state.get(key) is not None:
                state[key] = torch.zeros(n, device=device, dtype=torch.float32)
