"""The occupancy grid of splat-ext-nerf's fast path (model_components/occupancy_grid.py) against direct computations."""

from __future__ import annotations

import math

import torch

from nerfstudio_splat_ext.model_components.occupancy_grid import (
    OccupancyGrid,
    PackedSamples,
    accumulate,
    ray_aabb,
    render_weights,
)

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def _random_rays(n: int, gen: torch.Generator):
    origins = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1) * 3.0
    targets = (torch.rand(n, 3, generator=gen) * 2 - 1) * 0.8
    return origins, torch.nn.functional.normalize(targets - origins, dim=-1)


def test_packed_weights_match_per_ray_compositing():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    counts = torch.randint(0, 40, (13,), generator=gen)
    ray_indices = torch.repeat_interleave(torch.arange(13), counts)
    t = torch.cat([torch.sort(torch.rand(int(c), generator=gen) * 4).values for c in counts])
    delta = torch.rand(ray_indices.numel(), generator=gen) * 0.1
    samples = PackedSamples(ray_indices, t, t + delta, 13)
    sigmas = torch.rand(ray_indices.numel(), generator=gen) * 30
    weights = render_weights(sigmas, samples)
    colours = torch.rand(ray_indices.numel(), 3, generator=gen)
    rendered = accumulate(colours, weights, samples)
    for r in range(13):
        sel = ray_indices == r
        alpha = 1 - torch.exp(-sigmas[sel] * delta[sel])
        trans = torch.cumprod(torch.cat([torch.ones(1), 1 - alpha[:-1]]), 0)
        torch.testing.assert_close(weights[sel], trans * alpha, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rendered[r], (trans * alpha) @ colours[sel], atol=1e-5, rtol=1e-5)


def test_marching_covers_the_box_in_fixed_steps():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    origins, dirs = _random_rays(50, gen)
    grid = OccupancyGrid(BOX, resolution=8)  # everything occupied before any update
    step = 0.01
    samples = grid.sample(origins, dirs, step_size=step)
    t_near, t_far = ray_aabb(origins, dirs, BOX)
    counts = torch.bincount(samples.ray_indices, minlength=50)
    expected = torch.ceil((t_far - t_near) / step)
    assert ((counts - expected).abs() <= 1).all()
    # sorted by ray, then by depth, and inside [entry, exit]
    assert bool((samples.ray_indices[1:] >= samples.ray_indices[:-1]).all())
    same = samples.ray_indices[1:] == samples.ray_indices[:-1]
    assert bool((samples.t_starts[1:][same] > samples.t_starts[:-1][same]).all())
    mid = 0.5 * (samples.t_starts + samples.t_ends)
    assert bool((mid >= t_near[samples.ray_indices]).all() and (mid <= t_far[samples.ray_indices]).all())


def test_update_marks_the_cells_of_a_ball_and_marching_skips_the_rest():
    radius = 0.5
    grid = OccupancyGrid(BOX, resolution=32, warmup_steps=10)

    def opacity(points):  # a dense ball, empty space elsewhere
        return (points.norm(dim=-1) < radius).float() * 5.0

    grid.update(0, opacity)
    # cells entirely inside the ball are occupied, cells entirely outside are free (boundary cells: either)
    centres = grid._cell_centres(torch.arange(32**3), jitter=False)
    half_diag = math.sqrt(3) * (2.0 / 32) / 2
    inside = centres.norm(dim=-1) + half_diag < radius
    outside = centres.norm(dim=-1) - half_diag > radius
    assert bool(grid.occupied[inside].all()) and not bool(grid.occupied[outside].any())
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    origins, dirs = _random_rays(200, gen)
    samples = grid.sample(origins, dirs, step_size=0.005, stratified=True)
    mid = 0.5 * (samples.t_starts + samples.t_ends)
    points = origins[samples.ray_indices] + mid[:, None] * dirs[samples.ray_indices]
    assert bool((points.norm(dim=-1) < radius + 2 * math.sqrt(3) * 2.0 / 32).all())  # only near the ball
    # every ray through the ball keeps samples inside it
    through = torch.linalg.cross(origins, dirs).norm(dim=-1) < radius * 0.9
    hit = torch.bincount(samples.ray_indices[points.norm(dim=-1) < radius], minlength=200) > 0
    assert bool(hit[through].all())


