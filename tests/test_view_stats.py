"""Per-view densification statistics (cuda/view_stats.py): the reference against a per-Gaussian loop on fresh
random inputs. The CUDA kernel is compared with this reference on a GPU by benchmarks/check_view_stats.py."""

from __future__ import annotations

import math

import torch

from nerfstudio_splat_ext.cuda.view_stats import accumulate_view_stats, accumulate_view_stats_reference


def _random_view(C: int, N: int):
    grads = torch.randn(C, N, 2) * torch.rand(C, N, 1)
    radii = torch.randint(0, 40, (C, N), dtype=torch.int32) * (torch.rand(C, N) > 0.3)  # about 30% culled
    grads = grads * (radii > 0)[..., None]  # a culled Gaussian gets no gradient from the rasterizer
    start = (torch.rand(N) * 5, torch.randint(0, 4, (N,)).float(), torch.rand(N) * 0.02)
    return grads, radii.to(torch.int32), start


def test_reference_matches_a_per_gaussian_loop():
    C, N = 3, 200
    grads, radii, (g0, c0, r0) = _random_view(C, N)
    sx, sy, inv = 400.0 * C, 300.0 * C, 1.0 / 800.0
    grad2d, count, max_r = g0.clone(), c0.clone(), r0.clone()
    accumulate_view_stats_reference(grads, radii, sx, sy, inv, grad2d, count, max_r)
    for n in range(N):
        seen = [c for c in range(C) if int(radii[c, n]) > 0]
        expected_g = float(g0[n]) + sum(math.hypot(float(grads[c, n, 0]) * sx, float(grads[c, n, 1]) * sy) for c in seen)
        expected_r = max([float(r0[n])] + [int(radii[c, n]) * inv for c in seen])
        assert math.isclose(float(grad2d[n]), expected_g, rel_tol=1e-5, abs_tol=1e-5)
        assert float(count[n]) == float(c0[n]) + len(seen)
        assert math.isclose(float(max_r[n]), expected_r, rel_tol=1e-6)


def test_dispatcher_uses_the_reference_on_cpu():
    grads, radii, (g0, c0, r0) = _random_view(2, 50)
    outs = [(g0.clone(), c0.clone(), r0.clone()) for _ in range(2)]
    accumulate_view_stats(grads, radii, 10.0, 20.0, 0.01, *outs[0])
    accumulate_view_stats_reference(grads, radii, 10.0, 20.0, 0.01, *outs[1])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0][1], c0)  # it did add something
