"""CUDA-graph replay of the NeRF network (model_components/graphed_mlp.py) against the eager network.

The bucket arithmetic and the eager fallback run everywhere; the replay itself needs a CUDA GPU (skipped on the CPU,
run on the GPU host and recorded in BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

from nerfstudio_splat_ext.fields.nerf_mlp import NeRFMLP
from nerfstudio_splat_ext.model_components.graphed_mlp import GraphedNeRFMLP, bucket_size

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_bucket_sizes_cover_n_with_little_padding_and_few_shapes():
    gen = torch.Generator().manual_seed(0)
    for n in torch.randint(1, 1 << 21, (2000,), generator=gen).tolist() + [4096, 4097, 65536, 65537]:
        size = bucket_size(n)
        assert size >= n
        assert size == 4096 or size <= n * 1.125 + 1  # at most one eighth of an octave of padding
        assert bucket_size(size) == size  # a bucket size is its own bucket
    for k in range(13, 21):  # 8 sizes per doubling
        sizes = {bucket_size(n) for n in range((1 << k) + 1, (1 << (k + 1)) + 1, 97)}
        assert len(sizes) == 8, (k, sorted(sizes))


def test_cpu_inputs_run_the_eager_network():
    torch.manual_seed(0)
    mlp = NeRFMLP(depth=4, width=32, skip=2, color_width=16).train()
    graphed = GraphedNeRFMLP(mlp)
    x, d = torch.randn(100, 3), torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    sigma, rgb = graphed.forward(x, d)
    ref_sigma, ref_rgb = mlp(x, d)
    assert torch.equal(sigma, ref_sigma) and torch.equal(rgb, ref_rgb)
    with torch.no_grad():
        assert torch.equal(graphed.density(x), mlp.density(x))
    assert graphed.captures == 0


def _inputs(n: int, device: str = "cuda"):
    x = torch.rand(n, 3, device=device) * 3.0 - 1.5
    d = torch.nn.functional.normalize(torch.randn(n, 3, device=device), dim=-1)
    return x, d


def _grads(mlp, sigma, rgb, w_sigma, w_rgb):
    mlp.zero_grad(set_to_none=True)
    ((sigma.float() * w_sigma).sum() + (rgb.float() * w_rgb).sum()).backward()
    return [p.grad.detach().clone() for p in mlp.parameters()]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return float((a.float() - b.float()).norm()) <= tol * float(b.float().norm()) + 1e-12


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_graph_replay_matches_the_eager_network_forward_and_gradients(autocast):
    torch.manual_seed(1)
    mlp = NeRFMLP().cuda().train()
    graphed = GraphedNeRFMLP(mlp, max_graphs=2)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    # An eager step whose autograd graph stays alive across the captures (as a trainer's last loss does): its
    # gradient accumulators live on the default stream, which a capture must not touch.
    earlier = sum(o.float().sum() for o in mlp(*_inputs(100)))
    earlier.backward()
    # Padding changes the matrix shapes, so cuBLAS may pick other kernels (other summation orders): fp16 and TF32
    # differ in the last bits, full float32 barely.
    tol = 2e-2 if autocast else (5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4)
    for n in (5000, 70001, 70500, 100000, 5000):  # all within max_train_samples  # new buckets, a repeated bucket, an evicted one captured again
        x, d = _inputs(n)
        w_sigma, w_rgb = torch.randn(n, 1, device="cuda"), torch.randn(n, 3, device="cuda")
        with torch.autocast("cuda", enabled=autocast):
            sigma, rgb = graphed.forward(x, d)
        got = _grads(mlp, sigma, rgb, w_sigma, w_rgb)
        with torch.autocast("cuda", enabled=autocast):
            ref_sigma, ref_rgb = mlp(x, d)
        ref = _grads(mlp, ref_sigma, ref_rgb, w_sigma, w_rgb)
        assert sigma.shape == ref_sigma.shape and rgb.shape == ref_rgb.shape
        assert _close(sigma, ref_sigma, tol) and _close(rgb, ref_rgb, tol), n
        for g, r in zip(got, ref):
            assert _close(g, r, tol), n
        # The graphs read the live parameters: after an optimizer step the replay follows them.
        opt.step()
    assert len(graphed._train) <= 2 and earlier.grad_fn is not None
    assert graphed.captures == 4  # 5000, 70001 (70500 shares its bucket), 100000, then 5000 again after eviction


@needs_cuda
def test_density_graph_matches_the_eager_density_without_gradients():
    torch.manual_seed(2)
    mlp = NeRFMLP(density_activation="softplus").cuda().train()
    graphed = GraphedNeRFMLP(mlp)
    for n in (3000, 131072, 99999):
        x, _ = _inputs(n)
        with torch.no_grad():
            got = graphed.density(x)
            ref = mlp.density(x)
        assert got.shape == ref.shape and _close(got, ref, 1e-4)
    assert graphed.captures == 3
    mlp.eval()  # evaluation and the viewer: eager network, no capture
    with torch.no_grad():
        graphed.density(_inputs(1234)[0])
    assert graphed.captures == 3


@needs_cuda
def test_splat_ext_nerf_training_step_is_the_same_with_and_without_graphs():
    """The whole fast-path step (marching with the graphed density pass, the graphed forward/backward, compositing,
    loss): the same renders, loss and parameter gradients as the eager network from the same weights and rays."""
    from nerfstudio.cameras.rays import RayBundle
    from nerfstudio.data.scene_box import SceneBox

    from nerfstudio_splat_ext.models.nerf import SplatExtNerfModelConfig

    box = SceneBox(aabb=torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]]))
    models = []
    for graphs in (True, False):
        torch.manual_seed(3)
        cfg = SplatExtNerfModelConfig(fast_path="on", cuda_graphs=graphs, density_activation="softplus")
        models.append(cfg.setup(scene_box=box, num_train_data=1, metadata={"background_color": torch.ones(3)})
                      .cuda().train())
    graphed, eager = models
    assert graphed._graphed_fine is not None and eager._graphed_fine is None
    gen = torch.Generator(device="cuda").manual_seed(4)
    n = 96  # every cell is occupied before the first grid update: up to ~1000 samples per ray; within max_train_samples
    origins = torch.nn.functional.normalize(torch.randn(n, 3, device="cuda", generator=gen), dim=-1) * 4.0
    targets = torch.rand(n, 3, device="cuda", generator=gen) - 0.5
    directions = torch.nn.functional.normalize(targets - origins, dim=-1)
    bundle = RayBundle(origins=origins, directions=directions, pixel_area=torch.ones(n, 1, device="cuda"),
                       camera_indices=torch.zeros(n, 1, dtype=torch.long, device="cuda"))
    batch = {"image": torch.rand(n, 3, device="cuda", generator=gen)}
    results = []
    for model in models:
        torch.manual_seed(5)  # the same stratified offsets
        with torch.autocast("cuda"):
            outputs = model(bundle)
            loss = sum(model.get_loss_dict(outputs, batch).values())
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.field_fine.parameters()])
        results.append((outputs["rgb"].float(), float(loss), grads, int(outputs["num_samples_per_ray"].sum())))
    (rgb_g, loss_g, grad_g, samples_g), (rgb_e, loss_e, grad_e, samples_e) = results
    assert samples_g > 0 and abs(samples_g - samples_e) <= 0.01 * samples_e  # fp16 alpha cut-offs may flip a few
    assert float((rgb_g - rgb_e).abs().mean()) < 1e-3
    assert abs(loss_g - loss_e) <= 1e-3 * loss_e
    assert float((grad_g - grad_e).norm()) <= 5e-2 * float(grad_e.norm())
    assert graphed._graphed_fine.captures >= 2  # the density pass and the training forward
