"""nerfstudio entry points of splat-ext (`nerfstudio.method_configs` and `nerfstudio.dataparser_configs`).

nerfstudio imports this module for every `ns-*` command, so it only builds config objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from nerfstudio_splat_ext.dataparsers.splat_ext_dataparser import SplatExtDataParserConfig
from nerfstudio_splat_ext.datamanagers.image_datamanager import SplatExtImageDataManagerConfig
from nerfstudio_splat_ext.datamanagers.ray_datamanager import SplatExtRayDataManagerConfig
from nerfstudio_splat_ext.engine.trainer import SplatExtTrainerConfig
from nerfstudio_splat_ext.models.nerf import SplatExtNerfModelConfig
from nerfstudio_splat_ext.models.splat_ext import SplatExtModelConfig
from nerfstudio_splat_ext.generative.data.datamanager import MultiObjectDataManagerConfig
from nerfstudio_splat_ext.generative.pipeline import ObjectsPipelineConfig
from nerfstudio_splat_ext.models.splat_ext_image import SplatExtImageModelConfig
from nerfstudio_splat_ext.models.splat_ext_diffusion import SplatExtDiffusionModelConfig
from nerfstudio_splat_ext.utils.startup import skip_external_method_stack_walk

# nerfstudio loads this module (an entry point) before it builds its external-method placeholders: make those cheap
# (about 4 s of every ns-* command's start-up; utils/startup.py says why).
skip_external_method_stack_walk()

MAX_STEPS = 30_000


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """torch's Adam with its fused CUDA kernel (one launch for all parameters, grad-scaler aware)."""

    fused: bool = True


def _adam(lr: float) -> AdamOptimizerConfig:
    # The Gaussians' Adam as one fused kernel per parameter group on GPU: torch's default multi-tensor Adam took
    # 1.1 ms of a 7.8 ms step with 300k Gaussians on lego (BENCHMARKS.md).
    config_type = FusedAdamOptimizerConfig if torch.cuda.is_available() else AdamOptimizerConfig
    return config_type(lr=lr, eps=1e-15)


def short_schedule_flags(steps: int, num_random: int = 20_000) -> List[str]:
    """ns-train flags that compress the paper's 30k-step schedule to `steps` (for CPU runs): densify from 1/8 to 2/3
    of the run, reset opacities at the half, one SH degree per quarter, position lr decayed over the run."""
    return [
        "--max-num-iterations", str(steps),
        "--pipeline.model.num-random", str(num_random),
        "--pipeline.model.sh-degree-interval", str(steps // 4),
        "--pipeline.model.strategy.refine-start-iter", str(steps // 8),
        "--pipeline.model.strategy.refine-stop-iter", str(steps * 2 // 3),
        "--pipeline.model.strategy.reset-every", str(steps // 2),
        "--optimizers.means.scheduler.max-steps", str(steps),
    ]


def splat_ext_trainer_config() -> SplatExtTrainerConfig:
    # Learning rates after Kerbl et al. 2023; the position lr is further multiplied by the cameras' extent
    # inside the model (SplatExtModelConfig.position_lr_scale_by_extent).
    return SplatExtTrainerConfig(
        method_name="splat-ext",
        steps_per_eval_image=500,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=MAX_STEPS,
        max_num_iterations=MAX_STEPS,
        mixed_precision=False,
        # Works without flags on a machine without a GPU (nerfstudio's default is CUDA).
        machine=MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu"),
        pipeline=VanillaPipelineConfig(
            datamanager=SplatExtImageDataManagerConfig(
                dataparser=SplatExtDataParserConfig(),
                cache_images_type="uint8",
            ),
            model=SplatExtModelConfig(),
        ),
        optimizers={
            "means": {
                "optimizer": _adam(1.6e-4),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=MAX_STEPS),
            },
            "features_dc": {"optimizer": _adam(2.5e-3), "scheduler": None},
            "features_rest": {"optimizer": _adam(2.5e-3 / 20), "scheduler": None},
            "opacities": {"optimizer": _adam(0.05), "scheduler": None},
            "scales": {"optimizer": _adam(5e-3), "scheduler": None},
            "quats": {"optimizer": _adam(1e-3), "scheduler": None},
            "camera_opt": {
                "optimizer": _adam(1e-4),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-7, max_steps=MAX_STEPS, warmup_steps=1000, lr_pre_warmup=0),
            },
        },
        # Bind the viewer to this machine only unless the user asks otherwise.
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, websocket_host="127.0.0.1"),
        vis="viewer",
    )


splat_ext = MethodSpecification(
    config=splat_ext_trainer_config(),
    description="3D Gaussian Splatting with our own density control and losses; GPU (gsplat) or CPU (PyTorch).",
)


# About what one H200 runs in 9 minutes on lego (13.3 ms per step with CUDA graphs, BENCHMARKS 00000); the learning
# rate decays over exactly this.
NERF_MAX_STEPS = 40_000


def splat_ext_nerf_trainer_config() -> SplatExtTrainerConfig:
    # Adam at 5e-4 decayed exponentially to 5e-5 (the paper's rates, over our shorter schedule). 8192 rays per batch
    # on GPU (twice the paper's: with empty space skipped a step is cheap, and a larger batch fills the GPU), 1024 on CPU.
    gpu = torch.cuda.is_available()
    return SplatExtTrainerConfig(
        method_name="splat-ext-nerf",
        steps_per_eval_image=1000,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=NERF_MAX_STEPS,
        max_num_iterations=NERF_MAX_STEPS,
        mixed_precision=gpu,
        machine=MachineConfig(device_type="cuda" if gpu else "cpu"),
        pipeline=VanillaPipelineConfig(
            datamanager=SplatExtRayDataManagerConfig(
                dataparser=SplatExtDataParserConfig(),
                train_num_rays_per_batch=8192 if gpu else 1024,
                eval_num_rays_per_batch=4096,
            ),
            model=SplatExtNerfModelConfig(eval_num_rays_per_chunk=1 << 14),
        ),
        optimizers={
            "fields": {
                "optimizer": (FusedAdamOptimizerConfig if gpu else AdamOptimizerConfig)(lr=5e-4, eps=1e-8),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-5, max_steps=NERF_MAX_STEPS),
            },
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 14, websocket_host="127.0.0.1"),
        vis="viewer",
    )


