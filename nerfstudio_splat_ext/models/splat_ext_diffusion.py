"""The `splat-ext-diffusion` student: a diffusion model over pixel-aligned Gaussian maps, after "A Lesson in Splats"
(ICCV 2025), trained with 2D supervision and a frozen deterministic teacher (`splat-ext-image`).

* Noise-teacher decoupling: sampling starts from the teacher's canonical map noised to a level t >= t* (t* = 20 of
  100), not from pure noise: at t* the noise hides the teacher's small errors while its coarse layout survives.
* Stage 1 (bootstrap, ``step < bootstrap_steps``): one denoising step from the teacher's map noised at a random
  level, with 3D supervision towards the teacher's map, a rendering loss at the target views and the cycle loss.
* Stage 2: the 10-step DDIM from the noised teacher map, unrolled in training with gradients through every step,
  the x0 estimate of every step rendered at the target views (losses weighted by lambda_t), no 3D supervision; the
  cycle loss.
* Cycle consistency: the result rendered at a target view becomes a new source (with that camera), is predicted
  again the same way, rendered back at the source view and compared with the source image.
* Inference (:meth:`predict_gaussians`): teacher map -> noised to t* with seeded noise -> 10-step DDIM -> decode.

The teacher is loaded from its nerfstudio run (``teacher_config``: the run's config.yml) or passed in memory
(``setup(..., teacher=model)``), frozen, and kept as a submodule so the student's checkpoints hold it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from nerfstudio.models.base_model import Model, ModelConfig
from torch import Tensor
from torch.nn import Parameter
from torch.utils.checkpoint import checkpoint

from nerfstudio_splat_ext.generative.diffusion.denoiser import (
    GaussianMapDenoiser,
    fit_base_width,
    teacher_initialised_denoiser,
)
from nerfstudio_splat_ext.generative.diffusion.schedule import DiffusionSchedule, ddim_timesteps
from nerfstudio_splat_ext.generative.networks.unet import count_parameters
from nerfstudio_splat_ext.generative.pipeline import ObjectsModel, composite, psnr
from nerfstudio_splat_ext.generative.pixel_gaussians import (
    GaussianMapConfig,
    PixelGaussians,
    decode_gaussian_map,
    render_pixel_gaussians,
)
from nerfstudio_splat_ext.render.backend import RenderBackend


@dataclass
class SplatExtDiffusionModelConfig(ModelConfig):
    """splat-ext-diffusion: image-conditioned diffusion over canonical Gaussian maps, taught by a frozen teacher."""

    _target: Type = field(default_factory=lambda: SplatExtDiffusionModel)
    teacher_config: Optional[Path] = None
    """config.yml of a trained `splat-ext-image` run (its latest checkpoint is loaded). Not needed when a teacher is
    passed to ``setup(teacher=...)``."""
    teacher_checkpoint: Optional[Path] = None
    """A specific step-*.ckpt of the teacher run (default: the run's latest)."""
    num_timesteps: int = 100
    """T: discrete noise levels."""
    schedule: Literal["cosine", "linear"] = "cosine"
    """Noise schedule (see generative/diffusion/schedule.py for why cosine)."""
    t_star: int = 20
    """Noise-teacher decoupling: inference starts from the teacher's map noised to this level."""
    max_start_t: int = 20
    """Training starts stage-2 sampling at a level drawn uniformly from [t_star, max_start_t] (t_star: exactly the
    inference chain), and stage 1 trains the levels 0..max_start_t (those the sampler visits)."""
    ddim_steps: int = 10
    """DDIM steps from the start level to the clean map (training and inference)."""
    bootstrap_steps: int = 2000
    """Training steps of stage 1 (bootstrap); stage 2 afterwards."""
    denoiser_init: Literal["scratch", "teacher"] = "scratch"
    """'teacher': the denoiser starts as the teacher's network (its weights; zero weights on the noisy map and the
    level, which enters as an input plane; the deepest decoder attention left out to stay within the teacher's
    parameter count), so training starts from the teacher's quality; the denoiser_* settings below then do not
    apply. 'scratch': a new time-conditioned U-Net of the settings below."""
    denoiser_base_width: Optional[int] = None
    """U-Net width of the denoiser; None: the widest whose parameter count is at most the teacher's."""
    denoiser_channel_mults: Optional[Tuple[int, ...]] = None
    """Per-level width multipliers; None: the teacher's."""
    denoiser_num_res_blocks: Optional[int] = None
    """None: the teacher's."""
    denoiser_attention_levels: Optional[Tuple[int, ...]] = None
    """None: the teacher's."""
    ray_conditioning: Optional[bool] = None
    """Feed the pixel rays' Plücker coordinates to the denoiser; None: as the teacher does."""
    output_init_gain: float = 0.1
    """The denoiser's output convolution weights are scaled by this at initialisation (its bias starts at the
    teacher's), so the first predictions stay near the teacher's average map."""
    enforce_parameter_budget: bool = True
    """Refuse a denoiser with more parameters than the teacher (the method's claim is a better model at most as large)."""
    geometry_loss_weight: float = 1.0
    """Stage 1: weight of the 3D supervision (MSE between the predicted and the teacher's canonical maps)."""
    render_loss_weight: float = 1.0
    """Weight of the rendering loss (MSE of renders at the target views; in stage 2 the lambda_t-weighted sum)."""
    lpips_loss_weight: float = 0.05
    """Weight of LPIPS on the same renders (as the teacher's); skipped with one warning when its weights cannot load."""
    include_source_view: bool = True
    """Also render and supervise the source view (as the teacher does)."""
    cycle_loss_weight: float = 0.5
    """Weight of the cycle-consistency loss (MSE between the source image and the cycle's render at the source)."""
    gradient_checkpointing: bool = False
    """Recompute each denoiser call in the backward pass instead of storing its activations (stage 2 unrolls
    2 x ddim_steps calls per step: on a GPU at 128^2 this trades ~30% time for most of the activation memory)."""
    inference_seed: int = 0
    """Seed of the noise of :meth:`SplatExtDiffusionModel.predict_gaussians` (deterministic predictions)."""
    render_backend: RenderBackend = "auto"
    """'auto': gsplat on CUDA, our pure-PyTorch reference on CPU."""
    reference_tile_size: int = 1
    """Tile size of the CPU reference rasterizer (1: per-pixel bounding boxes, the cheap setting)."""
    log_teacher_psnr: bool = True
    """Also render the teacher's maps at the target views and report their PSNR (what the student must beat)."""


def load_teacher(config_path: Path, checkpoint_path: Optional[Path] = None) -> Model:
    """The teacher model of a splat-ext-image run, on the CPU, from its ``config.yml`` and a checkpoint (default:
    the latest). Only the model is built, so the teacher's dataset need not be on this machine."""
    from nerfstudio_splat_ext.generative.runs import load_run_model

    return load_run_model(
        config_path,
        checkpoint_path,
        required_method="predict_canonical",
        missing_hint="point --pipeline.model.teacher-config at the config.yml of a trained splat-ext-image run "
        "(ns-train splat-ext-image ...), or set --pipeline.model.teacher-checkpoint",
        wrong_run_hint="the teacher must be a splat-ext-image run",
    )


def _psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Mean PSNR over the views of [B, V, H, W, 3] renders."""
    return psnr(pred.detach().clamp(0, 1).flatten(0, 1), target.flatten(0, 1)).mean()


class SplatExtDiffusionModel(ObjectsModel):
    """The student; see the module docstring. Entry points: forward_batch, get_loss_dict, get_metrics_dict,
    predict_gaussians (the interface of nerfstudio_splat_ext.generative.pipeline)."""

    config: SplatExtDiffusionModelConfig
    method_name = "splat-ext-diffusion"

    # ------------------------------------------------------------------------------------------ setup
    def populate_modules(self) -> None:
        super().populate_modules()
        cfg = self.config
        teacher = self.kwargs.get("teacher")
        if teacher is None:
            if cfg.teacher_config is None:
                raise ValueError(
                    "splat-ext-diffusion needs a trained teacher: set --pipeline.model.teacher-config to the config.yml "
                    "of a splat-ext-image run"
                )
            teacher = load_teacher(cfg.teacher_config, cfg.teacher_checkpoint)
        if not hasattr(teacher, "predict_canonical"):
            raise TypeError(f"the teacher must have predict_canonical (a splat-ext-image model), got {type(teacher)}")
        self.teacher_parameter_count = sum(p.numel() for p in teacher.parameters())
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = teacher
        # the student's maps live in the teacher's canonical space: decode with the teacher's ranges
        self.map_config: GaussianMapConfig = getattr(teacher, "map_config", GaussianMapConfig())

        if not 0 <= cfg.t_star <= cfg.max_start_t < cfg.num_timesteps:
            raise ValueError(
                f"need 0 <= t_star ({cfg.t_star}) <= max_start_t ({cfg.max_start_t}) < num_timesteps ({cfg.num_timesteps})"
            )
        ddim_timesteps(cfg.t_star, cfg.ddim_steps)  # raises when the chain does not fit below t_star
        self.schedule = DiffusionSchedule(cfg.num_timesteps, cfg.schedule)

        tcfg = teacher.config
        rays = bool(getattr(tcfg, "ray_conditioning", True) if cfg.ray_conditioning is None else cfg.ray_conditioning)
        if cfg.denoiser_init == "teacher":
            self.denoiser = teacher_initialised_denoiser(teacher.unet, rays, cfg.num_timesteps)
        else:
            mults = tuple(cfg.denoiser_channel_mults or tcfg.channel_mults)
            blocks = int(cfg.denoiser_num_res_blocks or tcfg.num_res_blocks)
            attn = tuple(tcfg.attention_levels if cfg.denoiser_attention_levels is None else cfg.denoiser_attention_levels)
            width = cfg.denoiser_base_width or fit_base_width(self.teacher_parameter_count, mults, blocks, attn, rays)
            self.denoiser = GaussianMapDenoiser(width, mults, blocks, attn, rays)
            self._init_output_layer(teacher)
        self.student_parameter_count = count_parameters(self.denoiser)
        if cfg.enforce_parameter_budget and self.student_parameter_count > self.teacher_parameter_count:
            raise ValueError(
                f"the denoiser has {self.student_parameter_count} parameters, more than the teacher's "
                f"{self.teacher_parameter_count}; lower --pipeline.model.denoiser-base-width (or leave it unset to fit)"
            )
        self.register_buffer("background", teacher.background.detach().clone().float())

    def _init_output_layer(self, teacher) -> None:
        # Start near the teacher's output bias (its average map: at its init, a plane of faint small Gaussians) with
        # small weights, rather than random maps whose large random Gaussians make the first renders meaningless.
        out = self.denoiser.unet.out_conv
        teacher_out = getattr(getattr(teacher, "unet", None), "out_conv", None)
        with torch.no_grad():
            out.weight.mul_(self.config.output_init_gain)
            if teacher_out is not None and teacher_out.bias is not None and teacher_out.bias.shape == out.bias.shape:
                out.bias.copy_(teacher_out.bias)

    def train(self, mode: bool = True) -> "SplatExtDiffusionModel":
        super().train(mode)
        self.teacher.eval()  # frozen: it stays in inference mode
        return self

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {"denoiser": list(self.denoiser.parameters())}

    # --------------------------------------------------------------------------------- building blocks
    @torch.no_grad()
    def teacher_canonical(self, source_rgb: Tensor, c2w: Tensor, intrinsics: Tensor) -> Tensor:
        """The frozen teacher's canonical map [B, 15, H, W] of source_rgb [B, H, W, 3] (the sampler's start point;
        no gradient flows into it)."""
        return self.teacher.predict_canonical(source_rgb.detach(), c2w, intrinsics)

    def denoise(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x0 estimate [B, 15, H, W] of x_t at levels t [B] given the condition cond [B, C, H, W]."""
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.denoiser, x_t, t, cond, use_reentrant=False)  # type: ignore[return-value]
        return self.denoiser(x_t, t, cond)

    def sample(self, x_start: Tensor, t_start: int, cond: Tensor) -> Tuple[Tensor, List[Tensor], List[int]]:
        """Deterministic DDIM (``ddim_steps`` steps) from x_start [B, 15, H, W] at level t_start to a clean map;
        differentiable through every step.

        Returns (final map [B, 15, H, W], the x0 estimate of every step, the levels visited).
        """
        levels = ddim_timesteps(t_start, self.config.ddim_steps)
        x, estimates = x_start, []
        for i, t in enumerate(levels):
            t_b = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x0 = self.denoise(x, t_b, cond)
            estimates.append(x0)
            t_prev = levels[i + 1] if i + 1 < len(levels) else -1
            x = self.schedule.ddim_step(x, t_b, torch.full_like(t_b, t_prev), x0)
        return x, estimates, levels

    def render(self, canonical: Tensor, map_c2w: Tensor, map_intr: Tensor, c2w: Tensor, intr: Tensor) -> Tensor:
        """Renders maps [B, 15, H, W] (predicted from cameras map_c2w [B, 4, 4], map_intr [B, 4]) at cameras
        c2w [B, V, 4, 4], intr [B, V, 4] -> rgb [B, V, H, W, 3] on the background (at the maps' resolution)."""
        g = decode_gaussian_map(canonical, map_c2w, map_intr, self.map_config)
        rgb, _ = render_pixel_gaussians(
            g,
            c2w,
            intr,
            width=int(canonical.shape[-1]),
            height=int(canonical.shape[-2]),
            background=self.background,
            backend=self.config.render_backend,
            reference_tile_size=self.config.reference_tile_size,
        )
        return rgb

    def _predict_train(self, stage: int, rgb: Tensor, c2w: Tensor, intr: Tensor) -> Dict:
        """One prediction by the stage's training procedure from rgb [B, H, W, 3] seen by c2w [B, 4, 4], intr [B, 4].

        Stage 1: one denoising step from the teacher's map noised at a level drawn from 0..max_start_t (those the
        sampler visits). Stage 2: the DDIM chain from the teacher's map noised at a level drawn from
        [t_star, max_start_t].
        """
        cfg = self.config
        b = rgb.shape[0]
        cond = self.denoiser.condition(rgb, c2w, intr)
        teacher_map = self.teacher_canonical(rgb, c2w, intr)
        noise = torch.randn_like(teacher_map)
        if stage == 1:
            t = torch.randint(0, cfg.max_start_t + 1, (b,), device=rgb.device)
            x0 = self.denoise(self.schedule.q_sample(teacher_map, t, noise), t, cond)
            return {"canonical": x0, "teacher": teacher_map, "estimates": [x0], "levels": t}
        t_start = int(torch.randint(cfg.t_star, cfg.max_start_t + 1, ()).item())
        x_start = self.schedule.q_sample(teacher_map, torch.full((b,), t_start, device=rgb.device), noise)
        final, estimates, levels = self.sample(x_start, t_start, cond)
        return {"canonical": final, "teacher": teacher_map, "estimates": estimates, "levels": levels}

    def _views(self, batch: Dict) -> Tuple[Tensor, Tensor, Tensor]:
        """Supervised cameras [B, V, 4, 4], intrinsics [B, V, 4] and ground truth [B, V, H, W, 3] on the background:
        (the source view, with include_source_view, then) the K target views."""
        c2w, intr = batch["target_c2w"], batch["target_intrinsics"]
        gt = composite(batch["target_images"], self.background)
        if self.config.include_source_view:
            c2w = torch.cat([batch["source_c2w"][:, None], c2w], dim=1)
            intr = torch.cat([batch["source_intrinsics"][:, None], intr], dim=1)
            gt = torch.cat([composite(batch["source_image"], self.background)[:, None], gt], dim=1)
        return c2w, intr, gt

    # -------------------------------------------------------------------------------- pipeline interface
    def forward_batch(self, batch: Dict, step: int) -> Dict:
        """Predictions of one batch of the multi-object datamanager (see its docstring) at training step ``step``.

        Returns ``stage`` (1 or 2); the renders of every x0 estimate at the supervised views ``step_rgbs`` (list of
        [B, V, H, W, 3]; V = source (with include_source_view) + K targets) and their weights ``step_weights`` [S]
        (lambda_t in stage 2); ``rgb``, the final prediction's renders; the maps ``canonical`` and
        ``teacher_canonical`` [B, 15, H, W]; ``gt_rgb`` [B, V, H, W, 3]; and, with the cycle loss, the render at the
        first target view used as the cycle's source ``cycle_source_rgb`` and the cycle's render at the source view
        ``cycle_rgb`` [B, H, W, 3].
        """
        stage = 1 if step < self.config.bootstrap_steps else 2
        src = composite(batch["source_image"], self.background)
        src_c2w, src_intr = batch["source_c2w"], batch["source_intrinsics"]
        c2w, intr, gt = self._views(batch)
        pred = self._predict_train(stage, src, src_c2w, src_intr)
        step_rgbs = [self.render(x0, src_c2w, src_intr, c2w, intr) for x0 in pred["estimates"]]
        weights = torch.ones(1, device=src.device) if stage == 1 else self.schedule.loss_weights(pred["levels"])
        outputs: Dict = {
            "stage": stage,
            "step": step,
            "canonical": pred["canonical"],
            "teacher_canonical": pred["teacher"],
            "step_rgbs": step_rgbs,
            "step_weights": weights,
            # stage 2's final map is its last x0 estimate exactly (the DDIM step to level -1 returns it)
            "rgb": step_rgbs[-1],
            "gt_rgb": gt,
        }
        if self.config.cycle_loss_weight > 0:
            # the result seen from the first target view becomes the new source, with that camera
            k = 1 if self.config.include_source_view else 0
            cyc_src = step_rgbs[-1][:, k]
            cyc_c2w, cyc_intr = batch["target_c2w"][:, 0], batch["target_intrinsics"][:, 0]
            cyc = self._predict_train(stage, cyc_src, cyc_c2w, cyc_intr)
            back = self.render(cyc["canonical"], cyc_c2w, cyc_intr, src_c2w[:, None], src_intr[:, None])
            outputs["cycle_source_rgb"] = cyc_src
            outputs["cycle_rgb"] = back[:, 0]
            outputs["source_rgb"] = src
        return outputs

    def get_loss_dict(self, outputs: Dict, batch: Dict, metrics_dict: Optional[Dict] = None) -> Dict[str, Tensor]:
        cfg = self.config
        gt = outputs["gt_rgb"]
        weights, rgbs = outputs["step_weights"], outputs["step_rgbs"]
        losses: Dict[str, Tensor] = {
            "render_loss": cfg.render_loss_weight * sum(w * F.mse_loss(rgb, gt) for w, rgb in zip(weights, rgbs))
        }
        if cfg.lpips_loss_weight > 0 and self.training:
            terms = [self._lpips(rgb, gt) for rgb in rgbs]
            if all(term is not None for term in terms):
                losses["lpips_loss"] = cfg.lpips_loss_weight * sum(w * term for w, term in zip(weights, terms))
        if outputs["stage"] == 1 and cfg.geometry_loss_weight > 0:
            losses["geometry_loss"] = cfg.geometry_loss_weight * F.mse_loss(
                outputs["canonical"], outputs["teacher_canonical"]
            )
        if "cycle_rgb" in outputs:
            losses["cycle_loss"] = cfg.cycle_loss_weight * F.mse_loss(outputs["cycle_rgb"], outputs["source_rgb"])
        return losses

    def get_metrics_dict(self, outputs: Dict, batch: Dict) -> Dict[str, Tensor]:
        """PSNR of the final renders at the target views (and of the teacher's, with log_teacher_psnr), the cycle's
        PSNR at the source view, and the stage."""
        n = 1 if self.config.include_source_view else 0
        gt = outputs["gt_rgb"][:, n:]
        metrics = {
            "psnr": _psnr(outputs["rgb"][:, n:], gt),
            "stage": torch.tensor(float(outputs["stage"])),
        }
        if "cycle_rgb" in outputs:
            metrics["cycle_psnr"] = _psnr(outputs["cycle_rgb"][:, None], outputs["source_rgb"][:, None])
        if self.config.log_teacher_psnr:
            with torch.no_grad():
                teacher_rgb = self.render(
                    outputs["teacher_canonical"],
                    batch["source_c2w"],
                    batch["source_intrinsics"],
                    batch["target_c2w"],
                    batch["target_intrinsics"],
                )
            metrics["teacher_psnr"] = _psnr(teacher_rgb, gt)
        return metrics

    @torch.no_grad()
    def predict_canonical(
        self, source_rgb: Tensor, source_c2w: Tensor, source_intrinsics: Tensor, seed: Optional[int] = None
    ) -> Tensor:
        """Canonical map [B, 15, H, W] of source_rgb [B, H, W, 3] (on the background): the teacher's map noised to
        t* with noise seeded by ``seed`` (default ``config.inference_seed``), then the DDIM chain."""
        cfg = self.config
        dev = self.device
        source_rgb, source_c2w, source_intrinsics = source_rgb.to(dev), source_c2w.to(dev), source_intrinsics.to(dev)
        teacher_map = self.teacher_canonical(source_rgb, source_c2w, source_intrinsics)
        gen = torch.Generator(device=dev).manual_seed(cfg.inference_seed if seed is None else seed)
        noise = torch.randn(teacher_map.shape, generator=gen, device=dev, dtype=teacher_map.dtype)
        t = torch.full((teacher_map.shape[0],), cfg.t_star, device=dev)
        x_start = self.schedule.q_sample(teacher_map, t, noise)
        cond = self.denoiser.condition(source_rgb, source_c2w, source_intrinsics)
        final, _, _ = self.sample(x_start, cfg.t_star, cond)
        return final

    @torch.no_grad()
    def predict_gaussians(
        self, source_rgb: Tensor, source_c2w: Tensor, source_intrinsics: Tensor, seed: Optional[int] = None
    ) -> PixelGaussians:
        """Gaussians (N = H * W per item) of source_rgb [B, H, W, 3] (on the background) seen by source_c2w
        [B, 4, 4] (OpenGL) with source_intrinsics [B, 4]; deterministic for a given ``seed``."""
        canonical = self.predict_canonical(source_rgb, source_c2w, source_intrinsics, seed)
        return decode_gaussian_map(canonical, source_c2w.to(canonical), source_intrinsics.to(canonical), self.map_config)