def test_transmittance_culling_keeps_the_rendering():
    """Samples behind an opaque shell (transmittance < 1e-4) are dropped without changing the rendered colour."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    origins, dirs = _random_rays(100, gen)
    grid = OccupancyGrid(BOX, resolution=16)

    def sigma_fn(points, directions=None):
        return torch.where(points.norm(dim=-1) < 0.6, torch.full_like(points[:, 0], 200.0), torch.full_like(points[:, 0], 0.05))

    def colour(points):
        return torch.sigmoid(points * 3)

    def render(samples):
        mid = 0.5 * (samples.t_starts + samples.t_ends)
        pts = origins[samples.ray_indices] + mid[:, None] * dirs[samples.ray_indices]
        return accumulate(colour(pts), render_weights(sigma_fn(pts), samples), samples)

    full = grid.sample(origins, dirs, step_size=0.005)
    culled = grid.sample(origins, dirs, step_size=0.005, sigma_fn=sigma_fn, alpha_threshold=1e-4)
    assert culled.ray_indices.numel() < 0.8 * full.ray_indices.numel()
    torch.testing.assert_close(render(culled), render(full), atol=2e-3, rtol=0)


def test_front_to_back_density_pass_keeps_the_same_samples_with_fewer_evaluations():
    """The chunked density pass (rounds of a few samples per ray, stopping at opaque rays) keeps exactly the samples
    of the one-shot pass and evaluates the network on fewer points."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    centre = (torch.rand(3, generator=gen) - 0.5) * 0.4
    radius = 0.3 + 0.3 * float(torch.rand(1, generator=gen))
    origins, _ = _random_rays(150, gen)
    # two thirds aimed at the ball (they turn opaque inside it), the rest anywhere in the box
    targets = (torch.rand(150, 3, generator=gen) * 2 - 1) * 0.8
    targets[:100] = centre + (torch.rand(100, 3, generator=gen) - 0.5) * radius
    dirs = torch.nn.functional.normalize(targets - origins, dim=-1)
    grid = OccupancyGrid(BOX, resolution=16)
    evaluated = []

    def sigma_fn(points, directions=None):
        evaluated.append(points.shape[0])
        inside = (points - centre).norm(dim=-1) < radius
        return torch.where(inside, torch.full_like(points[:, 0], 2000.0), torch.full_like(points[:, 0], 0.2))

    one_shot = grid.sample(origins, dirs, step_size=0.005, sigma_fn=sigma_fn, alpha_threshold=1e-4)
    one_shot_evals, evaluated[:] = sum(evaluated), []
    chunked = grid.sample(origins, dirs, step_size=0.005, sigma_fn=sigma_fn, alpha_threshold=1e-4, density_chunk=16)
    assert torch.equal(chunked.ray_indices, one_shot.ray_indices)
    assert torch.equal(chunked.t_starts, one_shot.t_starts) and torch.equal(chunked.t_ends, one_shot.t_ends)
    assert sum(evaluated) < 0.7 * one_shot_evals


def test_marching_is_limited_to_the_occupied_bounding_box():
    grid = OccupancyGrid(BOX, resolution=32, warmup_steps=10)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    centre = (torch.rand(3, generator=gen) - 0.5) * 0.6
    grid.update(0, lambda p: ((p - centre).norm(dim=-1) < 0.25).float() * 5.0)
    lo, hi = grid.occupied_aabb
    cell = 2.0 / 32
    assert bool(((centre - 0.25 - lo) > 0).all() and ((centre - 0.25 - lo) < 3 * cell).all())
    assert bool(((hi - centre - 0.25) > 0).all() and ((hi - centre - 0.25) < 3 * cell).all())
    origins, dirs = _random_rays(100, gen)
    samples = grid.sample(origins, dirs, step_size=0.005)
    mid = 0.5 * (samples.t_starts + samples.t_ends)
    points = origins[samples.ray_indices] + mid[:, None] * dirs[samples.ray_indices]
    assert bool(((points >= lo - 1e-6) & (points <= hi + 1e-6)).all())


def test_two_level_marching_gives_the_dense_marchings_samples():
    """Stretches tested against the dilated occupancy, then steps cell by cell: exactly the samples of the dense
    [rays, steps] table, for random blobs of occupied cells and stratified offsets."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    grid = OccupancyGrid(BOX, resolution=24, warmup_steps=10)
    centres = (torch.rand(4, 3, generator=gen) * 2 - 1) * 0.7
    radii = 0.05 + 0.2 * torch.rand(4, generator=gen)
    grid.update(0, lambda p: ((p[:, None] - centres).norm(dim=-1) < radii).any(-1).float() * 5.0)
    assert 0.0 < grid.occupied_fraction() < 0.5
    origins, dirs = _random_rays(300, gen)
    step = 0.013  # 6 steps per cell of 2/24
    assert grid._steps_per_stretch(step) == 6
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    torch.manual_seed(seed)
    two_level = grid.sample(origins, dirs, step_size=step, stratified=True, chunk_samples=5000)
    grid._steps_per_stretch = lambda step_size: 1  # the dense table
    torch.manual_seed(seed)
    dense = grid.sample(origins, dirs, step_size=step, stratified=True, chunk_samples=5000)
    assert dense.ray_indices.numel() > 100
    assert torch.equal(two_level.ray_indices, dense.ray_indices)
    assert torch.equal(two_level.t_starts, dense.t_starts) and torch.equal(two_level.t_ends, dense.t_ends)


def test_derived_occupancy_is_rebuilt_when_a_checkpoint_loads():
    grid = OccupancyGrid(BOX, resolution=16, warmup_steps=10)
    grid.update(0, lambda p: ((p - 0.3).norm(dim=-1) < 0.2).float() * 5.0)
    fresh = OccupancyGrid(BOX, resolution=16, warmup_steps=10)
    fresh.load_state_dict(grid.state_dict())
    assert "occupied_aabb" not in grid.state_dict()  # derived, so older checkpoints load too
    assert torch.equal(fresh.occupied_aabb, grid.occupied_aabb)
    assert torch.equal(fresh.occupied_dilated, grid.occupied_dilated)