splat_ext_nerf = MethodSpecification(
    config=splat_ext_nerf_trainer_config(),
    description="NeRF (Mildenhall et al. 2020) baseline; occupancy-grid fast path on GPU, paper sampling on CPU.",
)


IMAGE_MAX_STEPS = 50_000
DIFFUSION_MAX_STEPS = 30_000
DIFFUSION_BOOTSTRAP_STEPS = 10_000


def objects_trainer_config(method_name: str, model, param_group: str, max_steps: int) -> SplatExtTrainerConfig:
    """A single-image-to-3D method on 128x128 generated objects: 8 objects x (1 source + 4 targets) per step, Adam
    with a short warm-up, decayed 10x over the run; evaluation reads held-out objects only (ObjectsPipeline)."""
    return SplatExtTrainerConfig(
        method_name=method_name,
        steps_per_eval_image=1000,
        steps_per_eval_batch=500,
        steps_per_save=5000,
        steps_per_eval_all_images=max_steps,
        max_num_iterations=max_steps,
        mixed_precision=False,
        machine=MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu"),
        pipeline=ObjectsPipelineConfig(
            datamanager=MultiObjectDataManagerConfig(batch_size=8, eval_batch_size=8, num_target_views=4),
            model=model,
        ),
        optimizers={
            param_group: {
                "optimizer": AdamOptimizerConfig(lr=1e-4, eps=1e-8),
                "scheduler": ExponentialDecaySchedulerConfig(
                    lr_final=1e-5, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=1e-6
                ),
            },
        },
        # No scene viewer: there is no single scene to show. Headless logging by default.
        vis="tensorboard",
    )


def splat_ext_image_trainer_config() -> SplatExtTrainerConfig:
    return objects_trainer_config("splat-ext-image", SplatExtImageModelConfig(), "network", IMAGE_MAX_STEPS)


def splat_ext_diffusion_trainer_config() -> SplatExtTrainerConfig:
    # Student after "A Lesson in Splats" on the teacher's data: stage 1 (bootstrap) for the first third, then the
    # 10-step DDIM unrolled with gradients through every step; the unrolled chain (2 x 10 denoiser calls per step
    # with the cycle) checkpoints its activations on the GPU. Needs --pipeline.model.teacher-config.
    model = SplatExtDiffusionModelConfig(
        bootstrap_steps=DIFFUSION_BOOTSTRAP_STEPS, gradient_checkpointing=torch.cuda.is_available()
    )
    return objects_trainer_config("splat-ext-diffusion", model, "denoiser", DIFFUSION_MAX_STEPS)


splat_ext_image = MethodSpecification(
    config=splat_ext_image_trainer_config(),
    description="Splatter-Image-style teacher: a U-Net maps one image to one 3D Gaussian per pixel (multi-object data).",
)


splat_ext_diffusion = MethodSpecification(
    config=splat_ext_diffusion_trainer_config(),
    description="Diffusion student over per-pixel Gaussian maps (A Lesson in Splats): a frozen splat-ext-image "
    "teacher's maps noised to t* = 20/100, denoised by a 10-step DDIM trained with 2D losses.",
)
