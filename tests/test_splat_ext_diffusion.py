"""Tests of the `splat-ext-diffusion` student (generative/diffusion/*, models/splat_ext_diffusion.py).

Schedule maths against closed forms on fresh random inputs; the denoiser's parameter budget; forward / backward of
both training stages on the CPU; deterministic inference; a short CPU training run from a briefly trained teacher on
a tiny generated dataset; and the ns-train entry point.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from nerfstudio_splat_ext.generative.data.datamanager import MultiObjectDataManagerConfig
from nerfstudio_splat_ext.generative.data.generator import ObjectDatasetSpec, ObjectRenderSpec, generate_dataset
from nerfstudio_splat_ext.generative.diffusion.denoiser import GaussianMapDenoiser
from nerfstudio_splat_ext.generative.networks.unet import count_parameters
from nerfstudio_splat_ext.generative.pipeline import composite
from nerfstudio_splat_ext.generative.pixel_gaussians import render_pixel_gaussians
from nerfstudio_splat_ext.models.splat_ext_diffusion import (
    SplatExtDiffusionModel,
    SplatExtDiffusionModelConfig,
    load_teacher,
)
from nerfstudio_splat_ext.models.splat_ext_image import SplatExtImageModelConfig
from nerfstudio_splat_ext.generative.diffusion.schedule import (
    DiffusionSchedule,
    cosine_alphas_cumprod,
    ddim_timesteps,
    linear_alphas_cumprod,
)

BIN = Path(sys.executable).parent

# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_alphas_cumprod_monotone_and_bounded(kind: str):
    s = DiffusionSchedule(100, kind)
    abar = s.alphas_cumprod_f64
    assert abar.shape == (100,)
    assert torch.all(abar[1:] < abar[:-1])  # strictly more noise at every level
    assert 0.99 < abar[0] < 1.0 and 0 < abar[-1] < 1e-3  # nearly clean at t = 0, nearly pure noise at t = T - 1
    # level -1 is the clean map
    assert s.abar(torch.tensor([-1])).item() == 1.0


def test_cosine_schedule_closed_form():
    # abar_t = f((t + 1) / T) / f(0), f(u) = cos((u + s) / (1 + s) * pi / 2)^2, wherever beta is not clipped
    T, s = 100, 0.008
    abar = cosine_alphas_cumprod(T, s=s)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 1, 7, 19, 20, 50, 90]:
        assert abar[t].item() == pytest.approx(f((t + 1) / T) / f(0.0), rel=1e-9)
    # the decoupling level keeps most of the signal under the cosine schedule, much less under the linear one
    assert 0.85 < abar[20] < 0.92 and linear_alphas_cumprod(T)[20] < 0.7


def test_q_sample_statistics():
    # fresh random x0: over many noise draws, x_t has mean sqrt(abar) x0 and variance 1 - abar per element
    gen = torch.Generator().manual_seed(1234)
    s = DiffusionSchedule(100)
    x0 = torch.rand(1, 15, 4, 4, generator=gen) * 2 - 1
    n = 20_000
    for t in (0, 20, 60, 99):
        tt = torch.full((n,), t)
        noise = torch.randn(n, 15, 4, 4, generator=gen)
        xt = s.q_sample(x0.expand(n, -1, -1, -1), tt, noise).double()
        a = s.alphas_cumprod_f64[t]
        assert torch.allclose(xt.mean(0), a.sqrt() * x0[0].double(), atol=5 * math.sqrt(1 / n))
        assert torch.allclose(xt.var(0), (1 - a).expand(15, 4, 4), atol=0.05 * (1 - a).item() + 1e-6)


def test_ddim_step_with_true_x0_follows_its_trajectory():
    # with the true x0 the deterministic DDIM update maps q(x0, t, eps) to q(x0, t_prev, eps) (same eps), and the
    # whole 10-step chain from t* ends at x0
    gen = torch.Generator().manual_seed(7)
    s = DiffusionSchedule(100)
    x0 = torch.rand(3, 15, 8, 8, generator=gen) * 2 - 1
    eps = torch.randn(3, 15, 8, 8, generator=gen)
    levels = ddim_timesteps(20, 10)
    x = s.q_sample(x0, torch.full((3,), levels[0]), eps)
    for i, t in enumerate(levels):
        t_prev = levels[i + 1] if i + 1 < len(levels) else -1
        tb = torch.full((3,), t)
        assert torch.allclose(s.predict_noise(x, tb, x0), eps, atol=1e-4)
        x = s.ddim_step(x, tb, torch.full((3,), t_prev), x0)
        assert torch.allclose(x, s.q_sample(x0, torch.full((3,), t_prev), eps), atol=1e-5)
    assert torch.allclose(x, x0, atol=1e-6)
    with pytest.raises(ValueError, match="lower noise"):
        s.ddim_step(x, torch.full((3,), 5), torch.full((3,), 5), x0)


def test_ddim_timesteps():
    assert ddim_timesteps(20, 10) == [20, 18, 16, 14, 12, 10, 8, 6, 4, 2]
    assert ddim_timesteps(99, 10) == [99, 89, 79, 69, 59, 49, 39, 29, 19, 9]  # starting at T (pure noise)
    for t_start in range(9, 100):
        seq = ddim_timesteps(t_start, 10)
        assert len(seq) == 10 and seq[0] == t_start and seq[-1] >= 0
        assert all(a > b for a, b in zip(seq, seq[1:]))
    with pytest.raises(ValueError, match="t_start >= 9"):
        ddim_timesteps(5, 10)


def test_loss_weights():
    s = DiffusionSchedule(100)
    levels = ddim_timesteps(20, 10)
    w = s.loss_weights(levels)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[1:] > w[:-1])  # later (less noisy) steps count more
    ratio = w / s.alphas_cumprod[torch.tensor(levels)]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)  # proportional to abar_t


# ---------------------------------------------------------------------------------------------
# model: shared tiny data and a briefly trained teacher
# ---------------------------------------------------------------------------------------------

RES, VIEWS = 16, 6
TEACHER_STEPS = 150
TINY_TEACHER = dict(base_width=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), lpips_loss_weight=0.0)
BOX = SceneBox(torch.tensor([[-1.0] * 3, [1.0] * 3]))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objects") / "tiny"
    spec = ObjectDatasetSpec(
        render=ObjectRenderSpec(views=VIEWS, resolution=RES, supersample=2, num_points=256),
        num_train=4,
        num_heldout=2,
        train_seed_start=0,
        heldout_seed_start=500,
    )
    assert generate_dataset(root, spec)["generated"] == 6
    return root


def datamanager(root: Path):
    return MultiObjectDataManagerConfig(data=root, batch_size=2, eval_batch_size=2, num_target_views=2).setup()


@pytest.fixture(scope="module")
def teacher(objects: Path):
    """A splat-ext-image teacher trained for TEACHER_STEPS steps on the tiny objects (through its own losses)."""
    torch.manual_seed(0)
    model = SplatExtImageModelConfig(**TINY_TEACHER).setup(scene_box=BOX, num_train_data=0, metadata={})
    dm = datamanager(objects)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(TEACHER_STEPS):
        _, batch = dm.next_train(step)
        loss = sum(model.get_loss_dict(model.forward_batch(batch, step), batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def student(teacher, **overrides) -> SplatExtDiffusionModel:
    cfg = SplatExtDiffusionModelConfig(**{"lpips_loss_weight": 0.0, "bootstrap_steps": 100, **overrides})
    return cfg.setup(scene_box=BOX, num_train_data=0, metadata={}, teacher=teacher)


def test_denoiser_within_teacher_budget(teacher):
    model = student(teacher)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert model.teacher_parameter_count == n_teacher
    assert model.student_parameter_count == count_parameters(model.denoiser) <= n_teacher
    # the fitted width is the widest that fits: 4 channels more would not
    width = model.denoiser.unet.base_width
    wider = GaussianMapDenoiser(width + 4, (1, 2), 1, (), True)
    assert count_parameters(wider) > n_teacher
    with pytest.raises(ValueError, match="more than the teacher"):
        student(teacher, denoiser_base_width=width + 4)
    # the teacher stays frozen; the student's optimiser sees only the denoiser
    assert count_parameters(model.teacher) == 0
    assert model.get_param_groups()["denoiser"] == list(model.denoiser.parameters())
    # bounded output (like activate_raw) for any input
    x = torch.randn(2, 15, RES, RES) * 10
    cond = torch.randn(2, 9, RES, RES) * 10
    out = model.denoiser(x, torch.tensor([0, 99]), cond)
    assert out.shape == x.shape and out.abs().max() <= 1.0


def test_teacher_initialised_denoiser_starts_as_the_teacher(objects: Path, teacher):
    # A teacher with attention at its deepest level (random weights: the copy must hold for any weights).
    torch.manual_seed(7)
    deep = SplatExtImageModelConfig(**{**TINY_TEACHER, "attention_levels": (1,)}).setup(
        scene_box=BOX, num_train_data=0, metadata={}
    )
    for p in deep.parameters():  # make every weight matter (zero-initialised layers included)
        p.data.add_(0.05 * torch.randn_like(p))
    model = student(deep.eval(), denoiser_init="teacher")
    assert model.student_parameter_count <= model.teacher_parameter_count
    # the teacher's network without its deepest decoder attention block, which the student leaves out
    reference = copy.deepcopy(deep)
    reference.unet.up_attn[0] = torch.nn.Identity()
    _, batch = datamanager(objects).next_train(2)
    src = composite(batch["source_image"], model.background)
    args = (src, batch["source_c2w"], batch["source_intrinsics"])
    cond = model.denoiser.condition(*args)
    with torch.no_grad():
        expected = reference.predict_canonical(*args)
        for t in (torch.tensor([0, 20]), torch.tensor([7])):
            got = model.denoiser(torch.randn(2, 15, RES, RES) * 3, t, cond)  # any noisy map: its weights start at 0
            assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        assert not torch.allclose(deep.predict_canonical(*args), expected, atol=1e-3)  # the left-out block mattered
    # the loss reaches the (zero) input weights of the noisy map and the level
    out = model.forward_batch(batch, 0)
    sum(model.get_loss_dict(out, batch, {}).values()).backward()
    assert model.denoiser.unet.in_conv.weight.grad[:, :16].abs().sum() > 0
    # a teacher without that block cannot pay for the new input weights
    with pytest.raises(ValueError, match="denoiser-init scratch"):
        student(teacher, denoiser_init="teacher")


@pytest.mark.parametrize("stage", [1, 2])
def test_forward_backward_both_stages(objects: Path, teacher, stage: int):
    torch.manual_seed(stage)
    model = student(teacher, bootstrap_steps=10)
    _, batch = datamanager(objects).next_train(0)
    out = model.forward_batch(batch, 0 if stage == 1 else 10)
    assert out["stage"] == stage
    n_estimates = 1 if stage == 1 else 10
    assert len(out["step_rgbs"]) == n_estimates and out["step_weights"].shape == (n_estimates,)
    assert out["rgb"].shape == (2, 3, RES, RES, 3)  # source + 2 targets
    assert out["canonical"].shape == (2, 15, RES, RES) and out["canonical"].abs().max() <= 1.0
    assert out["cycle_rgb"].shape == (2, RES, RES, 3) and out["cycle_source_rgb"].requires_grad
    losses = model.get_loss_dict(out, batch, {})
    # 3D supervision only in stage 1 (bootstrap)
    assert set(losses) == ({"render_loss", "cycle_loss", "geometry_loss"} if stage == 1 else {"render_loss", "cycle_loss"})
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    metrics = model.get_metrics_dict(out, batch)
    assert all(torch.isfinite(v) for v in metrics.values()) and metrics["stage"] == stage
    sum(losses.values()).backward()
    grads = [p.grad for p in model.denoiser.parameters()]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) >= 0.9 * len(grads)
    assert all(p.grad is None for p in model.teacher.parameters())
    # the cycle loss alone reaches the denoiser through both predictions
    model.zero_grad()
    out = model.forward_batch(batch, 0 if stage == 1 else 10)
    model.get_loss_dict(out, batch, {})["cycle_loss"].backward()
    assert model.denoiser.unet.in_conv.weight.grad.abs().sum() > 0


def test_unrolled_ddim_gradients_through_every_step(objects: Path, teacher):
    torch.manual_seed(3)
    model = student(teacher)
    _, batch = datamanager(objects).next_train(1)
    src = composite(batch["source_image"], model.background)
    cond = model.denoiser.condition(src, batch["source_c2w"], batch["source_intrinsics"])
    x_start = model.schedule.q_sample(
        model.teacher_canonical(src, batch["source_c2w"], batch["source_intrinsics"]), torch.full((2,), 20)
    ).requires_grad_(True)
    final, estimates, levels = model.sample(x_start, 20, cond)
    assert levels == ddim_timesteps(20, 10) and torch.equal(final, estimates[-1])
    # the final map depends on x_start only through the whole chain: a gradient there crossed all 10 steps
    (final ** 2).mean().backward()
    assert x_start.grad.abs().sum() > 0
    # gradient checkpointing recomputes the same gradients
    grads = {}
    for ckpt in (False, True):
        model.config.gradient_checkpointing = ckpt
        model.zero_grad()
        torch.manual_seed(5)
        out = model.forward_batch(batch, 10_000)
        sum(model.get_loss_dict(out, batch, {}).values()).backward()
        grads[ckpt] = torch.cat([p.grad.flatten() for p in model.denoiser.parameters()])
    model.config.gradient_checkpointing = False
    assert torch.allclose(grads[True], grads[False], rtol=1e-4, atol=1e-7)


def test_predict_gaussians_deterministic(objects: Path, teacher):
    model = student(teacher).eval()
    _, batch = datamanager(objects).next_eval(0)
    src = composite(batch["source_image"], model.background)
    args = (src, batch["source_c2w"], batch["source_intrinsics"])
    a, b = model.predict_gaussians(*args), model.predict_gaussians(*args)
    for name in ("means", "quats", "scales", "opacities", "colors"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.means.shape == (2, RES * RES, 3)
    # another seed: another noise draw, another (close) sample
    c = model.predict_gaussians(*args, seed=1)
    assert not torch.equal(a.means, c.means)
    # the same weights in a fresh model give the same prediction (the seed, not global RNG state, decides)
    torch.manual_seed(123)
    other = student(teacher).eval()
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.predict_gaussians(*args).means, a.means)


def _render_mse(model, batches) -> float:
    """Mean target-view MSE of predict_gaussians renders over fixed batches (the evaluation path)."""
    errors = []
    with torch.no_grad():
        for batch in batches:
            bg = model.background
            src = composite(batch["source_image"], bg)
            g = model.predict_gaussians(src, batch["source_c2w"], batch["source_intrinsics"])
            rgb, _ = render_pixel_gaussians(g, batch["target_c2w"], batch["target_intrinsics"], RES, RES, bg)
            errors.append(torch.mean((rgb - composite(batch["target_images"], bg)) ** 2).item())
    return sum(errors) / len(errors)


@pytest.mark.slow
def test_training_lowers_render_loss(objects: Path, teacher):
    # 200 bootstrap + 100 unrolled-DDIM steps from the briefly trained teacher (~40 s on one CPU thread).
    # Measured: render MSE of the inference path 0.101 -> 0.028 (x0.28; end of stage 1: 0.029), teacher 0.028.
    torch.manual_seed(0)
    dm = datamanager(objects)
    fixed = [dm.next_train(10_000 + i)[1] for i in range(4)]
    model = student(teacher, bootstrap_steps=200)
    opt = torch.optim.Adam(model.get_param_groups()["denoiser"], lr=1e-3)
    before = _render_mse(model, fixed)
    after_stage1 = None
    for step in range(300):
        if step == 200:
            after_stage1 = _render_mse(model, fixed)
        _, batch = dm.next_train(step)
        out = model.forward_batch(batch, step)
        loss = sum(model.get_loss_dict(out, batch, {}).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _render_mse(model, fixed)
    teacher_mse = _render_mse(teacher, fixed)
    print(f"render MSE: before {before:.4f}, after stage 1 {after_stage1:.4f}, after {after:.4f}, teacher {teacher_mse:.4f}")
    assert after < 0.5 * before, (before, after)
    assert after < 1.5 * after_stage1, (after_stage1, after)  # stage 2 does not undo the bootstrap
    assert after < 1.5 * teacher_mse, (teacher_mse, after)  # close to the teacher after a few hundred steps


# ---------------------------------------------------------------------------------------------
# nerfstudio entry points
# ---------------------------------------------------------------------------------------------


def test_load_teacher_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="teacher-config"):
        load_teacher(tmp_path / "missing.yml")
    with pytest.raises(ValueError, match="teacher-config"):
        SplatExtDiffusionModelConfig().setup(scene_box=BOX, num_train_data=0, metadata={})


def _ns(command: str, *args: str) -> None:
    proc = subprocess.run([str(BIN / command), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ns_train_teacher_then_student(objects: Path, tmp_path: Path):
    common = ["--output-dir", str(tmp_path), "--experiment-name", "tiny", "--timestamp", "run", "--vis", "tensorboard",
              "--pipeline.datamanager.data", str(objects), "--pipeline.datamanager.batch-size", "2",
              "--pipeline.datamanager.num-target-views", "2", "--steps-per-eval-all-images", "1000"]
    _ns("ns-train", "splat-ext-image", *common, "--max-num-iterations", "10", "--steps-per-save", "10",
        "--pipeline.model.base-width", "8", "--pipeline.model.channel-mults", "1", "2",
        "--pipeline.model.num-res-blocks", "1", "--pipeline.model.attention-levels", "--pipeline.model.lpips-loss-weight", "0")
    teacher_config = tmp_path / "tiny" / "splat-ext-image" / "run" / "config.yml"
    _ns("ns-train", "splat-ext-diffusion", *common, "--max-num-iterations", "6", "--steps-per-save", "6",
        "--steps-per-eval-batch", "5", "--pipeline.model.teacher-config", str(teacher_config),
        "--pipeline.model.bootstrap-steps", "3", "--pipeline.model.lpips-loss-weight", "0")
    run = tmp_path / "tiny" / "splat-ext-diffusion" / "run"
    metrics = tmp_path / "eval.json"
    _ns("ns-eval", "--load-config", str(run / "config.yml"), "--output-path", str(metrics))
    results = json.loads(metrics.read_text())["results"]
    assert results["num_objects"] == 2 and 5.0 < results["psnr"] < 60.0
    # the student checkpoint holds the teacher it loaded, unchanged by training
    teacher_ckpt = next((teacher_config.parent / "nerfstudio_models").glob("step-*.ckpt"))
    t_state = torch.load(teacher_ckpt, map_location="cpu", weights_only=False)["pipeline"]
    s_state = torch.load(next((run / "nerfstudio_models").glob("step-*.ckpt")), map_location="cpu", weights_only=False)["pipeline"]
    t_weights = {k[len("_model."):]: v for k, v in t_state.items() if k.startswith("_model.unet.")}
    assert t_weights and all(torch.equal(s_state["_model.teacher." + k], v) for k, v in t_weights.items())
    student_weights = [k for k in s_state if k.startswith("_model.denoiser.")]
    assert student_weights
    # and load_teacher rebuilds the teacher from its run alone
    loaded = load_teacher(teacher_config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in t_weights.items())
