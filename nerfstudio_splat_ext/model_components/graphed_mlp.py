"""CUDA-graph replay of splat-ext-nerf's network for packed batches of any size.

Why: a fast-path training step launches about 600 small kernels. The GPU works about 8 ms of a 13.5 ms step on an
H100 and the host spends the rest dispatching them (BENCHMARKS 0000a). The network's forward and backward are most
of those launches, and their shapes change only in the number of samples. Rounding that number up to a bucket
(8 buckets per octave: at most 12.5% extra rows, about 6% on average) leaves a handful of shapes; each is captured
once as a CUDA graph and then replayed with one launch for the forward and one for the backward.

Exactness: a padded row's outputs are dropped, so it receives a zero gradient and adds nothing to the parameters'
gradients; a replay runs the kernels the eager module ran at capture. ``tests/test_graphed_mlp.py`` compares both
(forward and parameter gradients) on the GPU; the eager module is the reference everywhere else (CPU, evaluation).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from nerfstudio_splat_ext.model_components.cuda_graphs import capture_autocast, capturing, warmed_up_stream


def bucket_size(n: int, per_octave: int = 8, minimum: int = 4096) -> int:
    """The padded sample count for ``n`` samples: ``n`` rounded up to a multiple of 2^(k - log2(per_octave)) for
    n in (2^(k-1), 2^k], so there are ``per_octave`` sizes per doubling; never below ``minimum``."""
    if n <= minimum:
        return minimum
    shift = max(0, (n - 1).bit_length() - per_octave.bit_length())
    quantum = 1 << shift
    return -(-n // quantum) * quantum


def _autocast_key() -> Tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class _TrainGraph:
    """The forward and backward graphs of one bucket, with their static inputs, outputs and gradients.

    The capture runs the network on *aliases* of its parameters: tensors that share the parameters' storage (so a
    replay reads the current weights, updated in place by the optimizer) but are fresh autograd leaves. Capturing
    on the parameters themselves would route the captured backward through their gradient accumulators, which the
    eager steps before the capture created on the default stream: autograd then joins that stream to the capture
    stream, and the capture fails (seen in a full training run)."""

    def __init__(self, mlp: nn.Module, size: int, device: torch.device) -> None:
        names, self.params = zip(*mlp.named_parameters())
        aliases = [param.detach().requires_grad_() for param in self.params]
        self.inputs = (torch.zeros(size, 3, device=device), torch.zeros(size, 3, device=device))

        def run():
            return torch.func.functional_call(mlp, dict(zip(names, aliases)), self.inputs)

        def backward(outputs, grad_outputs):
            return torch.autograd.grad(outputs, aliases, grad_outputs)

        def run_both():
            outputs = run()
            backward(outputs, tuple(torch.ones_like(o) for o in outputs))

        side = warmed_up_stream(run_both, device)
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with capture_autocast(), capturing(self.forward_graph, pool, side):
            outputs = run()
        self.outputs = tuple(o.detach() for o in outputs)
        with torch.cuda.stream(side):
            self.grad_outputs = tuple(torch.zeros_like(o) for o in outputs)
        with capturing(self.backward_graph, pool, side):
            self.grad_params = backward(outputs, self.grad_outputs)
        del outputs


class _Replay(torch.autograd.Function):
    """Forward: copy the n samples in, replay, hand out the first n rows. Backward: copy the n rows' gradients in
    (zeros for the padding), replay, hand the parameter gradients to autograd (which adds them to ``.grad``)."""

    @staticmethod
    def forward(ctx, graph: _TrainGraph, positions: Tensor, directions: Tensor, *params: Tensor):
        n = positions.shape[0]
        graph.inputs[0][:n].copy_(positions)
        graph.inputs[1][:n].copy_(directions)
        graph.forward_graph.replay()
        ctx.graph, ctx.n = graph, n
        return tuple(o[:n].clone() for o in graph.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):
        graph, n = ctx.graph, ctx.n
        for static, grad in zip(graph.grad_outputs, grads):
            static[:n].copy_(grad)
            static[n:].zero_()
        graph.backward_graph.replay()
        return (None, None, None, *graph.grad_params)


class GraphedNeRFMLP:
    """Graph-replaying front of a NeRF network (``forward(positions, directions) -> (sigma, rgb)`` and
    ``density(positions) -> sigma``).

    - ``forward`` with gradients (training): one graph per bucket for the forward and one for the backward.
    - ``density`` without gradients in training mode (the density pass of ray marching): one graph per bucket.
    Anything else (CPU tensors, inputs that require grad, no samples, more than ``max_samples``, or with gradients
    more than ``max_train_samples``) runs the eager network. At most ``max_graphs`` graphs of each kind are kept
    (least recently used dropped): the sample count drifts during training, and every graph holds its own memory.

    A plain object, not an ``nn.Module``: it adds nothing to the model's state dict or parameters.
    """

    def __init__(self, mlp: nn.Module, max_graphs: int = 4, max_samples: int = 1 << 19,
                 max_train_samples: int = 1 << 17) -> None:
        self.mlp = mlp
        self.max_graphs = max_graphs
        self.max_samples = max_samples
        # A graph pins the memory of its bucket (a training graph every activation the backward needs): large
        # early-training batches run eagerly instead (measured: 262k-sample training graphs exhausted 141 GB).
        self.max_train_samples = max_train_samples
        self._train: "OrderedDict[tuple, _TrainGraph]" = OrderedDict()
        self._density: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.captures = 0

    def _use_graph(self, positions: Tensor) -> bool:
        n = positions.shape[0]
        return (
            positions.is_cuda
            and 0 < n <= self.max_samples
            and not positions.requires_grad
            and not torch.cuda.is_current_stream_capturing()
        )

    def _lookup(self, cache: OrderedDict, key: tuple, capture: Callable[[], object]):
        entry = cache.get(key)
        if entry is None:
            if len(cache) >= self.max_graphs:
                cache.popitem(last=False)
                # Give the dropped graph's memory back: a private pool's segments are not reused by other captures.
                torch.cuda.empty_cache()
            entry = cache[key] = capture()
            self.captures += 1
        cache.move_to_end(key)
        return entry

    # -------------------------------------------------------------- training
    def forward(self, positions: Tensor, directions: Tensor) -> Tuple[Tensor, Tensor]:
        if not (torch.is_grad_enabled() and self.mlp.training and self._use_graph(positions)
                and positions.shape[0] <= self.max_train_samples):
            return self.mlp(positions, directions)
        n = positions.shape[0]
        size = bucket_size(n)
        key = (size, positions.device, *_autocast_key())
        graph = self._lookup(self._train, key, lambda: _TrainGraph(self.mlp, size, positions.device))
        return _Replay.apply(graph, positions, directions, *graph.params)

    # -------------------------------------------------------------- density
    def density(self, positions: Tensor) -> Tensor:
        # Training mode only (the marching density pass). The viewer and evaluation render in eval mode, possibly
        # from another thread, and must not share the static buffers.
        if torch.is_grad_enabled() or not (self.mlp.training and self._use_graph(positions)):
            return self.mlp.density(positions)
        n = positions.shape[0]
        size = bucket_size(n)
        key = (size, positions.device, *_autocast_key())
        graph, static_in, static_out = self._lookup(
            self._density, key, lambda: self._capture_density(size, positions.device))
        # Rows past n keep earlier (finite) positions; their outputs are never read.
        static_in[:n].copy_(positions)
        graph.replay()
        return static_out[:n].clone()

    def _capture_density(self, size: int, device: torch.device) -> tuple:
        static_in = torch.zeros(size, 3, device=device)
        side = warmed_up_stream(lambda: self.mlp.density(static_in), device)
        graph = torch.cuda.CUDAGraph()
        with capture_autocast(), capturing(graph, torch.cuda.graph_pool_handle(), side):
            static_out = self.mlp.density(static_in)
        return graph, static_in, static_out
