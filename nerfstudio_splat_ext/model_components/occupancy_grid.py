"""Empty-space skipping for splat-ext-nerf: an occupancy grid and packed ray marching, in plain PyTorch.

Why our own: nerfacc 0.5.2 (the version nerfstudio 1.1.5 pins) JIT-compiles CUDA code that no longer builds with
CUDA 13 (``cub::Equality`` was removed from CCCL), so its ``OccGridEstimator`` fails on current toolkits. This module
needs no compiler and runs on any device, so the CPU tests cover the same sampling code as the GPU.

The method is the occupancy grid of Instant-NGP / nerfacc with one level:
  * the grid holds, per cell, an exponential moving maximum of the opacity ``sigma * step`` at random points in
    the cell (``update``); a cell is occupied when that value exceeds ``min(threshold, mean)``;
  * rays march from the box entry to the box exit in fixed steps (stratified offset in training); samples in
    unoccupied cells are dropped (``sample``);
  * optionally a gradient-free density pass drops the samples that cannot matter: transmittance below
    ``early_stop_eps`` (behind opaque surfaces) or alpha below ``alpha_threshold``; the network is then evaluated
    with gradients on the survivors only;
  * samples are packed (``ray_indices`` sorted by ray, then by depth) and composited by :func:`render_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass
class PackedSamples:
    """Samples of a batch of rays, sorted by ray then by depth."""

    ray_indices: Tensor  # [S] long
    t_starts: Tensor  # [S]
    t_ends: Tensor  # [S]
    num_rays: int

    def select(self, mask: Tensor) -> "PackedSamples":
        """The samples where ``mask`` [S] is true, in the same order. One ``nonzero`` and three gathers: indexing
        each field with the boolean mask would read its count back to the host three times."""
        keep = torch.nonzero(mask).flatten()
        return PackedSamples(self.ray_indices[keep], self.t_starts[keep], self.t_ends[keep], self.num_rays)


def ray_aabb(origins: Tensor, directions: Tensor, aabb: Tensor) -> tuple:
    """Entry and exit distances of rays through the box ``aabb`` [2, 3] (exit < entry: the ray misses it)."""
    inv = 1.0 / torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far


def transmittance(tau: Tensor, ray_indices: Tensor) -> Tensor:
    """Transmittance before each packed sample, ``exp(-sum of tau over the earlier samples of its ray)``.

    The per-ray exclusive sum is a global cumulative sum minus its value at each ray's first sample; it is taken in
    float64 because the global sum over a batch is large and float32 would lose the per-ray differences."""
    if tau.numel() == 0:
        return tau
    exclusive = torch.cumsum(tau.double(), 0) - tau.double()
    # ray_indices are sorted, so a binary search finds each ray's first sample (one kernel; a cummax scan over
    # the samples measured about 0.4 ms per call on the GPU).
    start_of_ray = torch.searchsorted(ray_indices, ray_indices)
    return torch.exp(-(exclusive - exclusive[start_of_ray])).to(tau.dtype)


def render_weights(sigmas: Tensor, samples: PackedSamples) -> Tensor:
    """Volume-rendering weights ``T_i (1 - exp(-sigma_i delta_i))`` of packed samples."""
    tau = sigmas.reshape(-1) * (samples.t_ends - samples.t_starts)
    return transmittance(tau, samples.ray_indices) * (1.0 - torch.exp(-tau))


def accumulate(values: Tensor, weights: Tensor, samples: PackedSamples) -> Tensor:
    """Per-ray sum of ``weights * values`` ([S, D] -> [num_rays, D])."""
    out = torch.zeros(samples.num_rays, values.shape[-1], dtype=values.dtype, device=values.device)
    return out.index_add(0, samples.ray_indices, weights[:, None].to(values.dtype) * values)


class OccupancyGrid(nn.Module):
    """A ``resolution^3`` occupancy grid over ``aabb`` ([2, 3]) with packed ray marching."""

    def __init__(self, aabb: Tensor, resolution: int = 128, threshold: float = 0.01, ema_decay: float = 0.95,
                 warmup_steps: int = 256) -> None:
        super().__init__()
        self.resolution = int(resolution)
        self.threshold = float(threshold)
        self.ema_decay = float(ema_decay)
        self.warmup_steps = int(warmup_steps)
        self.register_buffer("aabb", aabb.reshape(2, 3).float().clone())
        cells = self.resolution**3
        # Everything starts occupied: nothing is skipped before the first update has looked at the network.
        self.register_buffer("opacity", torch.zeros(cells))
        self.register_buffer("occupied", torch.ones(cells, dtype=torch.bool))
        # Derived from `occupied` (not saved; rebuilt by `update` and after loading a checkpoint):
        # - the bounding box of the occupied cells: rays are marched only through it, not the whole scene box;
        # - the occupancy dilated by one cell: the coarse pass of `sample` tests it at the centre of each stretch of
        #   a ray that is at most one cell long, which cannot miss an occupied cell the stretch touches.
        self.register_buffer("occupied_aabb", self.aabb.clone(), persistent=False)
        self.register_buffer("occupied_dilated", torch.ones(cells, dtype=torch.bool), persistent=False)
        self._min_cell_side: Optional[float] = None  # host copy, filled on first use
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._after_load())

    # ------------------------------------------------------------------ update
    def _cell_centres(self, indices: Tensor, jitter: bool) -> Tensor:
        r = self.resolution
        ijk = torch.stack([indices // (r * r), (indices // r) % r, indices % r], -1).float()
        offset = torch.rand_like(ijk) if jitter else torch.full_like(ijk, 0.5)
        unit = (ijk + offset) / r
        return self.aabb[0] + unit * (self.aabb[1] - self.aabb[0])

    @torch.no_grad()
    def update(self, step: int, opacity_fn: Callable[[Tensor], Tensor], chunk: int = 1 << 18) -> None:
        """Refreshes the cells: all of them during warm-up, then a random quarter plus the occupied ones.
        ``opacity_fn(points [N, 3]) -> [N]`` returns ``sigma * step_size``."""
        cells = self.opacity.numel()
        device = self.opacity.device
        if step < self.warmup_steps:
            indices = torch.arange(cells, device=device)
        else:
            random_cells = torch.randint(0, cells, (cells // 4,), device=device)
            occupied = torch.nonzero(self.occupied).flatten()
            if occupied.numel() > cells // 4:
                occupied = occupied[torch.randint(0, occupied.numel(), (cells // 4,), device=device)]
            indices = torch.cat([random_cells, occupied])
        fresh = torch.empty(indices.numel(), device=device)
        for start in range(0, indices.numel(), chunk):
            points = self._cell_centres(indices[start:start + chunk], jitter=True)
            fresh[start:start + chunk] = opacity_fn(points).reshape(-1).float()
        decayed = self.opacity * self.ema_decay
        decayed[indices] = torch.maximum(decayed[indices], fresh)
        self.opacity.copy_(decayed)
        cut = min(self.threshold, float(self.opacity.mean()))
        self.occupied.copy_(self.opacity > cut)
        self._refresh_derived()

    def _after_load(self) -> None:
        self._min_cell_side = None  # the box may differ in the checkpoint
        self._refresh_derived()

    @torch.no_grad()
    def _refresh_derived(self) -> None:
        r = self.resolution
        self.occupied_aabb.copy_(self._occupied_bounds())
        grid = self.occupied.reshape(1, 1, r, r, r).float()
        self.occupied_dilated.copy_(torch.nn.functional.max_pool3d(grid, 3, stride=1, padding=1).reshape(-1) > 0)

    def _occupied_bounds(self) -> Tensor:
        """Box around the occupied cells, one cell wider on each side (the whole box when nothing is occupied)."""
        r = self.resolution
        cells = torch.nonzero(self.occupied).flatten()
        if cells.numel() == 0:
            return self.aabb.clone()
        ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], -1)
        lo = (ijk.amin(0) - 1).clamp(min=0).float() / r
        hi = (ijk.amax(0) + 2).clamp(max=r).float() / r
        size = self.aabb[1] - self.aabb[0]
        return torch.stack([self.aabb[0] + lo * size, self.aabb[0] + hi * size])

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())

    # ------------------------------------------------------------------ sampling
    def _occupied_at(self, points: Tensor) -> Tensor:
        r = self.resolution
        unit = (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        ijk = (unit * r).long().clamp(0, r - 1)
        inside = ((unit >= 0) & (unit <= 1)).all(-1)
        return inside & self.occupied[(ijk[..., 0] * r + ijk[..., 1]) * r + ijk[..., 2]]

    def _near_occupied(self, points: Tensor) -> Tensor:
        """True where the cell of ``points`` (clamped into the grid) or one of its 26 neighbours is occupied."""
        r = self.resolution
        ijk = ((points - self.aabb[0]) / (self.aabb[1] - self.aabb[0]) * r).long().clamp(0, r - 1)
        return self.occupied_dilated[(ijk[..., 0] * r + ijk[..., 1]) * r + ijk[..., 2]]

    def _steps_per_stretch(self, step_size: float) -> int:
        """Fine steps per coarse stretch: as many as fit in the smallest cell side (at least 1)."""
        # Kept on the host (reading it from the device buffer every step would be a synchronisation).
        if self._min_cell_side is None:
            self._min_cell_side = float(((self.aabb[1] - self.aabb[0]) / self.resolution).min())
        return max(1, int(self._min_cell_side / step_size))

    @torch.no_grad()
    def sample(
        self,
        origins: Tensor,
        directions: Tensor,
        step_size: float,
        near_plane: float = 0.0,
        stratified: bool = False,
        sigma_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        alpha_threshold: float = 0.0,
        early_stop_eps: float = 1e-4,
        chunk_samples: int = 1 << 22,
        density_chunk: int = 0,
    ) -> PackedSamples:
        """March the rays through the occupied cells. ``sigma_fn(positions, directions) -> sigma`` (no gradient)
        enables the transmittance / alpha culling. ``density_chunk`` > 0: the density pass runs front to back in
        rounds of that many samples per ray and stops for rays that are already opaque, instead of evaluating every
        marched sample (most lie behind the first surface)."""
        num_rays = origins.shape[0]
        t_near, t_far = ray_aabb(origins, directions, self.occupied_aabb)
        t_near = t_near.clamp(min=near_plane)
        hits = t_far > t_near
        device = origins.device
        # Interval k of a ray spans t_near + (k + offset -+ 0.5) step, clipped to [t_near, t_far], so that a ray's
        # intervals tile exactly its path inside the box; offset 0.5 (evaluation) or uniform (stratified training).
        offset = torch.rand(num_rays, device=device) if stratified else torch.full((num_rays,), 0.5, device=device)
        length = torch.where(hits, t_far - t_near, torch.zeros_like(t_near))
        counts = torch.where(hits, torch.ceil(length / step_size - offset + 0.5), torch.zeros_like(t_near)).long()
        max_steps = int(counts.max()) if num_rays else 0
        ray_idx_list, start_list, end_list = [], [], []
        m = self._steps_per_stretch(step_size)
        if max_steps > 0 and m == 1:
            # Rays in groups, so that the dense [rays, steps] candidate table stays within chunk_samples entries.
            group = max(1, chunk_samples // max_steps)
            k = torch.arange(max_steps, device=device, dtype=origins.dtype)
            for start in range(0, num_rays, group):
                sl = slice(start, start + group)
                base = t_near[sl, None] + (k[None] + offset[sl, None]) * step_size  # [g, K]
                lo = torch.maximum(base - 0.5 * step_size, t_near[sl, None])
                hi = torch.minimum(base + 0.5 * step_size, t_far[sl, None])
                mid = 0.5 * (lo + hi)
                valid = (k[None] < counts[sl, None]) & (hi > lo)
                keep = valid & self._occupied_at(origins[sl, None] + mid[..., None] * directions[sl, None])
                rows, cols = torch.nonzero(keep, as_tuple=True)
                ray_idx_list.append(rows + start)
                start_list.append(lo[rows, cols])
                end_list.append(hi[rows, cols])
        elif max_steps > 0:
            # Two levels, the same samples as the dense table above with a fraction of its work: stretches of m
            # steps (at most one cell long) are tested against the dilated occupancy at their centre, then only
            # the steps of the kept stretches are tested cell by cell.
            stretches = -(-max_steps // m)
            j = torch.arange(stretches, device=device, dtype=origins.dtype)
            fine = torch.arange(m, device=device)
            group = max(1, chunk_samples // stretches)
            for start in range(0, num_rays, group):
                sl = slice(start, start + group)
                centre = t_near[sl, None] + (j[None] * m + offset[sl, None] - 0.5 + 0.5 * m) * step_size
                near = (j[None] * m < counts[sl, None]) & self._near_occupied(
                    origins[sl, None] + centre[..., None] * directions[sl, None])
                rows_c, cols_c = torch.nonzero(near, as_tuple=True)
                rays = (rows_c + start)[:, None].expand(-1, m)  # [n, m]
                k = (cols_c[:, None] * m + fine[None]).to(origins.dtype)
                base = t_near[rays] + (k + offset[rays]) * step_size
                lo = torch.maximum(base - 0.5 * step_size, t_near[rays])
                hi = torch.minimum(base + 0.5 * step_size, t_far[rays])
                mid = 0.5 * (lo + hi)
                valid = (k < counts[rays]) & (hi > lo)
                keep = valid & self._occupied_at(origins[rays] + mid[..., None] * directions[rays])
                rows, cols = torch.nonzero(keep, as_tuple=True)
                ray_idx_list.append(rays[rows, cols])
                start_list.append(lo[rows, cols])
                end_list.append(hi[rows, cols])
        if ray_idx_list:
            ray_indices = torch.cat(ray_idx_list)
            t_starts, t_ends = torch.cat(start_list), torch.cat(end_list)
        else:
            ray_indices = torch.zeros(0, dtype=torch.long, device=device)
            t_starts = t_ends = torch.zeros(0, dtype=origins.dtype, device=device)
        t_mid = 0.5 * (t_starts + t_ends)
        samples = PackedSamples(ray_indices, t_starts, t_ends, num_rays)
        if sigma_fn is None or ray_indices.numel() == 0:
            return samples
        if density_chunk > 0:
            return self._cull_front_to_back(samples, origins, directions, sigma_fn, alpha_threshold, early_stop_eps,
                                            density_chunk)
        positions = origins[ray_indices] + t_mid[:, None] * directions[ray_indices]
        sigmas = sigma_fn(positions, directions[ray_indices]).reshape(-1).float()
        tau = sigmas * (t_ends - t_starts)
        alpha = 1.0 - torch.exp(-tau)
        return samples.select((alpha > alpha_threshold) & (transmittance(tau, ray_indices) > early_stop_eps))

    @staticmethod
    def _cull_front_to_back(samples: PackedSamples, origins: Tensor, directions: Tensor, sigma_fn, alpha_threshold: float,
                            early_stop_eps: float, chunk: int) -> PackedSamples:
        """The density pass of `sample` in rounds: round r evaluates the samples of rank [r*chunk, (r+1)*chunk)
        within their ray, for the rays whose transmittance is still above ``early_stop_eps``. Keeps the same samples
        as the one-shot pass (a sample behind an opaque stretch fails the transmittance test either way)."""
        ray_indices, t_starts, t_ends = samples.ray_indices, samples.t_starts, samples.t_ends
        total = ray_indices.numel()
        rank = torch.arange(total, device=ray_indices.device) - torch.searchsorted(ray_indices, ray_indices)
        depth_before = torch.zeros(samples.num_rays, dtype=torch.float64, device=ray_indices.device)
        keep = torch.zeros(total, dtype=torch.bool, device=ray_indices.device)
        max_rank = int(rank.max())
        for lo in range(0, max_rank + 1, chunk):
            alive = torch.exp(-depth_before) > early_stop_eps
            selected = torch.nonzero((rank >= lo) & (rank < lo + chunk) & alive[ray_indices]).flatten()
            if selected.numel() == 0:
                break
            rays = ray_indices[selected]
            t_mid = 0.5 * (t_starts[selected] + t_ends[selected])
            positions = origins[rays] + t_mid[:, None] * directions[rays]
            sigmas = sigma_fn(positions, directions[rays]).reshape(-1).float()
            tau = sigmas * (t_ends[selected] - t_starts[selected])
            trans = transmittance(tau, rays) * torch.exp(-depth_before[rays]).to(tau.dtype)
            keep[selected] = (1.0 - torch.exp(-tau) > alpha_threshold) & (trans > early_stop_eps)
            depth_before.index_add_(0, rays, tau.double())
        return samples.select(keep)
