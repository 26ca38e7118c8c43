"""A training step of fused Adam optimizers with less host work than `torch.optim.Adam.step`.

splat-ext keeps one Adam per Gaussian attribute (six), as nerfstudio's Optimizers and the density-control ops
expect. Each `Optimizer.step` spends its host time on hooks, profiler scopes, gradient-scaler plumbing and tensor
grouping before launching its one fused kernel; for six optimizers that was the largest host cost of a training
step on lego (BENCHMARKS.md), where the step is paced by the host, not the GPU, until the model has grown.

`direct_adam_step` launches the same kernels (`torch._foreach_add_` on the step counters, then `torch._fused_adam_`
per parameter group, as torch's fused path does) with the same state layout (`step`, `exp_avg`, `exp_avg_sq`), so
checkpoints and the density-control ops see no difference. Optimizers it cannot step exactly (hooks, amsgrad,
maximize, tensor learning rates, a gradient scaler, ...) are left to `Optimizer.step`.
"""

from __future__ import annotations

from typing import List, Sequence

import torch


def supports_direct_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `direct_adam_step` computes exactly what `optimizer.step()` would."""
    if type(optimizer) is not torch.optim.Adam:
        return False
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return False
    from torch.optim import optimizer as optimizer_module

    if optimizer_module._global_optimizer_pre_hooks or optimizer_module._global_optimizer_post_hooks:
        return False
    for group in optimizer.param_groups:
        if not group.get("fused") or group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
            return False
        if group.get("decoupled_weight_decay") or group.get("capturable"):
            return False
        if isinstance(group["lr"], torch.Tensor) or any(isinstance(b, torch.Tensor) for b in group["betas"]):
            return False
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and not isinstance(state.get("step"), torch.Tensor):
                return False  # a state loaded from a non-fused optimizer: let torch convert it
    return True


def _state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    state = optimizer.state[p]
    if not state:  # as torch's Adam initialises a fused parameter's state
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def direct_adam_step(optimizers: Sequence[torch.optim.Adam]) -> None:
    """One Adam step of every parameter with a gradient, for optimizers that pass `supports_direct_step`."""
    groups: List[tuple] = []
    steps: List[torch.Tensor] = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Adam does not support sparse gradients")
            states = [_state_of(optimizer, p) for p in params]
            group_steps = [s["step"] for s in states]
            steps.extend(group_steps)
            groups.append((group, params, states, group_steps))
        # torch's LR schedulers warn when they step an optimizer whose step() was never called.
        optimizer._opt_called = True  # type: ignore[attr-defined]
    if not steps:
        return
    torch._foreach_add_(steps, 1)
    for group, params, states, group_steps in groups:
        beta1, beta2 = group["betas"]
        torch._fused_adam_(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            group_steps,
            amsgrad=False,
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]),
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )
