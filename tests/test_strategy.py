"""Tests of the adaptive density control ops and strategy (CPU, random inputs)."""

import math

import pytest
import torch

from nerfstudio_splat_ext.strategy import (
    ADCStrategy,
    duplicate,
    quat_to_rotmat,
    remove,
    reset_opacity,
    split,
)

NAMES = ["means", "scales", "quats", "features_dc", "features_rest", "opacities"]
LR = 1e-2


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------


def make_gaussians(n=20, k=3, seed=0, dtype=torch.float32, warm_steps=2):
    """Random splatfacto-like params with one Adam per parameter, moments non-zero."""
    g = torch.Generator().manual_seed(seed)
    data = {
        "means": torch.randn(n, 3, generator=g),
        "scales": torch.randn(n, 3, generator=g) * 0.3 - 3.0,
        "quats": torch.randn(n, 4, generator=g),
        "features_dc": torch.rand(n, 3, generator=g),
        "features_rest": torch.randn(n, k, 3, generator=g) * 0.1,
        "opacities": torch.randn(n, 1, generator=g),
    }
    params = torch.nn.ParameterDict(
        {name: torch.nn.Parameter(v.to(dtype)) for name, v in data.items()}
    )
    optimizers = {
        name: torch.optim.Adam([params[name]], lr=LR, eps=1e-15) for name in NAMES
    }
    for _ in range(warm_steps):
        for name in NAMES:
            params[name].grad = torch.randn(params[name].shape, generator=g).to(dtype)
            optimizers[name].step()
            optimizers[name].zero_grad()
    return params, optimizers


def make_state(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "grad2d": torch.rand(n, generator=g),
        "count": torch.randint(0, 5, (n,), generator=g).float(),
        "scene_extent": 1.0,
        "image_size": None,
        "n_resets": 0,
    }


def snapshot(params, optimizers):
    out = {}
    for name in NAMES:
        st = optimizers[name].state[params[name]]
        out[name] = {
            "value": params[name].detach().clone(),
            "exp_avg": st["exp_avg"].clone(),
            "exp_avg_sq": st["exp_avg_sq"].clone(),
            "step": st["step"].clone(),
        }
    return out


def check_layout(params, optimizers, state=None):
    n = params["means"].shape[0]
    for name in NAMES:
        p = params[name]
        assert isinstance(p, torch.nn.Parameter)
        assert p.shape[0] == n
        opt = optimizers[name]
        assert len(opt.param_groups) == 1
        assert opt.param_groups[0]["params"][0] is p
        for key in ("exp_avg", "exp_avg_sq"):
            if p in opt.state:
                assert opt.state[p][key].shape == p.shape
        # no stale state entries for replaced parameters
        assert all(q is p for q in opt.state.keys())
    if state is not None:
        for key, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                assert v.shape[0] == n, key
    return n


def reference_adam(snap_entry, rows, grad):
    """What Adam would have done to the given old rows with the given gradient."""
    p = torch.nn.Parameter(snap_entry["value"][rows].clone())
    opt = torch.optim.Adam([p], lr=LR, eps=1e-15)
    opt.state[p] = {
        "step": snap_entry["step"].clone(),
        "exp_avg": snap_entry["exp_avg"][rows].clone(),
        "exp_avg_sq": snap_entry["exp_avg_sq"][rows].clone(),
    }
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def adam_step_all(params, optimizers, grads):
    for name in NAMES:
        params[name].grad = grads[name]
        optimizers[name].step()
        optimizers[name].zero_grad()


