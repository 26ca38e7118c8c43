"""The lean fused-Adam step (engine/direct_adam.py) against torch's own Adam on fresh random problems."""

from __future__ import annotations

import torch

from nerfstudio_splat_ext.engine.direct_adam import direct_adam_step, supports_direct_step


def _problem(gen: torch.Generator):
    shapes = [(64, 3), (64, 15, 3), (64, 1), (64, 4)]
    lrs = [1.6e-4, 2.5e-3, 0.05, 1e-3]
    params = [torch.randn(s, generator=gen) for s in shapes]
    return params, lrs


def test_direct_step_matches_torch_adam_exactly():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    values, lrs = _problem(gen)
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    kwargs = [dict(lr=lr, eps=1e-15, weight_decay=0.01 * i, betas=(0.9, 0.99 - 0.01 * i)) for i, lr in enumerate(lrs)]
    opt_ours = [torch.optim.Adam([p], fused=True, **k) for p, k in zip(ours, kwargs)]
    opt_theirs = [torch.optim.Adam([p], fused=True, **k) for p, k in zip(theirs, kwargs)]
    assert all(supports_direct_step(o) for o in opt_ours)
    for step in range(6):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if step == 2 and i == 1:  # a parameter without a gradient is skipped, its step count unchanged
                a.grad = b.grad = None
                continue
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        direct_adam_step(opt_ours)
        for o in opt_theirs:
            o.step()
        for group in opt_ours[3].param_groups:  # learning rates are read at each step (schedulers change them)
            group["lr"] *= 0.5
        for group in opt_theirs[3].param_groups:
            group["lr"] *= 0.5
    for a, b, oa, ob in zip(ours, theirs, opt_ours, opt_theirs):
        assert torch.equal(a, b)
        sa, sb = oa.state[a], ob.state[b]
        assert sorted(sa) == sorted(sb)
        for key in sb:
            assert torch.equal(sa[key], sb[key]), key
    assert float(opt_ours[1].state[ours[1]]["step"]) == 5.0


def test_optimizers_it_cannot_reproduce_are_left_to_torch():
    p = torch.nn.Parameter(torch.zeros(3))
    assert not supports_direct_step(torch.optim.Adam([p], fused=False, foreach=False))
    assert not supports_direct_step(torch.optim.Adam([p], fused=True, amsgrad=True))
    assert not supports_direct_step(torch.optim.Adam([p], fused=True, maximize=True))
    assert not supports_direct_step(torch.optim.SGD([p], lr=0.1))
    hooked = torch.optim.Adam([p], fused=True)
    hooked.register_step_post_hook(lambda *a: None)
    assert not supports_direct_step(hooked)
