"""The `splat-ext` model: 3D Gaussian Splatting (Kerbl et al. 2023) inside nerfstudio.

It subclasses nerfstudio's SplatfactoModel so that the viewer and `ns-export gaussian-splat` treat it as Gaussian
splats (same parameter names and layout), and replaces the parts that make the method:
- rendering through `render/` (gsplat on CUDA, the pure-PyTorch reference on CPU),
- the loss through `losses/` (0.8 L1 + 0.2 D-SSIM),
- densification through `strategy/` (our adaptive density control),
- initialisation (SfM points or Inria-style random points in the scene box), background handling and learning-rate
  scaling by the scene extent after the paper, and evaluation that survives offline machines (lazy LPIPS).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch.nn import Parameter

from nerfstudio_splat_ext.losses.photometric import PhotometricLossConfig
from nerfstudio_splat_ext.losses.ssim import ssim as ssim_fn
from nerfstudio_splat_ext.model_components.background import dataset_background, resolve_background
from nerfstudio_splat_ext.render.backend import RenderBackend, get_rasterizer, get_spherical_harmonics
from nerfstudio_splat_ext.strategy.contribution import ContributionStrategy
from nerfstudio_splat_ext.utils.lpips import LazyLPIPS
from nerfstudio_splat_ext.utils.threads import map_in_threads

SH_C0 = 0.28209479177387814  # Y_0^0, maps RGB to the DC spherical-harmonic coefficient


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / SH_C0


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def camera_to_world_to_viewmat(c2w: torch.Tensor) -> torch.Tensor:
    """nerfstudio camera-to-world [C,3,4] (OpenGL: y up, z back) -> world-to-camera [C,4,4] (OpenCV: y down, z fwd)."""
    # y and z axes flipped by negating columns, not by multiplying with a constant tensor: building that constant
    # on the GPU is a host-to-device copy, which waits for every queued kernel.
    rot = torch.cat([c2w[:, :3, 0:1], -c2w[:, :3, 1:3]], dim=2)
    trans = c2w[:, :3, 3:4]
    rot_inv = rot.transpose(1, 2)
    viewmat = torch.zeros(c2w.shape[0], 4, 4, device=c2w.device, dtype=c2w.dtype)
    viewmat[:, :3, :3] = rot_inv
    viewmat[:, :3, 3:4] = -rot_inv @ trans
    viewmat[:, 3, 3] = 1.0
    return viewmat


def view_dependent_colors(
    spherical_harmonics, degree: int, means: torch.Tensor, f_dc: torch.Tensor, f_rest: torch.Tensor,
    centres: torch.Tensor,
) -> torch.Tensor:
    """RGB [C,N,3] of every Gaussian seen from each camera centre [C,3]: SH up to `degree`, then + 0.5 and clamped
    at 0 (the 3DGS convention, as gsplat's rasterization applies it)."""
    coeffs = torch.cat([f_dc[:, None, :], f_rest], dim=1)  # [N,K,3]
    if centres.shape[0] == 1:
        # One camera (every training step): no [C,N,K,3] copy of the coefficients (the SH kernel makes its inputs
        # contiguous) and no reduction over cameras in the backward pass.
        colors = spherical_harmonics(degree, means - centres[0], coeffs)[None]
    else:
        dirs = means[None] - centres[:, None]  # [C,N,3]
        colors = spherical_harmonics(degree, dirs, coeffs[None].expand(centres.shape[0], -1, -1, -1))
    return torch.clamp_min(colors + 0.5, 0.0)


def camera_extent(camera_to_worlds: torch.Tensor) -> float:
    """The 3DGS 'cameras extent': 1.1 x the largest distance of a camera centre from the centres' mean."""
    centres = camera_to_worlds[:, :3, 3].double()
    radius = (centres - centres.mean(dim=0)).norm(dim=-1).max().item()
    return 1.1 * max(radius, 1e-6)


def knn_mean_distance(points: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Mean distance of each point to its k nearest neighbours (the paper's initial scale), on the points' device.

    scipy's k-d tree on the host: 0.2 s for 100k points on one H100 GPU's host, where a brute-force search on the
    GPU took 0.4 s (BENCHMARKS.md 00000000000000000)."""
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().double().numpy()
    dists, _ = cKDTree(pts).query(pts, k=k + 1)
    return torch.from_numpy(dists[:, 1:]).float().mean(dim=-1).to(points.device)


@dataclass
class SplatExtModelConfig(SplatfactoModelConfig):
    """splat-ext: 3D Gaussian Splatting with our own densification strategy, losses and CPU reference renderer."""

    _target: Type = field(default_factory=lambda: SplatExtModel)
    background_color: Literal["auto", "random", "black", "white"] = "auto"  # type: ignore[assignment]
    """Background composited behind the Gaussians. 'auto' takes the dataset's alpha colour when the dataparser
    reports one (white for Blender data, matching the training targets), else black."""
    num_downscales: int = 0
    """Train at 1/2^d resolution at the start (0 = full resolution from step 0, as in the paper)."""
    random_init: bool = False
    """Initialise from random points even when the dataparser provides SfM points."""
    num_random: int = 100_000
    """Number of random points (Inria-style random init) when there are no SfM points."""
    random_init_placement: Literal["auto", "box", "views"] = "auto"
    """Where random points go when there are no SfM points. 'box': uniformly in the scene box (the paper's
    initialisation of synthetic scenes); 'views': on training rays where the other views see the same colour, with
    that colour (model_components/seed_points.py); 'auto': 'box' when the dataset has a background colour (objects
    composited on a known background), else 'views' (photographs)."""
    random_init_box_scale: float = 1.0
    """'box' placement: random points are drawn uniformly in the scene box scaled by this factor about its centre.
    (On fox at 67x120 on CPU, 5 instead of 1 lowered test PSNR from 21.7 to 17.8 dB: BENCHMARKS.md.)"""
    random_init_depth_range: Tuple[float, float] = (0.1, 10.0)
    """'views' placement: depths of the candidate points along the rays, in units of the cameras' extent."""
    init_opacity: float = 0.1
    sh_degree: int = 3
    sh_degree_interval: int = 1000
    """Add one SH degree every this many steps, up to sh_degree."""
    position_lr_scale_by_extent: bool = True
    """Multiply the position learning rate by the cameras' extent, as the 3DGS paper does."""
    near_plane: Optional[float] = None
    """Gaussians closer to the camera than this are not drawn: a Gaussian right in front of one training camera
    would otherwise become a floater that only that view constrains. None: the cameras' extent / 25 (0.2 on Blender
    scenes, the 3DGS rasterizer's value; scale-free for data whose poses were rescaled)."""
    render_backend: RenderBackend = "auto"
    """'auto': gsplat on CUDA, our pure-PyTorch reference on CPU."""
    tight_tile_bounds: bool = False
    """On GPU, list each Gaussian only in the tiles where its alpha can reach the rasterizer's 1/255 cut-off (a box
    that shrinks with opacity; render/tight_tiles.py) instead of its 3-sigma square: the same image and gradients
    with fewer tile pairs to sort and composite. Off by default: on lego (30k steps, one H100) it cut the GPU time
    of the contribution passes by 17% but made the training loop 6% slower, because the step waits on kernel
    launches, not on the GPU, and the bound adds about 20 of them."""
    reference_tile_size: int = 1
    """Tile size of the reference rasterizer on CPU. 16 reproduces gsplat's tile lists exactly; 1 (per-pixel
    bounding boxes) drops only faint tails outside each Gaussian's 3-sigma box and is much cheaper."""
    loss: PhotometricLossConfig = field(default_factory=PhotometricLossConfig)
    strategy: ContributionStrategy = field(default_factory=ContributionStrategy)
    """Density control: Kerbl et al. 2023's Algorithm 1 with its schedule and thresholds (kind 'adc'), optionally
    with render-loss contribution pruning, contribution-weighted growth and a Gaussian budget (kind 'contribution');
    kind 'auto' (default) takes 'contribution' for photographs and 'adc' for objects on a known background."""
    output_depth_during_training: bool = False
    train_psnr_every: int = 10
    """Compute the training PSNR on every this many steps (nerfstudio logs training metrics every 10 steps by
    default, `--logging.steps-per-log`). Each computation is a few kernel launches, and a splat-ext training step
    is bound by launches, not by the GPU (BENCHMARKS.md)."""


class SplatExtModel(SplatfactoModel):
    """3D Gaussian Splatting with the parts described in the module docstring."""

    config: SplatExtModelConfig

    # ------------------------------------------------------------------ setup
    def populate_modules(self) -> None:
        cfg = self.config
        seed_xyz, seed_rgb = self._seed_points()
        if seed_xyz is not None:
            means = seed_xyz.float()
            colors = seed_rgb.float() / 255.0 if seed_rgb is not None else torch.rand_like(means)
            CONSOLE.log(f"splat-ext: initialising {means.shape[0]} Gaussians from SfM points")
        else:
            lo, hi = self.scene_box.aabb[0].float(), self.scene_box.aabb[1].float()
            centre, half = (lo + hi) / 2, (hi - lo) / 2 * cfg.random_init_box_scale
            means = centre + (torch.rand(cfg.num_random, 3) * 2 - 1) * half
            colors = torch.rand(cfg.num_random, 3)
            CONSOLE.log(f"splat-ext: initialising {cfg.num_random} random Gaussians in the scene box")
        cap = cfg.strategy.max_gaussians
        if cap is not None and means.shape[0] > int(cap):
            # The budget is an out-of-memory guard, so it holds from the first step: keep a random subset.
            keep = torch.randperm(means.shape[0])[: int(cap)]
            means, colors = means[keep], colors[keep]
            CONSOLE.log(f"splat-ext: kept {int(cap)} of them (strategy.max_gaussians)")
        n = means.shape[0]
        if seed_xyz is None and self._random_placement() == "views":
            # The points move onto the views when training starts (_place_on_views sets their scales there), and a
            # checkpoint replaces them otherwise: no neighbour search here, the box's mean spacing will do.
            spacing = float(torch.prod(2 * half).clamp_min(1e-12) / n) ** (1.0 / 3.0)
            scales = torch.full((n, 3), math.log(max(spacing, 1e-7)))
        else:
            scales = torch.log(knn_mean_distance(means).clamp_min(1e-7))[:, None].repeat(1, 3)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0  # identity rotation (w, x, y, z)
        features_dc = rgb_to_sh_dc(colors)
        features_rest = torch.zeros(n, num_sh_bases(cfg.sh_degree) - 1, 3)
        opacities = torch.logit(torch.full((n, 1), cfg.init_opacity))
        self.gauss_params = torch.nn.ParameterDict(
            {
                "means": Parameter(means),
                "scales": Parameter(scales),
                "quats": Parameter(quats),
                "features_dc": Parameter(features_dc),
                "features_rest": Parameter(features_rest),
                "opacities": Parameter(opacities),
            }
        )
        # Saved with the checkpoint so that ns-eval / ns-viewer cull exactly as training did; set at training start.
        self.register_buffer("near_plane", torch.tensor(cfg.near_plane if cfg.near_plane is not None else 0.01))
        self._near_plane = float(self.near_plane)  # host copy: reading the buffer each step would sync the GPU
        self.camera_optimizer = cfg.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")
        self._random_initialised = seed_xyz is None

        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.lpips_metric = LazyLPIPS()
        self.loss_fn = cfg.loss.setup()
        self.step = 0
        self.crop_box = None
        self.background_color = resolve_background(cfg.background_color, self.kwargs.get("metadata"))
        self.strategy = cfg.strategy
        if self.strategy.kind == "auto":
            kind = "contribution" if self._photographs() else "adc"
            self.strategy = dataclasses.replace(cfg.strategy, kind=kind)
            CONSOLE.log(f"splat-ext: density control '{kind}' ({'photographs' if kind == 'contribution' else 'objects on a known background'})")
        self.strategy_state: Optional[dict] = None
        self.scene_extent: Optional[float] = None
        self.info: dict = {}
        self.optimizers: dict = {}
        # Per training camera index: view matrix, intrinsics, centre (on the device), width, height (see _view);
        # and the background colour on the device.
        self._train_views: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]] = {}
        self._background_on_device: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if cfg.use_bilateral_grid:
            raise ValueError("splat-ext does not support use_bilateral_grid")

    def _seed_points(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.config.random_init or self.seed_points is None:
            return None, None
        xyz, rgb = self.seed_points
        if xyz is None or xyz.shape[0] < 4:
            return None, None
        return xyz, (rgb if rgb is not None and rgb.shape[0] == xyz.shape[0] else None)

    def _get_background_color(self) -> torch.Tensor:
        if self.config.background_color == "random" and self.training:
            return torch.rand(3, device=self.device)
        # Copied to the device once, not every step (a host-to-device copy waits for the GPU).
        cached = self._background_on_device
        if cached is None or cached[0] is not self.background_color or cached[1].device != self.device:
            cached = (self.background_color, self.background_color.to(self.device))
            self._background_on_device = cached
        return cached[1]

    # ------------------------------------------------------------ training hooks
    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        pipeline = training_callback_attributes.pipeline
        cameras = pipeline.datamanager.train_dataparser_outputs.cameras if pipeline is not None else None
        self.scene_extent = camera_extent(cameras.camera_to_worlds) if cameras is not None else 1.0
        if self.config.near_plane is None:
            self.near_plane.fill_(self.scene_extent / 25.0)
        self._near_plane = float(self.near_plane)
        if self._random_initialised and self._random_placement() == "views" and pipeline is not None:
            # Here, not in populate_modules: the model gets no cameras or images before training starts. A resumed
            # run overwrites these values with the checkpoint's afterwards.
            self._place_on_views(pipeline.datamanager)
        if self.config.position_lr_scale_by_extent:
            self._scale_position_lr(training_callback_attributes.optimizers, self.scene_extent)
        self.strategy.check_sanity(self.gauss_params, training_callback_attributes.optimizers.optimizers)
        self.strategy_state = self._initial_strategy_state()
        return [
            TrainingCallback(
                [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                self.step_cb,
                args=[training_callback_attributes.optimizers],
            ),
            TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.step_post_backward),
        ]

    def _photographs(self) -> bool:
        """Whether the training images are photographs (the dataparser reports no background colour), as opposed to
        objects composited on a known background."""
        return dataset_background(self.kwargs.get("metadata")) is None

    def _random_placement(self) -> str:
        placement = self.config.random_init_placement
        if placement == "auto":
            placement = "views" if self._photographs() else "box"
        return placement

    @torch.no_grad()
    def _place_on_views(self, datamanager) -> None:
        """Move the random Gaussians onto view-consistent points of the training images (same count)."""
        from nerfstudio_splat_ext.model_components.seed_points import view_consistent_seed_points

        images = self._training_images(datamanager)
        cameras = datamanager.train_dataset.cameras  # after the cache: nerfstudio undistorts there and updates them
        n = self.num_points
        extent = self.scene_extent or 1.0
        near, far = (extent * f for f in self.config.random_init_depth_range)
        CONSOLE.log(f"splat-ext: placing {n} random Gaussians on points the {len(cameras)} training views agree on")
        device = self.device if self.device.type == "cuda" else "cpu"  # the plane sweep is cheap on a GPU
        means, colours, stats = view_consistent_seed_points(
            cameras.camera_to_worlds.to(device), cameras.get_intrinsics_matrices(), images, n, near, far
        )
        scales = torch.log(knn_mean_distance(means).clamp_min(1e-7))[:, None].repeat(1, 3)
        CONSOLE.log(
            f"splat-ext: {stats.depths_per_ray} depths tested per ray; the best depth agrees with half of the views or "
            f"more for {100 * stats.confident_fraction:.0f}% of the rays"
        )
        params = self.gauss_params
        params["means"].data.copy_(means.to(params["means"]))
        params["features_dc"].data.copy_(rgb_to_sh_dc(colours).to(params["features_dc"]))
        params["scales"].data.copy_(scales.to(params["scales"]))

    @staticmethod
    def _training_images(datamanager) -> List[torch.Tensor]:
        """The training images [H,W,3+], from the datamanager's image cache when it has one (nerfstudio's full-image
        datamanagers: the images are decoded and undistorted once, for the placement and for training), else decoded
        here in parallel."""
        cache = getattr(datamanager, "cached_train", None)
        if cache is not None:
            return [entry["image"] for entry in cache]
        dataset = datamanager.train_dataset
        return map_in_threads(dataset.get_image_uint8, range(len(dataset)))

    def _view(self, camera: Cameras, c2w: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """viewmats [1,4,4], Ks [1,3,3], camera centres [1,3] (on the model's device), width, height of the image
        to render for `camera`; `c2w`: its pose after camera optimisation (None: the camera's own).

        A training camera (nerfstudio's datamanagers tag it with `cam_idx`) is read once, the first time it comes,
        and kept: reading a GPU camera's size or intrinsics (`.item()`, nerfstudio's `get_intrinsics_matrices`)
        waits for every queued kernel. The first visit, not the datamanager's set-up, because nerfstudio caches
        and undistorts the images lazily and updates the cameras' intrinsics and sizes only then."""
        downscale = self._get_downscale_factor()
        index = (camera.metadata or {}).get("cam_idx") if self.training else None
        if index is None or downscale != 1:
            return self._read_view(camera, c2w, downscale)
        cached = self._train_views.get(int(index))
        if cached is None:
            cached = self._read_view(camera, None, 1)
            self._train_views[int(index)] = cached
        viewmats, Ks, centres, width, height = cached
        if c2w is not None:
            viewmats, centres = camera_to_world_to_viewmat(c2w), c2w[:, :3, 3]
        return viewmats, Ks, centres, width, height

    def _read_view(self, camera: Cameras, c2w: Optional[torch.Tensor], downscale: int) -> Tuple[torch.Tensor, ...]:
        c2w = (camera.camera_to_worlds if c2w is None else c2w).to(self.device).float()
        if downscale > 1:
            camera = copy.copy(camera)  # rescaled below: leave the caller's (possibly cached) camera as it is
            camera.rescale_output_resolution(1 / downscale)
        Ks = camera.get_intrinsics_matrices().to(self.device)
        width, height = int(camera.width.item()), int(camera.height.item())
        return camera_to_world_to_viewmat(c2w), Ks, c2w[:, :3, 3], width, height

    def _initial_strategy_state(self) -> dict:
        white = bool(torch.all(self.background_color == 1.0)) and self.config.background_color != "random"
        return self.strategy.initialize_state(scene_extent=self.scene_extent or 1.0, white_background=white)

    @staticmethod
    def _scale_position_lr(optimizers: Optimizers, extent: float) -> None:
        """Position lr = configured lr x scene extent. Idempotent (recomputed from the config), so it is right both
        for fresh runs and after a resume that restored the scheduler's state."""
        if "means" not in optimizers.optimizers:
            return
        base_lr = optimizers.config["means"]["optimizer"].lr * extent
        optimizer = optimizers.optimizers["means"]
        scheduler = optimizers.schedulers.get("means")
        for group in optimizer.param_groups:
            group["initial_lr"] = base_lr
            group["lr"] = base_lr
        if scheduler is not None:
            scheduler.base_lrs = [base_lr for _ in scheduler.base_lrs]
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if lambdas:
                for group, fn in zip(optimizer.param_groups, lambdas):
                    group["lr"] = base_lr * float(fn(max(scheduler.last_epoch, 0)))

    def step_cb(self, optimizers: Optimizers, step: int) -> None:
        self.step = step
        self.optimizers = optimizers.optimizers

    def step_post_backward(self, step: int) -> None:
        if not self.info or self.strategy_state is None:
            return
        source = self.info.pop("_contribution_source", None)
        if source is not None:
            grad_colors = source.pop("rgb").grad
            self.info["contribution"] = {**source, "grad_colors": grad_colors}
        stats = self.strategy.step_post_backward(self.gauss_params, self.optimizers, self.strategy_state, step, self.info)
        if stats and self.strategy.verbose:
            CONSOLE.log(f"step {step}: {stats}")

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):  # type: ignore[override]
        """Resize the Gaussians to the checkpoint's count *in place*.

        SplatfactoModel swaps in new Parameter objects here, but on resume nerfstudio has already built the
        optimizers around the old ones, so they would silently optimise orphans. Keeping the objects (and only
        replacing their data) lets the restored Adam state and our density control act on the live parameters.
        """
        if "means" in state_dict:  # checkpoints from before nerfstudio moved the Gaussians into gauss_params
            for name in list(self.gauss_params.keys()):
                state_dict[f"gauss_params.{name}"] = state_dict.pop(name)
        state_dict.setdefault("near_plane", torch.tensor(0.01))  # checkpoints from before the near plane was saved
        n = state_dict["gauss_params.means"].shape[0]
        for name, param in self.gauss_params.items():
            param.data = torch.zeros((n,) + tuple(param.shape[1:]), dtype=param.dtype, device=param.device)
        result = super(SplatfactoModel, self).load_state_dict(state_dict, strict=strict, **kwargs)
        self._near_plane = float(self.near_plane)
        if self.strategy_state is not None:
            self.strategy_state = self._initial_strategy_state()
        return result

    # -------------------------------------------------------------- rendering
    def _sh_degree_to_use(self) -> int:
        if not self.training:
            return self.config.sh_degree
        return min(self.step // self.config.sh_degree_interval, self.config.sh_degree)

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, List]]:
        if not isinstance(camera, Cameras):
            raise TypeError("splat-ext renders Cameras objects, got " + type(camera).__name__)
        c2w: Optional[torch.Tensor] = None  # None: the camera's own pose
        if self.training:
            assert camera.shape[0] == 1, "splat-ext trains on one camera per step"
            if self.camera_optimizer.config.mode != "off":
                c2w = self.camera_optimizer.apply_to_camera(camera).to(self.device).float()

        params = self.gauss_params
        means, quats, scales = params["means"], params["quats"], params["scales"]
        opacities, f_dc, f_rest = params["opacities"], params["features_dc"], params["features_rest"]
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(means).squeeze()
            if keep.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color.to(self.device))
            means, quats, scales, opacities, f_dc, f_rest = (t[keep] for t in (means, quats, scales, opacities, f_dc, f_rest))

        viewmats, Ks, centres, width, height = self._view(camera, c2w)
        self.last_size = (height, width)

        render_mode = "RGB+ED" if (self.config.output_depth_during_training or not self.training) else "RGB"
        backend, rasterize = get_rasterizer(self.config.render_backend, means.device, self.config.tight_tile_bounds)
        extra = {"tile_size": self.config.reference_tile_size} if backend == "reference" else {}
        # View-dependent colours evaluated here rather than inside gsplat's rasterization, which inverts the view
        # matrices to find the camera centres (torch.inverse waits for the GPU); nerfstudio's c2w holds them.
        colors = view_dependent_colors(
            get_spherical_harmonics(backend), self._sh_degree_to_use(), means, f_dc, f_rest, centres
        )
        # The rasterizer composites the background (fewer launches than adding it afterwards).
        background = self._get_background_color()
        render, alpha, info = rasterize(
            means=means,
            quats=quats,
            scales=torch.exp(scales),
            opacities=torch.sigmoid(opacities).squeeze(-1),
            colors=colors,
            viewmats=viewmats,
            Ks=Ks,
            width=width,
            height=height,
            packed=False,
            near_plane=self._near_plane,
            far_plane=1e10,
            render_mode=render_mode,
            sh_degree=None,
            absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode,
            backgrounds=background.reshape(1, 3),
            **extra,
        )
        if self.training:
            self.info = info
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, info)

        rgb = render if render.shape[-1] == 3 else render[..., :3]  # no slice in the graph when there is no depth
        if self.training and self.strategy.wants_contribution(self.step):
            self._prepare_contribution(info, rgb, background, colors)
        if not self.training:
            # Only displayed / evaluated images are clamped: clamping during training hides Gaussians brighter
            # than a white background from the loss (zero gradient), and they reappear as floaters in novel views.
            rgb = torch.clamp(rgb, 0.0, 1.0)
        depth = None
        if render_mode == "RGB+ED":
            depth = render[..., 3:4]
            depth = torch.where(alpha > 0, depth, depth.detach().max()).squeeze(0)
        if not self.training:
            background = background.expand(height, width, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    @torch.no_grad()
    def _prepare_contribution(self, info, rgb, background, colors) -> None:
        """Hands the contribution pass (strategy/contribution.py) what it needs once the loss has been
        back-propagated: dL/dC of this render (kept by retain_grad), the Gaussians' colours [C,N,3] and the
        background."""
        rgb.retain_grad()
        info["_contribution_source"] = {
            "rgb": rgb,
            "means2d": info["means2d"].detach(),
            "conics": info["conics"].detach(),
            "opacities": info["opacities"].detach(),
            "colors": colors.detach(),
            "backgrounds": background.detach().reshape(1, 3).expand(colors.shape[0], 3),
            "isect_offsets": info.get("isect_offsets"),
            "flatten_ids": info.get("flatten_ids"),
            "radii": info["radii"],
            "depths": info["depths"].detach(),
            "image_width": int(info["width"]),
            "image_height": int(info["height"]),
            "tile_size": int(info["tile_size"]),
        }

    # ------------------------------------------------------------ losses, eval
    def get_gt_img(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        return self._downscale_if_required(image).to(self.device)

    def composite_with_background(self, image: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """An RGBA image on `background` (RGB images pass through): one lerp instead of splatfacto's repeat /
        multiply / add chain, as a training step is bound by kernel launches."""
        if image.shape[-1] != 4:
            return image
        return torch.lerp(background.expand_as(image[..., :3]), image[..., :3], image[..., 3:])

    def _target(self, outputs, batch) -> torch.Tensor:
        """The ground-truth image composited on the render's background, computed once per step (the metrics and
        the loss both need it) and kept in `outputs`."""
        gt = outputs.get("_target")
        if gt is None:
            gt = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
            outputs["_target"] = gt
        return gt

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        gt = self._target(outputs, batch)
        pred = outputs["rgb"]
        if "mask" in batch:
            mask = self._downscale_if_required(batch["mask"]).to(self.device)
            gt, pred = gt * mask, pred * mask
        loss_dict = {"main_loss": self.loss_fn(pred, gt)}
        if self.training:
            self.camera_optimizer.get_loss_dict(loss_dict)
        return loss_dict

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        metrics: Dict[str, torch.Tensor] = {"gaussian_count": self.num_points}
        if not self.training or self.step % self.config.train_psnr_every == 0:
            gt = self._target(outputs, batch)
            # PSNR by its formula (data range 1): torchmetrics' stateful metric reads its state back to the host.
            metrics["psnr"] = -10.0 * torch.log10(torch.mean((outputs["rgb"] - gt) ** 2))
        self.camera_optimizer.get_metrics_dict(metrics)
        return metrics

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        gt = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        pred = outputs["rgb"]
        combined = torch.cat([gt, pred], dim=1)
        gt_b = gt.permute(2, 0, 1)[None]
        pred_b = pred.permute(2, 0, 1)[None]
        metrics: Dict[str, float] = {
            "psnr": float(self.psnr(gt_b, pred_b).item()),
            # 'valid' windows, as pytorch-msssim (which splatfacto reports) computes it
            "ssim": float(ssim_fn(gt_b, pred_b, padding="valid").item()),
            "num_gaussians": float(self.num_points),
        }
        lpips = self.lpips_metric(gt_b, pred_b)
        if lpips is not None:
            metrics["lpips"] = lpips
        return metrics, {"img": combined}
