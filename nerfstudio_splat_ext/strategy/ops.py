"""Pure grow / prune operations on a set of 3D Gaussians.

Every operation works on the layout used by nerfstudio's splatfacto:

* ``params``: a ``torch.nn.ParameterDict`` (or a plain dict) mapping a name to an
  ``nn.Parameter`` whose first dimension is the number of Gaussians ``N``
  (``means`` [N,3], ``scales`` [N,3] log scales, ``quats`` [N,4] wxyz,
  ``features_dc`` [N,3], ``features_rest`` [N,K,3], ``opacities`` [N,1] logits).
* ``optimizers``: a mapping name -> ``torch.optim.Optimizer`` (Adam-like), each with a
  single param group holding exactly ``params[name]``.
* ``state``: a dict whose per-Gaussian entries are tensors with ``ndim >= 1`` and first
  dimension ``N``; any other entry (Python scalars, 0-dim tensors, ``None``) is left
  untouched.

Each op replaces the affected parameters by *new* ``nn.Parameter`` objects, moves the
optimizer's per-parameter state (``exp_avg``, ``exp_avg_sq``, ...; ``step`` is kept as
is) over to the new parameter object, and rewrites the per-Gaussian state tensors.
New rows always start with zero optimizer moments.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, MutableMapping, Optional

import torch
from torch import Tensor

__all__ = [
    "duplicate",
    "split",
    "remove",
    "reset_opacity",
    "quat_to_rotmat",
    "num_gaussians",
]

Params = MutableMapping[str, torch.nn.Parameter]
Optimizers = Mapping[str, torch.optim.Optimizer]


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------


def num_gaussians(params: Mapping[str, Tensor]) -> int:
    """Number of Gaussians (first dimension shared by all parameters)."""
    for value in params.values():
        return int(value.shape[0])
    return 0


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from (not necessarily normalised) wxyz quaternions."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def _check_mask(params: Mapping[str, Tensor], mask: Tensor) -> Tensor:
    n = num_gaussians(params)
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor, got dtype {mask.dtype}")
    mask = mask.reshape(-1)
    if mask.numel() != n:
        raise ValueError(f"mask has {mask.numel()} entries but there are {n} Gaussians")
    device = next(iter(params.values())).device if len(params) > 0 else mask.device
    return mask.to(device)


def _single_param(optimizer: torch.optim.Optimizer, name: str) -> torch.nn.Parameter:
    groups = optimizer.param_groups
    if len(groups) != 1 or len(groups[0]["params"]) != 1:
        raise ValueError(
            f"optimizer for '{name}' must have exactly one param group holding exactly "
            f"one parameter (got {len(groups)} groups, "
            f"{[len(g['params']) for g in groups]} params)"
        )
    return groups[0]["params"][0]


def _replace(
    params: Params,
    optimizers: Optimizers,
    param_fn: Callable[[str, Tensor], Tensor],
    moment_fn: Callable[[str, Tensor], Tensor],
    names: Optional[list] = None,
) -> None:
    """Replace ``params[name]`` by ``param_fn(name, old)`` and its optimizer moments
    ``v`` by ``moment_fn(name, v)`` (only tensors shaped like the parameter; scalar
    entries such as ``step`` are carried over unchanged)."""
    for name in list(params.keys()) if names is None else names:
        old = params[name]
        with torch.no_grad():
            new_data = param_fn(name, old.detach())
        new_param = torch.nn.Parameter(new_data, requires_grad=old.requires_grad)
        optimizer = optimizers.get(name) if optimizers is not None else None
        if optimizer is not None:
            held = _single_param(optimizer, name)
            if held is not old:
                raise ValueError(
                    f"optimizer for '{name}' does not hold params['{name}'] "
                    "(the parameter was replaced without updating the optimizer?)"
                )
            old_state = optimizer.state.pop(old, None)
            if old_state:
                new_state: Dict[str, Any] = {}
                for key, value in old_state.items():
                    if (
                        isinstance(value, Tensor)
                        and key != "step"
                        and value.shape == old.shape
                    ):
                        with torch.no_grad():
                            new_state[key] = moment_fn(name, value)
                    else:
                        new_state[key] = value
                optimizer.state[new_param] = new_state
            optimizer.param_groups[0]["params"] = [new_param]
        params[name] = new_param


def _update_state(state: Optional[MutableMapping[str, Any]], n_old: int, fn) -> None:
    if state is None:
        return
    for key, value in list(state.items()):
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n_old:
            state[key] = fn(key, value)


# ----------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------


@torch.no_grad()
def duplicate(
    params: Params,
    optimizers: Optimizers,
    state: Optional[MutableMapping[str, Any]],
    mask: Tensor,
) -> int:
    """Clone the selected Gaussians (appended at the end, identical attributes).

    The clones start with zero optimizer moments; per-Gaussian state is copied.
    Returns the number of Gaussians added.
    """
    mask = _check_mask(params, mask)
    n_old = num_gaussians(params)
    sel = torch.nonzero(mask, as_tuple=True)[0]
    if sel.numel() == 0:
        return 0

    def param_fn(_name, p):
        return torch.cat([p, p[sel]], dim=0)

    def moment_fn(_name, v):
        return torch.cat([v, torch.zeros_like(v[sel])], dim=0)

    _replace(params, optimizers, param_fn, moment_fn)
    _update_state(state, n_old, lambda _k, v: torch.cat([v, v[sel]], dim=0))
    return int(sel.numel())


@torch.no_grad()
def split(
    params: Params,
    optimizers: Optimizers,
    state: Optional[MutableMapping[str, Any]],
    mask: Tensor,
    n_split: int = 2,
    scale_divisor: float = 1.6,
    rng: Optional[torch.Generator] = None,
) -> int:
    """Replace each selected Gaussian by ``n_split`` children.

    Children means are sampled from the parent's 3D Gaussian N(mean, R S S^T R^T),
    their (linear) scales are the parent's divided by ``scale_divisor`` (``scales`` is
    stored as log, so ``log(scale_divisor)`` is subtracted); every other attribute is
    copied. Parents are removed; the remaining Gaussians keep their order and come
    first, followed by the children (child ``k`` of every parent in block ``k``).
    Children get zero optimizer moments and a copy of their parent's per-Gaussian
    state. ``rng`` is an optional ``torch.Generator`` on the parameters' device.
    Returns the net number of Gaussians added (``n_selected * (n_split - 1)``).
    """
    if n_split < 1:
        raise ValueError(f"n_split must be >= 1, got {n_split}")
    if scale_divisor <= 0:
        raise ValueError(f"scale_divisor must be > 0, got {scale_divisor}")
    for key in ("means", "scales", "quats"):
        if key not in params:
            raise KeyError(f"split needs params['{key}']")
    mask = _check_mask(params, mask)
    n_old = num_gaussians(params)
    sel = torch.nonzero(mask, as_tuple=True)[0]
    rest = torch.nonzero(~mask, as_tuple=True)[0]
    m = int(sel.numel())
    if m == 0:
        return 0

    means = params["means"].detach()
    scales = params["scales"].detach()[sel]  # log scales [M,3]
    rotmats = quat_to_rotmat(params["quats"].detach()[sel])  # [M,3,3]
    eps = torch.randn(
        (n_split, m, 3), generator=rng, device=means.device, dtype=means.dtype
    )
    offsets = torch.einsum("mij,kmj->kmi", rotmats, torch.exp(scales) * eps)
    child_means = (means[sel].unsqueeze(0) + offsets).reshape(n_split * m, 3)
    log_div = math.log(scale_divisor)

    def repeat_rows(v: Tensor) -> Tensor:
        return v[sel].repeat((n_split,) + (1,) * (v.dim() - 1))

    def param_fn(name, p):
        if name == "means":
            children = child_means.to(p.dtype)
        elif name == "scales":
            children = repeat_rows(p) - log_div
        else:
            children = repeat_rows(p)
        return torch.cat([p[rest], children], dim=0)

    def moment_fn(_name, v):
        zeros = v.new_zeros((n_split * m,) + tuple(v.shape[1:]))
        return torch.cat([v[rest], zeros], dim=0)

    _replace(params, optimizers, param_fn, moment_fn)
    _update_state(
        state, n_old, lambda _k, v: torch.cat([v[rest], repeat_rows(v)], dim=0)
    )
    return m * (n_split - 1)


@torch.no_grad()
def remove(
    params: Params,
    optimizers: Optimizers,
    state: Optional[MutableMapping[str, Any]],
    mask: Tensor,
) -> int:
    """Delete the selected Gaussians from params, optimizer moments and state.

    Returns the number of Gaussians removed.
    """
    mask = _check_mask(params, mask)
    n_old = num_gaussians(params)
    n_removed = int(mask.sum().item())
    if n_removed == 0:
        return 0
    keep = torch.nonzero(~mask, as_tuple=True)[0]
    _replace(params, optimizers, lambda _n, p: p[keep], lambda _n, v: v[keep])
    _update_state(state, n_old, lambda _k, v: v[keep])
    return n_removed


@torch.no_grad()
def reset_opacity(
    params: Params,
    optimizers: Optimizers,
    state: Optional[MutableMapping[str, Any]],
    value: float,
) -> None:
    """Clamp opacities to at most ``value`` (a probability; ``params['opacities']``
    holds logits) and zero the opacity optimizer moments. ``state`` is unchanged."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"opacity reset value must be in (0, 1), got {value}")
    if "opacities" not in params:
        raise KeyError("reset_opacity needs params['opacities']")

    def param_fn(_name, p):
        limit = torch.logit(torch.tensor(value, dtype=torch.float64)).item()
        return torch.clamp(p, max=limit)

    _replace(
        params,
        optimizers,
        param_fn,
        lambda _n, v: torch.zeros_like(v),
        names=["opacities"],
    )
