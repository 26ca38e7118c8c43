"""Pipeline of the feed-forward object models (teacher ``splat-ext-image``, student ``splat-ext-diffusion``).

nerfstudio's VanillaPipeline feeds ray bundles to a model; these models map a batch of the multi-object
datamanager (:mod:`nerfstudio_splat_ext.generative.data.datamanager`: one source view and K target views per
object) to outputs. The model side of the contract:

* ``forward_batch(batch, step) -> outputs``, ``get_loss_dict(outputs, batch, metrics)``,
  ``get_metrics_dict(outputs, batch)`` (training and random held-out batches);
* ``predict_gaussians(source_rgb [B,H,W,3] on the background, source_c2w [B,4,4], source_intrinsics [B,4])
  -> PixelGaussians`` and an attribute ``background`` (Tensor[3]) for evaluation.

Evaluation (``ns-eval``, the trainer's eval steps) reads held-out objects only: each object's
``eval_source_view`` is the input, every other view is rendered from the predicted Gaussians and compared with
its ground truth composited on the background; PSNR / SSIM (+ LPIPS when its weights load) are averaged over the
views of an object, then over objects.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Dict, Optional, Tuple, Type

import torch
import torchvision.utils as vutils
from nerfstudio.models.base_model import Model
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from nerfstudio_splat_ext.generative.data.datamanager import MultiObjectDataManagerConfig
from nerfstudio_splat_ext.generative.pixel_gaussians import render_pixel_gaussians
from nerfstudio_splat_ext.losses.ssim import ssim as ssim_fn
from nerfstudio_splat_ext.utils import lpips as lpips_utils
from nerfstudio_splat_ext.utils.lpips import LazyLPIPS


def composite(rgba: Tensor, background: Tensor) -> Tensor:
    """Straight-alpha RGBA [..., 4] in [0, 1] -> RGB [..., 3] over ``background`` [3]."""
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + background.to(rgba) * (1.0 - alpha)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR (dB, data range 1) per leading item: pred, target [N, H, W, 3] -> [N]."""
    mse = ((pred - target) ** 2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


class ObjectsModel(Model):
    """Base of the models this pipeline trains: they map a source image to Gaussians (``forward_batch``,
    ``predict_gaussians``), so nerfstudio's per-ray entry points do not apply to them."""

    method_name: str = "this method"

    def get_outputs(self, ray_bundle) -> Dict:  # type: ignore[override]
        raise NotImplementedError(
            f"{self.method_name} predicts Gaussians from a source image: use forward_batch / predict_gaussians "
            f"(the {self.method_name} method's pipeline calls those), or splat-ext-image-to-3d for one image"
        )

    def get_image_metrics_and_images(self, outputs, batch):  # type: ignore[override]
        raise NotImplementedError(f"evaluation of {self.method_name} runs in ObjectsPipeline.evaluate_object")

    def _lpips(self, pred: Tensor, gt: Tensor) -> Optional[Tensor]:
        """Differentiable LPIPS (mean) of [B, V, H, W, 3] images for the training loss, or None (with one warning)
        when its network weights cannot be loaded."""
        if self.__dict__.get("_lpips_skipped") is not None:
            return None
        net = self.__dict__.get("_lpips_net")
        if net is None:
            try:
                net = lpips_utils.build_lpips_network()
            except Exception as err:  # offline: torchvision cannot download the AlexNet weights
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                self.__dict__["_lpips_skipped"] = (
                    f"{self.method_name}: LPIPS loss skipped, its weights could not be loaded ({first[:160]})")
                warnings.warn(self.__dict__["_lpips_skipped"], stacklevel=2)
                return None
        # kept out of the module tree (no nn.Module attribute), so checkpoints never hold LPIPS weights
        net = net.to(pred.device)
        self.__dict__["_lpips_net"] = net
        p = pred.flatten(0, 1).permute(0, 3, 1, 2).clamp(0, 1)
        return net(p, gt.flatten(0, 1).permute(0, 3, 1, 2), normalize=True).mean()


@dataclass
class ObjectsPipelineConfig(VanillaPipelineConfig):
    """Pipeline of models that map one source image of an object to 3D Gaussians."""

    _target: Type = field(default_factory=lambda: ObjectsPipeline)
    datamanager: MultiObjectDataManagerConfig = field(default_factory=MultiObjectDataManagerConfig)  # type: ignore[assignment]
    eval_view_chunk: int = 32
    """Held-out views rendered at once during evaluation (bounds memory on large objects)."""
    eval_image_views: int = 4
    """Views shown in the logged evaluation image (source, then renders above ground truth)."""


class ObjectsPipeline(VanillaPipeline):
    """Training on multi-object batches; evaluation on held-out objects (see the module docstring)."""

    config: ObjectsPipelineConfig

    def __init__(self, config: ObjectsPipelineConfig, device: str, *args, **kwargs) -> None:
        super().__init__(config, device, *args, **kwargs)
        self._lpips = LazyLPIPS()

    # -------------------------------------------------------------------------------------------- training
    def get_train_loss_dict(self, step: int):
        _, batch = self.datamanager.next_train(step)
        outputs = self.model.forward_batch(batch, step)
        metrics_dict = self.model.get_metrics_dict(outputs, batch)
        loss_dict = self.model.get_loss_dict(outputs, batch, metrics_dict)
        return outputs, loss_dict, metrics_dict

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        """Loss and metrics of a random batch of held-out objects (random source / target views)."""
        self.eval()
        try:
            _, batch = self.datamanager.next_eval(step)
            outputs = self.model.forward_batch(batch, step)
            metrics_dict = self.model.get_metrics_dict(outputs, batch)
            loss_dict = self.model.get_loss_dict(outputs, batch, metrics_dict)
        finally:
            self.train()
        return outputs, loss_dict, metrics_dict

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_object(self, batch: Dict) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        """Metrics of one held-out object (a batch of ``next_eval_image``: B = 1, all other views as targets) and
        an image: the source view, then for ``eval_image_views`` targets the render above the ground truth."""
        model = self.model
        bg = model.background.to(self.device)
        src = composite(batch["source_image"], bg)
        height, width = src.shape[1:3]
        start = perf_counter()
        gaussians = model.predict_gaussians(src, batch["source_c2w"], batch["source_intrinsics"])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        predict_s = perf_counter() - start
        targets = composite(batch["target_images"], bg)[0]  # [V, H, W, 3]
        c2w, intr = batch["target_c2w"], batch["target_intrinsics"]
        renders = []
        for lo in range(0, c2w.shape[1], self.config.eval_view_chunk):
            hi = lo + self.config.eval_view_chunk
            rgb, _ = render_pixel_gaussians(
                gaussians,
                c2w[:, lo:hi],
                intr[:, lo:hi],
                int(width),
                int(height),
                bg,
                backend=getattr(model.config, "render_backend", "auto"),
                reference_tile_size=getattr(model.config, "reference_tile_size", 1),
            )
            renders.append(rgb[0])
        pred = torch.cat(renders).clamp(0.0, 1.0)  # [V, H, W, 3]
        pred_chw, gt_chw = pred.permute(0, 3, 1, 2), targets.permute(0, 3, 1, 2)
        metrics: Dict[str, float] = {
            "psnr": float(psnr(pred, targets).mean()),
            "ssim": float(torch.stack([ssim_fn(p[None], g[None]) for p, g in zip(pred_chw, gt_chw)]).mean()),
            "predict_ms": 1000.0 * predict_s,
        }
        lpips = self._lpips(pred_chw, gt_chw)
        if lpips is not None:
            metrics["lpips"] = lpips
        n = min(self.config.eval_image_views, pred.shape[0])
        columns = [torch.cat([src[0], src[0]], dim=0)]
        columns += [torch.cat([pred[i], targets[i]], dim=0) for i in range(n)]
        return metrics, {"source_render_gt": torch.cat(columns, dim=1)}

    def get_eval_image_metrics_and_images(self, step: int):
        self.eval()
        try:
            camera, batch = self.datamanager.next_eval_image(step)
            metrics, images = self.evaluate_object(batch)
        finally:
            self.train()
        metrics["num_rays"] = int(camera.height[0, 0]) * int(camera.width[0, 0]) * (camera.shape[1] - 1)
        return metrics, images

    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, float]:
        """Metrics over every held-out object (mean, and ``<name>_std`` over objects with ``get_std``)."""
        self.eval()
        per_object = []
        if output_path is not None:
            output_path.mkdir(parents=True, exist_ok=True)
        try:
            for idx, (_, batch) in enumerate(self.datamanager.fixed_indices_eval_dataloader):
                metrics, images = self.evaluate_object(batch)
                per_object.append(metrics)
                if output_path is not None:
                    for key, image in images.items():
                        vutils.save_image(image.permute(2, 0, 1).cpu(), output_path / f"eval_{key}_{idx:04d}.png")
        finally:
            self.train()
        if self._lpips.skipped_reason is not None:
            CONSOLE.log(self._lpips.skipped_reason)
        out: Dict[str, float] = {}
        for key in per_object[0]:
            values = torch.tensor([m[key] for m in per_object], dtype=torch.float64)
            out[key] = float(values.mean())
            if get_std:
                out[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
        out["num_objects"] = float(len(per_object))
        return out