def check_adam_after_op(params, optimizers, snap, old_rows, new_rows, seed=5):
    """Run one Adam step on every parameter and check kept rows follow their old
    optimizer state while new rows start from zero moments."""
    g = torch.Generator().manual_seed(seed)
    before = {name: params[name].detach().clone() for name in NAMES}
    grads = {}
    for name in NAMES:
        gr = torch.randn(params[name].shape, generator=g).to(params[name].dtype)
        gr[new_rows[: len(new_rows) // 2]] = 0.0  # some new rows get no gradient
        grads[name] = gr
    adam_step_all(params, optimizers, grads)
    for name in NAMES:
        after = params[name].detach()
        kept_new_index = torch.arange(len(old_rows))
        ref = reference_adam(snap[name], old_rows, grads[name][kept_new_index])
        torch.testing.assert_close(after[kept_new_index], ref)
        if len(new_rows):
            zero_rows = new_rows[: len(new_rows) // 2]
            moved_rows = new_rows[len(new_rows) // 2 :]
            # zero moments + zero gradient -> no movement at all
            torch.testing.assert_close(after[zero_rows], before[name][zero_rows])
            # first update from zero moments (the shared step count t is kept, so
            # the bias corrections use t): |delta| = lr * c1 / sqrt(c2)
            t = float(snap[name]["step"]) + 1
            b1, b2 = 0.9, 0.999
            size = LR * ((1 - b1) / (1 - b1**t)) / math.sqrt((1 - b2) / (1 - b2**t))
            delta = after[moved_rows] - before[name][moved_rows]
            gsign = grads[name][moved_rows].sign()
            assert torch.all(delta * gsign <= 0)
            big = grads[name][moved_rows].abs() > 1e-3
            assert torch.allclose(
                delta.abs()[big], torch.full_like(delta[big], size), rtol=1e-3
            )


# ----------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------


def test_quat_to_rotmat():
    q = torch.randn(100, 4, dtype=torch.float64)
    r = quat_to_rotmat(q)
    eye = torch.eye(3, dtype=torch.float64).expand(100, 3, 3)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(100, dtype=torch.float64))
    # 90 degrees about z (wxyz), unnormalised
    a = math.sqrt(0.5)
    rz = quat_to_rotmat(torch.tensor([[2 * a, 0.0, 0.0, 2 * a]], dtype=torch.float64))[0]
    expected = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(rz, expected)


def test_duplicate():
    params, optimizers = make_gaussians(n=20)
    state = make_state(20)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[1, 4, 7, 19]] = True
    snap = snapshot(params, optimizers)
    old_grad2d = state["grad2d"].clone()

    n_added = duplicate(params, optimizers, state, mask)
    assert n_added == 4
    assert check_layout(params, optimizers, state) == 24
    sel = torch.tensor([1, 4, 7, 19])
    for name in NAMES:
        p = params[name].detach()
        st = optimizers[name].state[params[name]]
        torch.testing.assert_close(p[:20], snap[name]["value"])
        torch.testing.assert_close(p[20:], snap[name]["value"][sel])
        torch.testing.assert_close(st["exp_avg"][:20], snap[name]["exp_avg"])
        torch.testing.assert_close(st["exp_avg_sq"][:20], snap[name]["exp_avg_sq"])
        assert torch.all(st["exp_avg"][20:] == 0)
        assert torch.all(st["exp_avg_sq"][20:] == 0)
        assert st["step"] == snap[name]["step"]
    torch.testing.assert_close(state["grad2d"], torch.cat([old_grad2d, old_grad2d[sel]]))
    assert state["scene_extent"] == 1.0

    check_adam_after_op(
        params, optimizers, snap, old_rows=torch.arange(20), new_rows=torch.arange(20, 24)
    )


def test_remove():
    params, optimizers = make_gaussians(n=20)
    state = make_state(20)
    mask = torch.rand(20, generator=torch.Generator().manual_seed(3)) < 0.4
    keep = torch.nonzero(~mask).squeeze(1)
    snap = snapshot(params, optimizers)
    old_count = state["count"].clone()

    n_removed = remove(params, optimizers, state, mask)
    assert n_removed == int(mask.sum())
    assert check_layout(params, optimizers, state) == 20 - n_removed
    for name in NAMES:
        st = optimizers[name].state[params[name]]
        torch.testing.assert_close(params[name].detach(), snap[name]["value"][keep])
        torch.testing.assert_close(st["exp_avg"], snap[name]["exp_avg"][keep])
        torch.testing.assert_close(st["exp_avg_sq"], snap[name]["exp_avg_sq"][keep])
    torch.testing.assert_close(state["count"], old_count[keep])
    check_adam_after_op(params, optimizers, snap, old_rows=keep, new_rows=torch.arange(0))


def test_split_layout_and_moments():
    params, optimizers = make_gaussians(n=20)
    state = make_state(20)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[0, 5, 6, 11]] = True
    sel = torch.tensor([0, 5, 6, 11])
    rest = torch.nonzero(~mask).squeeze(1)
    snap = snapshot(params, optimizers)
    old_grad2d = state["grad2d"].clone()

    n_added = split(params, optimizers, state, mask, n_split=2, scale_divisor=1.6)
    assert n_added == 4
    assert check_layout(params, optimizers, state) == 24
    for name in NAMES:
        p = params[name].detach()
        st = optimizers[name].state[params[name]]
        torch.testing.assert_close(p[:16], snap[name]["value"][rest])
        torch.testing.assert_close(st["exp_avg"][:16], snap[name]["exp_avg"][rest])
        torch.testing.assert_close(st["exp_avg_sq"][:16], snap[name]["exp_avg_sq"][rest])
        assert torch.all(st["exp_avg"][16:] == 0)
        assert torch.all(st["exp_avg_sq"][16:] == 0)
        parents = snap[name]["value"][sel].repeat((2,) + (1,) * (p.dim() - 1))
        if name == "scales":
            torch.testing.assert_close(p[16:], parents - math.log(1.6))
        elif name == "means":
            assert not torch.allclose(p[16:], parents)
        else:
            torch.testing.assert_close(p[16:], parents)
    torch.testing.assert_close(
        state["grad2d"], torch.cat([old_grad2d[rest], old_grad2d[sel].repeat(2)])
    )
    check_adam_after_op(params, optimizers, snap, old_rows=rest, new_rows=torch.arange(16, 24))


def test_split_children_distribution():
    params, optimizers = make_gaussians(n=5, dtype=torch.float64, seed=7)
    with torch.no_grad():
        params["scales"][:] = torch.log(
            torch.tensor([[0.5, 0.1, 0.02], [0.2, 0.2, 0.05], [1.0, 0.3, 0.3],
                          [0.1, 0.1, 0.1], [0.4, 0.05, 0.2]], dtype=torch.float64)
        )  # fmt: skip
    parents = {k: params[k].detach().clone() for k in ("means", "scales", "quats")}
    mask = torch.tensor([True, False, True, False, True])
    n_split = 20000
    rng = torch.Generator().manual_seed(11)
    split(params, optimizers, None, mask, n_split=n_split, scale_divisor=1.6, rng=rng)
    assert params["means"].dtype == torch.float64
    assert params["means"].shape[0] == 2 + 3 * n_split
    children = params["means"].detach()[2:].reshape(n_split, 3, 3)  # [k, parent, xyz]
    child_scales = params["scales"].detach()[2:].reshape(n_split, 3, 3)
    for j, parent in enumerate([0, 2, 4]):
        s = torch.exp(parents["scales"][parent])
        r = quat_to_rotmat(parents["quats"][parent])
        cov = r @ torch.diag(s**2) @ r.T
        samples = children[:, j]
        emp_mean = samples.mean(0)
        # mean: standard error sqrt(diag(cov) / n)
        se = torch.sqrt(torch.diag(cov) / n_split)
        assert torch.all((emp_mean - parents["means"][parent]).abs() < 5 * se)
        emp_cov = torch.cov(samples.T)
        # covariance entries: std error <= ~sqrt(2/n) * s_max^2
        tol = 6 * math.sqrt(2.0 / n_split) * float(s.max() ** 2)
        assert torch.all((emp_cov - cov).abs() < tol), (emp_cov, cov)
        torch.testing.assert_close(
            torch.exp(child_scales[:, j]), (s / 1.6).expand(n_split, 3)
        )


def test_ops_noop_on_empty_selection():
    params, optimizers = make_gaussians(n=10)
    state = make_state(10)
    before = {name: params[name] for name in NAMES}
    empty = torch.zeros(10, dtype=torch.bool)
    assert duplicate(params, optimizers, state, empty) == 0
    assert split(params, optimizers, state, empty) == 0
    assert remove(params, optimizers, state, empty) == 0
    for name in NAMES:
        assert params[name] is before[name]
    check_layout(params, optimizers, state)
    with pytest.raises(ValueError):
        duplicate(params, optimizers, state, torch.zeros(9, dtype=torch.bool))


def test_ops_keep_dtype_and_remove_all():
    params, optimizers = make_gaussians(n=6, dtype=torch.float64)
    state = make_state(6)
    duplicate(params, optimizers, state, torch.ones(6, dtype=torch.bool))
    split(params, optimizers, state, torch.ones(12, dtype=torch.bool))
    for name in NAMES:
        assert params[name].dtype == torch.float64
        assert optimizers[name].state[params[name]]["exp_avg"].dtype == torch.float64
    remove(params, optimizers, state, torch.ones(24, dtype=torch.bool))
    assert check_layout(params, optimizers, state) == 0


def test_reset_opacity():
    params, optimizers = make_gaussians(n=50)
    state = make_state(50)
    snap = snapshot(params, optimizers)
    others = {name: params[name] for name in NAMES if name != "opacities"}
    reset_opacity(params, optimizers, state, value=0.01)
    check_layout(params, optimizers, state)
    old = snap["opacities"]["value"]
    new = params["opacities"].detach().clone()
    assert torch.all(torch.sigmoid(new) <= 0.01 + 1e-6)
    low = torch.sigmoid(old) < 0.01
    torch.testing.assert_close(new[low], old[low])
    torch.testing.assert_close(torch.sigmoid(new[~low]), torch.full_like(new[~low], 0.01))
    st = optimizers["opacities"].state[params["opacities"]]
    assert torch.all(st["exp_avg"] == 0) and torch.all(st["exp_avg_sq"] == 0)
    assert st["step"] == snap["opacities"]["step"]
    for name, p in others.items():
        assert params[name] is p
    # optimiser still works
    params["opacities"].grad = torch.ones_like(params["opacities"])
    optimizers["opacities"].step()
    assert torch.all(params["opacities"].detach() < new)


# ----------------------------------------------------------------------------------
# strategy
# ----------------------------------------------------------------------------------


def test_defaults_follow_paper():
    s = ADCStrategy()
    assert (s.refine_start_iter, s.refine_stop_iter, s.refine_every) == (500, 15000, 100)
    assert s.reset_every == 3000 and s.grad_threshold == 0.0002
    assert s.dense_percent == 0.01 and s.prune_opacity == 0.005
    assert s.prune_scale_world == 0.1 and s.prune_screen_size_px is None
    assert s.reset_opacity_value == 0.01 and s.n_split == 2 and s.scale_divisor == 1.6
    assert s.absgrad is False and s.absgrad_threshold == 0.0008
    assert s.max_gaussians is None


def test_check_sanity():
    s = ADCStrategy()
    params, optimizers = make_gaussians(n=8)
    s.check_sanity(params, optimizers)
    with pytest.raises(ValueError, match="optimizer"):
        s.check_sanity(params, {k: v for k, v in optimizers.items() if k != "quats"})
    bad = dict(optimizers)
    bad["means"] = torch.optim.Adam([params["means"], params["scales"]])
    with pytest.raises(ValueError, match="exactly one"):
        s.check_sanity(params, bad)
    bad = dict(optimizers)
    bad["means"] = torch.optim.Adam([torch.nn.Parameter(params["means"].detach().clone())])
    with pytest.raises(ValueError, match="does not hold"):
        s.check_sanity(params, bad)
    wrong = torch.nn.ParameterDict(dict(params))
    wrong["quats"] = torch.nn.Parameter(torch.zeros(8, 3))
    opts = dict(optimizers)
    opts["quats"] = torch.optim.Adam([wrong["quats"]])
    with pytest.raises(ValueError, match="quats"):
        s.check_sanity(wrong, opts)
    missing = torch.nn.ParameterDict({k: v for k, v in params.items() if k != "opacities"})
    with pytest.raises(ValueError, match="opacities"):
        s.check_sanity(missing, optimizers)


def fake_render(params, pix_grad, radii, width=100, height=80, n_cameras=1):
    """A stand-in for the rasteriser: means2d depends on the means; the loss is built
    so that d loss / d means2d == pix_grad ([C,N,2]), scaled by 1/C as for a batch
    mean. Every parameter takes part so every optimizer steps."""
    n = params["means"].shape[0]
    means2d = params["means"][:, :2].unsqueeze(0).expand(n_cameras, n, 2) * 10.0
    info = {
        "means2d": means2d,
        "radii": radii,
        "width": width,
        "height": height,
        "n_cameras": n_cameras,
    }
    zero_terms = sum((params[k] * 0.0).sum() for k in NAMES if k != "means")
    return info, lambda: (means2d * pix_grad).sum() / n_cameras + zero_terms


def test_gradient_accumulation_normalisation():
    s = ADCStrategy()
    params, optimizers = make_gaussians(n=6)
    state = s.initialize_state(scene_extent=2.0)
    assert state["scene_extent"] == 2.0
    c, w, h = 2, 100, 80
    pix_grad = torch.rand(c, 6, 2)
    radii = torch.tensor([[3, 0, 5, 2, 0, 9], [4, 0, 1, 0, 7, 2]], dtype=torch.int32)
    info, loss_fn = fake_render(params, pix_grad, radii, w, h, n_cameras=c)
    s.step_pre_backward(params, optimizers, state, 1, info)
    loss_fn().backward()
    assert s.step_post_backward(params, optimizers, state, 1, info) == {}
    ndc = pix_grad.clone()
    ndc[..., 0] *= w / 2
    ndc[..., 1] *= h / 2
    vis = radii > 0
    expected = (ndc.norm(dim=-1) * vis).sum(0)
    torch.testing.assert_close(state["grad2d"], expected)
    torch.testing.assert_close(state["count"], vis.sum(0).float())
    torch.testing.assert_close(state["max_radii2d"], radii.amax(0).float() / 100)
    assert state["image_size"] == 100


def test_absgrad_uses_absgrad_attribute():
    s = ADCStrategy(absgrad=True)
    params, optimizers = make_gaussians(n=4)
    state = s.initialize_state(1.0)
    info, loss_fn = fake_render(params, torch.ones(1, 4, 2), torch.ones(1, 4))
    s.step_pre_backward(params, optimizers, state, 1, info)
    loss_fn().backward()
    with pytest.raises(RuntimeError, match="absgrad"):
        s.step_post_backward(params, optimizers, state, 1, info)
    info["means2d"].absgrad = torch.full((1, 4, 2), 0.5)
    s.step_post_backward(params, optimizers, state, 1, info)
    expected = torch.full((4,), math.hypot(0.5 * 50, 0.5 * 40))
    torch.testing.assert_close(state["grad2d"], expected)


def _tagged_scene(n_hot_small=4, n_hot_big=3, n_dead=5, n_plain=8, seed=0):
    """Gaussians tagged through features_rest[:, 0, 0] (never changed by training):
    1 = high gradient + small, 2 = high gradient + big, 3 = transparent, 0 = plain."""
    n = n_hot_small + n_hot_big + n_dead + n_plain
    params, optimizers = make_gaussians(n=n, seed=seed, warm_steps=0)
    tags = torch.tensor([1] * n_hot_small + [2] * n_hot_big + [3] * n_dead + [0] * n_plain)
    with torch.no_grad():
        params["features_rest"][:, 0, 0] = tags.float()
        params["scales"][:] = math.log(0.004)  # small: <= 0.01 * extent
        params["scales"][tags == 2] = math.log(0.05)  # big, but < 0.1 * extent
        params["opacities"][:] = 2.0
        params["opacities"][tags == 3] = torch.logit(torch.tensor(0.001))
    return params, optimizers


def _toy_step(s, params, optimizers, state, step, hot_pix_grad=1e-4):
    tags = params["features_rest"].detach()[:, 0, 0].round()
    n = tags.shape[0]
    pix_grad = torch.zeros(1, n, 2)
    hot = (tags == 1) | (tags == 2)
    pix_grad[0, hot] = hot_pix_grad
    radii = torch.full((1, n), 4.0)
    info, loss_fn = fake_render(params, pix_grad, radii)
    s.step_pre_backward(params, optimizers, state, step, info)
    loss_fn().backward()
    for opt in optimizers.values():
        opt.step()
        opt.zero_grad(set_to_none=True)
    return s.step_post_backward(params, optimizers, state, step, info)


def test_toy_loop_densifies_and_prunes_on_schedule():
    s = ADCStrategy(
        refine_start_iter=5,
        refine_stop_iter=50,
        refine_every=5,
        reset_every=30,
    )
    params, optimizers = _tagged_scene()
    s.check_sanity(params, optimizers)
    state = s.initialize_state(scene_extent=1.0)
    refine_steps = []
    hot_counts = []
    for step in range(60):
        n_before = params["means"].shape[0]
        tags_before = params["features_rest"].detach()[:, 0, 0].round()
        stats = _toy_step(s, params, optimizers, state, step)
        n = check_layout(params, optimizers, state)
        s.check_sanity(params, optimizers)
        if stats:
            refine_steps.append(step)
            assert stats["n_total"] == n
            assert n == n_before + stats["n_cloned"] + stats["n_split"] - stats["n_pruned"]
            if step == 10:
                # first refinement: exact counts
                assert stats["n_cloned"] == int((tags_before == 1).sum())
                assert stats["n_split"] == int((tags_before == 2).sum())
                assert stats["n_pruned"] == int((tags_before == 3).sum())
            # accumulators reset after refinement
            assert torch.all(state["grad2d"] == 0) and torch.all(state["count"] == 0)
        else:
            assert n == n_before
        tags = params["features_rest"].detach()[:, 0, 0].round()
        hot_counts.append(int(((tags == 1) | (tags == 2)).sum()))
        if step == 30:
            assert torch.all(torch.sigmoid(params["opacities"].detach()) <= 0.01 + 1e-6)
            assert state["n_resets"] == 1
    # strictly after refine_start, every refine_every, paused at the reset step 30,
    # stopped at refine_stop_iter
    assert refine_steps == [10, 15, 20, 25, 35, 40, 45]
    tags = params["features_rest"].detach()[:, 0, 0].round()
    assert int((tags == 3).sum()) == 0  # transparent ones were pruned
    assert (tags == 0).sum() == 8  # plain ones untouched
    assert hot_counts[-1] > hot_counts[0]
    assert hot_counts[10] > hot_counts[9]  # grew at the first refinement


def test_no_refinement_below_threshold():
    s = ADCStrategy(refine_start_iter=1, refine_every=2, reset_every=1000, refine_stop_iter=100)
    params, optimizers = _tagged_scene(n_dead=0)
    state = s.initialize_state(1.0)
    for step in range(10):
        stats = _toy_step(s, params, optimizers, state, step, hot_pix_grad=1e-7)
        if stats:
            assert stats["n_cloned"] == stats["n_split"] == stats["n_pruned"] == 0


def test_max_gaussians_never_exceeded():
    cap = 40
    s = ADCStrategy(
        refine_start_iter=2, refine_stop_iter=200, refine_every=2, reset_every=1000,
        max_gaussians=cap,
    )  # fmt: skip
    params, optimizers = _tagged_scene(n_hot_small=6, n_hot_big=6, n_dead=0, n_plain=10)
    state = s.initialize_state(1.0)
    grew = False
    for step in range(40):
        stats = _toy_step(s, params, optimizers, state, step)
        n = check_layout(params, optimizers, state)
        assert n <= cap
        grew |= bool(stats) and stats["n_cloned"] + stats["n_split"] > 0
    assert grew
    assert params["means"].shape[0] == cap


def test_max_gaussians_keeps_largest_gradients():
    s = ADCStrategy(refine_start_iter=0, refine_every=1, reset_every=1000, max_gaussians=13)
    params, optimizers = make_gaussians(n=10, warm_steps=0)
    with torch.no_grad():
        params["scales"][:] = math.log(0.001)  # all candidates would be cloned
        params["opacities"][:] = 2.0
        params["features_rest"][:, 0, 0] = torch.arange(10).float()
    state = s.initialize_state(1.0)
    pix_grad = torch.zeros(1, 10, 2)
    pix_grad[0, :, 0] = torch.tensor([1, 9, 2, 8, 3, 7, 4, 6, 5, 0.0]) * 1e-4
    info, loss_fn = fake_render(params, pix_grad, torch.full((1, 10), 3.0))
    s.step_pre_backward(params, optimizers, state, 1, info)
    loss_fn().backward()
    stats = s.step_post_backward(params, optimizers, state, 1, info)
    assert stats["n_cloned"] == 3 and stats["n_total"] == 13
    cloned = params["features_rest"].detach()[10:, 0, 0].round().long().tolist()
    assert sorted(cloned) == [1, 3, 5]  # the three largest gradients


def test_big_gaussians_pruned_only_after_first_reset():
    s = ADCStrategy(refine_start_iter=0, refine_every=10, reset_every=20, refine_stop_iter=100, prune_screen_size_px=20.0)
    params, optimizers = make_gaussians(n=6, warm_steps=0)
    with torch.no_grad():
        params["scales"][:] = math.log(0.005)
        params["scales"][0] = math.log(0.5)  # too big in world space
        params["opacities"][:] = 2.0
    state = s.initialize_state(1.0)
    radii = torch.full((1, 6), 3.0)
    radii[0, 1] = 30.0  # too big on screen (pixels)

    def run(step):
        info, loss_fn = fake_render(params, torch.zeros(1, params["means"].shape[0], 2),
                                    radii[:, : params["means"].shape[0]])  # fmt: skip
        s.step_pre_backward(params, optimizers, state, step, info)
        loss_fn().backward()
        return s.step_post_backward(params, optimizers, state, step, info)

    assert run(10)["n_pruned"] == 0  # before first reset: kept
    run(20)  # reset step (refinement paused)
    assert run(30)["n_pruned"] == 2
    assert params["means"].shape[0] == 4

    s_no_screen = ADCStrategy(
        refine_start_iter=0, refine_every=10, reset_every=20, prune_screen_size_px=None
    )
    params2, optimizers2 = make_gaussians(n=3, warm_steps=0)
    with torch.no_grad():
        params2["scales"][:] = math.log(0.005)
        params2["opacities"][:] = 2.0
    state2 = s_no_screen.initialize_state(1.0)
    info, loss_fn = fake_render(params2, torch.zeros(1, 3, 2), torch.tensor([[3.0, 50, 3]]))
    s_no_screen.step_pre_backward(params2, optimizers2, state2, 30, info)
    loss_fn().backward()
    assert s_no_screen.step_post_backward(params2, optimizers2, state2, 30, info)["n_pruned"] == 0


@pytest.mark.parametrize("white, override", [(True, None), (False, None), (False, True), (True, False)])
def test_reset_at_refine_start_follows_background(white, override):
    """The extra opacity reset at the start of densification happens for white backgrounds (or when forced)."""
    s = ADCStrategy(refine_start_iter=5, refine_stop_iter=50, refine_every=5, reset_every=30,
                    reset_at_refine_start=override)
    params, optimizers = _tagged_scene(n_dead=0)
    state = s.initialize_state(scene_extent=1.0, white_background=white)
    expected = white if override is None else override
    for step in range(6):
        _toy_step(s, params, optimizers, state, step)
        if step == 4:
            assert torch.all(torch.sigmoid(params["opacities"].detach()) > 0.5)
    reset = bool(torch.all(torch.sigmoid(params["opacities"].detach()) <= 0.01 + 1e-6))
    assert reset == expected
    assert state["n_resets"] == int(expected)


def test_visibility_weighting_matches_filtering():
    """Statistics of Gaussians with radius 0 (not drawn) stay untouched, for batched and packed layouts."""
    s = ADCStrategy()
    params, optimizers = make_gaussians(n=30)
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(2, 30, 2, generator=g)
    radii = torch.randint(0, 3, (2, 30), generator=g).float()
    expected_sum = torch.zeros(30)
    expected_cnt = torch.zeros(30)
    for c in range(2):
        vis = radii[c] > 0
        scaled = grads[c] * torch.tensor([50.0 * 2, 40.0 * 2])
        expected_sum[vis] += scaled[vis].norm(dim=-1)
        expected_cnt[vis] += 1
    for packed in (False, True):
        state = s.initialize_state(1.0)
        if packed:
            cam, ids = torch.nonzero(torch.ones(2, 30), as_tuple=True)
            means2d = torch.zeros(60, 2, requires_grad=True)
            means2d.grad = grads.reshape(-1, 2).clone()
            info = {"means2d": means2d, "radii": radii.reshape(-1), "gaussian_ids": ids, "width": 100,
                    "height": 80, "n_cameras": 2}
        else:
            means2d = torch.zeros(2, 30, 2, requires_grad=True)
            means2d.grad = grads.clone()
            info = {"means2d": means2d, "radii": radii, "width": 100, "height": 80, "n_cameras": 2}
        s._update_state(params, state, info, packed)
        torch.testing.assert_close(state["grad2d"], expected_sum)
        torch.testing.assert_close(state["count"], expected_cnt)
        torch.testing.assert_close(state["max_radii2d"], radii.amax(0) / 100.0)
