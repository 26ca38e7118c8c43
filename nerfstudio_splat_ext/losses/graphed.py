"""CUDA-graph replay of an image loss and its gradient w.r.t. the prediction, one launch per training step.

Why: past densification a splat-ext training step is bound by kernel launches, not by GPU work (BENCHMARKS
000000000000000a). The photometric loss (L1, fused SSIM, their mix) and its backward are about 20 of those
launches, and their shapes depend only on the image size. Captured once per image shape, a step copies the two
images in, replays, and copies the loss and the gradient out.

Exactness: a replay runs the kernels the eager loss ran at capture, on the copied inputs. The eager loss stays the
reference and the path for everything else: CPU tensors, evaluation (no gradient), autocast, a target that needs a
gradient, and datasets whose images come in more sizes than ``max_graphs`` (capturing again and again would cost
more than it saves). ``tests/test_losses.py`` compares both on the GPU.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nerfstudio_splat_ext.model_components.cuda_graphs import capturing, warmed_up_stream

LossFn = Callable[[Tensor, Tensor], Tensor]


class _LossGraph:
    """One captured loss: static prediction (an autograd leaf) and target, the captured loss and dL/dpred."""

    def __init__(self, loss_fn: LossFn, pred: Tensor, target: Tensor) -> None:
        self.pred = pred.detach().clone().contiguous().requires_grad_()
        self.target = target.detach().clone().contiguous()

        def run():
            loss = loss_fn(self.pred, self.target)
            (grad,) = torch.autograd.grad(loss, self.pred)
            return loss, grad

        side = warmed_up_stream(run, pred.device)
        self.graph = torch.cuda.CUDAGraph()
        with capturing(self.graph, torch.cuda.graph_pool_handle(), side):
            self.loss, self.grad = run()


class _ReplayLoss(torch.autograd.Function):
    """Forward: copy the images in, replay, hand out copies of the loss and of its gradient (a later replay
    overwrites the static ones). Backward: the saved gradient times the incoming scalar."""

    @staticmethod
    def forward(ctx, graph: _LossGraph, pred: Tensor, target: Tensor) -> Tensor:
        graph.pred.detach().copy_(pred)
        graph.target.copy_(target)
        graph.graph.replay()
        ctx.save_for_backward(graph.grad.clone())
        return graph.loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return None, grad * grad_loss, None


class GraphedLoss:
    """``loss_fn(pred, target) -> scalar`` replayed from CUDA graphs while training (see the module docstring).

    A plain object, not an ``nn.Module``: it adds nothing to a model's state dict."""

    def __init__(self, loss_fn: LossFn, max_graphs: int = 4) -> None:
        self.loss_fn = loss_fn
        self.max_graphs = max_graphs
        self.graphs: Dict[tuple, _LossGraph] = {}
        self.captures = 0
        self.disabled: Optional[str] = None  # why graphs are off for good, once they are

    @staticmethod
    def applies(pred: Tensor, target: Tensor) -> bool:
        """Whether this call can replay a graph: a training call (gradient for ``pred`` only) on one CUDA device,
        outside autocast and outside another capture."""
        return (
            pred.is_cuda
            and target.device == pred.device
            and torch.is_grad_enabled()
            and pred.requires_grad
            and not target.requires_grad
            and not torch.is_autocast_enabled("cuda")
            and not torch.cuda.is_current_stream_capturing()
        )

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.disabled is not None or not self.applies(pred, target):
            return self.loss_fn(pred, target)
        key = (tuple(pred.shape), tuple(target.shape), pred.dtype, target.dtype, pred.device)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                self._disable(f"images of more than {self.max_graphs} sizes")
                return self.loss_fn(pred, target)
            try:
                graph = _LossGraph(self.loss_fn, pred, target)
            except RuntimeError as err:  # a loss that cannot be captured: run it eagerly from now on
                self._disable(f"capture failed ({err})")
                return self.loss_fn(pred, target)
            self.graphs[key] = graph
            self.captures += 1
        return _ReplayLoss.apply(graph, pred, target)

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        self.graphs.clear()
        torch.cuda.empty_cache()  # the graphs' private pools
        warnings.warn(f"splat-ext: the loss runs without CUDA graphs from now on: {reason}", stacklevel=3)
